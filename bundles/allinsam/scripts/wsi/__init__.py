from .cohort import join_torchrun, run_cohort, run_wsi_inference
from .outputs import GeoJsonDetections, InstanceTiff
from .reading import Slide
from .slide_inference import (
    SlideOptions,
    SlideStitcher,
    infer_slide,
    slide_name,
)
from .tissue import tissue_mask, tissue_tiles

__all__ = [
    "GeoJsonDetections",
    "InstanceTiff",
    "Slide",
    "SlideOptions",
    "SlideStitcher",
    "infer_slide",
    "join_torchrun",
    "run_cohort",
    "run_wsi_inference",
    "slide_name",
    "tissue_mask",
    "tissue_tiles",
]
