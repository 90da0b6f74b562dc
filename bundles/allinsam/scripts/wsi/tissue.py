"""Tissue detection on a low-resolution pyramid level, and the level-0 tile grid that covers the tissue."""

import math

import numpy as np
from monai.transforms import ForegroundMask


def tissue_mask(thumbnail: np.ndarray, brightness: float = 220, saturation: float = 0.05) -> np.ndarray:
    """RGB uint8 (h, w, 3) -> tissue mask (h, w) bool: some channel <= ``brightness`` (0..255) **and** HSV saturation
    > ``saturation`` (0..1). White glass, grey and black borders are background; fixed thresholds, not Otsu, so that
    a slide that is all tissue stays all tissue."""
    mask = ForegroundMask(threshold=float(brightness), hsv_threshold={"S": float(saturation)})(
        np.moveaxis(thumbnail, -1, 0))
    return np.asarray(mask[0], dtype=bool)


def tissue_tiles(mask: np.ndarray, downsample: float, shape: tuple[int, int], tile_size: int
                 ) -> tuple[list[tuple[int, int]], int]:
    """The cells of the level-0 grid of ``tile_size`` px over a slide of ``shape`` (H, W) that hold tissue: their
    top-left corners (y, x) in raster order, and the number of cells in the grid. A cell holds tissue when the mask
    (h, w), ``downsample`` level-0 px per mask pixel, has tissue in the cell grown by one mask pixel."""
    height, width = shape
    tiles = []
    for y in range(0, height, tile_size):
        for x in range(0, width, tile_size):
            top, left = max(math.floor(y / downsample) - 1, 0), max(math.floor(x / downsample) - 1, 0)
            bottom = math.ceil(min(y + tile_size, height) / downsample) + 1
            right = math.ceil(min(x + tile_size, width) / downsample) + 1
            if mask[top:bottom, left:right].any():
                tiles.append((y, x))
    return tiles, math.ceil(height / tile_size) * math.ceil(width / tile_size)
