from .outputs import GeoJsonDetections, InstanceTiff
from .reading import Slide
from .slide_inference import (
    SlideOptions,
    SlideStitcher,
    infer_slide,
    run_wsi_inference,
)
from .tissue import tissue_mask, tissue_tiles

__all__ = [
    "GeoJsonDetections",
    "InstanceTiff",
    "Slide",
    "SlideOptions",
    "SlideStitcher",
    "infer_slide",
    "run_wsi_inference",
    "tissue_mask",
    "tissue_tiles",
]
