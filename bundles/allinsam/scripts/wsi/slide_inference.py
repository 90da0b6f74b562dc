"""Whole-slide nucleus segmentation: tissue tiles -> batched sliding-window prediction -> instances stitched across
tile borders -> GeoJSON / instance TIFF / NIfTI.

Stitching: every tile (a ``tile_size`` level-0 cell of the grid) is read and predicted with a ``tile_halo`` margin on
each side. An instance belongs to the tile whose cell holds its centroid (integer level-0 (y, x), the floor of the
mean pixel position), and is whole there when it reaches at most ``tile_halo`` px beyond the cell, so each nucleus
is written once and uncut. Two safeguards for predictions that differ slightly between neighbouring tiles (a real
network sees different context): an instance overlapping one already written is dropped (``duplicates``), and one
that touches the halo's outer edge is kept but counted (``cut``: raise ``tile_halo``).
"""

import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ..data import instance_contours, instances_from_mask, staged, write_json_atomic
from ..inference import TilePredictor
from .outputs import GeoJsonDetections, InstanceTiff
from .reading import Slide
from .tissue import tissue_mask, tissue_tiles

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideOptions:
    """How a slide is read, tiled and stitched (``wsi_inference.json``'s ``wsi_options``).

    ``tile_size`` / ``tile_halo``: level-0 px of a tile's cell and of the margin read around it; ``backend``:
    ``Slide``'s reader; ``tissue_*``: ``tissue_mask`` on the thumbnail of ``tissue_level``; instances under
    ``min_area`` px are dropped; ``write_nifti`` adds ``<name>_instances.nii.gz``. The threshold is the tile
    predictor's (inference.json's ``activation``).
    """

    classes: tuple[str, ...] = ("nucleus",)
    tile_size: int = 1024
    tile_halo: int = 64
    backend: str = "tifffile"
    tissue_level: int = -1
    tissue_brightness: float = 220
    tissue_saturation: float = 0.05
    instance_method: str = "components"
    min_area: int = 8
    write_nifti: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.tile_halo < 1 or self.tile_size < 1:
            raise ValueError(f"tile_size and tile_halo must be positive, got {self.tile_size} and {self.tile_halo}")
        object.__setattr__(self, "classes", tuple(self.classes))


class SlideStitcher:
    """The nuclei of a slide's tiles, written into one instance map and one GeoJSON, each nucleus once: by the tile
    whose cell holds its centroid. Owns the counts of what it wrote (``counts``)."""

    def __init__(self, labels: InstanceTiff, features: GeoJsonDetections, shape: tuple[int, int],
                 options: SlideOptions):
        self.labels, self.features, self.shape, self.options = labels, features, shape, options
        self.instances, self.duplicates, self.cut = 0, 0, 0
        self.per_class = dict.fromkeys(options.classes, 0)

    def counts(self) -> dict:
        return {"instances": self.instances, "instances_per_class": dict(self.per_class),
                "duplicates": self.duplicates, "cut": self.cut}

    def add(self, mask: np.ndarray, channel: int, cell: tuple[int, int], box: tuple[int, int, int, int]) -> None:
        """Write the instances of one tile's binary ``mask`` (h, w) (level-0 pixels ``box`` = (top, left, bottom,
        right)) whose centroid lies in the tile's ``cell`` (y, x)."""
        top, left, bottom, right = box
        tile_size, (height, width) = self.options.tile_size, self.shape
        instances = instances_from_mask(mask, self.options.instance_method)
        band = self.labels.band(channel, top, bottom)
        written = band[:, left:right]
        kept, ids = np.zeros_like(instances), []  # kept: local ids 1..len(ids); ids: their slide-wide ids
        for index, found in enumerate(ndimage.find_objects(instances)):
            if found is None:
                continue
            rows, cols = np.nonzero(instances[found] == index + 1)
            if rows.size < self.options.min_area:
                continue
            centroid_y = (int(rows.sum()) + rows.size * (found[0].start + top)) // rows.size
            centroid_x = (int(cols.sum()) + cols.size * (found[1].start + left)) // cols.size
            if not (cell[0] <= centroid_y < cell[0] + tile_size and cell[1] <= centroid_x < cell[1] + tile_size):
                continue
            pixels = (rows + found[0].start, cols + found[1].start)
            if written[pixels].any():
                self.duplicates += 1
                continue
            edges = ((found[0].start == 0 and top > 0) or (found[0].stop == mask.shape[0] and bottom < height)
                     or (found[1].start == 0 and left > 0) or (found[1].stop == mask.shape[1] and right < width))
            self.cut += int(edges)
            self.instances += 1
            self.per_class[self.options.classes[channel]] += 1
            ids.append(self.instances)
            kept[pixels] = len(ids)
            written[pixels] = self.instances
        for local_id, contour in instance_contours(kept).items():
            self.features.add([[px + left, py + top] for px, py in contour], channel, ids[local_id - 1])
        del written, band


def slide_name(path: str | os.PathLike) -> str:
    """The stem every output of a slide is named after: ``slides/a.ome.tif`` -> ``a.ome``."""
    return Path(path).name.rsplit(".", 1)[0]


def infer_slide(slide_path: str | os.PathLike, predictor: TilePredictor, output_dir: str | os.PathLike,
                options: SlideOptions | None = None, provenance: dict | None = None, **settings) -> dict:
    """Segment the nuclei of one slide, each tile (with its halo) through ``predictor`` (inference.json's
    ``tile_predictor``: its sliding-window inferer batches the windows, its activation thresholds). ``options``
    (or ``SlideOptions`` fields as keywords) say how the slide is tiled and stitched.

    Writes, committed together only when the whole slide succeeded, into ``output_dir``:
    ``<name>.geojson`` (QuPath detections, level-0 pixels), ``<name>_instances.tif`` (uint32 (C, H, W) ids,
    GeoJSON ``instance_id``s), ``<name>_instances.nii.gz`` with ``write_nifti`` and, last, ``<name>_summary.json``
    (the returned counts, with ``provenance``: who ran it with which settings).
    """
    options = replace(options or SlideOptions(), **settings)
    output_dir = Path(output_dir)
    name = slide_name(slide_path)
    started = time.perf_counter()
    with Slide(slide_path, options.backend) as slide:
        thumbnail, downsample = slide.thumbnail(options.tissue_level)
        tissue = tissue_mask(thumbnail, options.tissue_brightness, options.tissue_saturation)
        tiles, grid = tissue_tiles(tissue, downsample, slide.shape, options.tile_size)
        height, width = slide.shape
        outputs = {"geojson": output_dir / f"{name}.geojson", "tiff": output_dir / f"{name}_instances.tif"}
        if options.write_nifti:
            outputs["nifti"] = output_dir / f"{name}_instances.nii.gz"
        output_dir.mkdir(parents=True, exist_ok=True)
        tiles_run = []
        with (staged(outputs["geojson"]) as geojson_tmp, staged(outputs["tiff"]) as tiff_tmp,
              tempfile.TemporaryDirectory(dir=output_dir, prefix=f".{name}.scratch.") as scratch):
            labels = InstanceTiff(Path(scratch) / "instances.tif", (len(options.classes), height, width))
            stitcher = SlideStitcher(labels, GeoJsonDetections(geojson_tmp, list(options.classes)), slide.shape,
                                     options)
            try:
                bar = tqdm(tiles, desc=f"{name}: tiles", unit="tile", disable=not options.progress,
                           dynamic_ncols=True)
                for y, x in bar:
                    halo = options.tile_halo
                    box = (max(y - halo, 0), max(x - halo, 0), min(y + options.tile_size + halo, height),
                           min(x + options.tile_size + halo, width))
                    mask = predictor(slide.region(box[0], box[1], box[2] - box[0], box[3] - box[1]))["mask"]
                    for channel in range(len(options.classes)):
                        stitcher.add(mask[channel], channel, (y, x), box)
                    tiles_run.append([y, x])
                    bar.set_postfix(nuclei=stitcher.instances, refresh=False)
            finally:
                stitcher.features.close()
            labels.write_tiled(tiff_tmp)
            if options.write_nifti:
                with staged(outputs["nifti"]) as nifti_tmp:
                    labels.write_nifti(nifti_tmp)
    seconds = time.perf_counter() - started
    counts = {"slide": str(slide_path), "shape": [height, width], "tile_size": options.tile_size,
              "tile_halo": options.tile_halo, "tiles_in_grid": grid, "tissue_tiles": len(tiles),
              "tiles_run": tiles_run, **stitcher.counts(), "seconds": round(seconds, 2),
              "tiles_per_s": round(len(tiles) / seconds, 3), "outputs": {k: str(v) for k, v in outputs.items()},
              **(provenance or {})}
    if counts["cut"]:
        logger.warning(f"{slide_path}: {counts['cut']} nuclei reach past tile_halo={options.tile_halo} px and may be "
                       f"cut; raise tile_halo")
    write_json_atomic(output_dir / f"{name}_summary.json", counts)
    return counts
