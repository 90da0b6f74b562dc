"""Opening a whole-slide image (pyramidal TIFF / SVS) through MONAI's ``WSIReader`` and reading level-0 regions.

Backends: ``tifffile`` (always) and ``openslide`` (when openslide-python is installed). With tifffile the pyramid
levels are those of the file's first series (top-level pages as in SVS, or sub-IFDs as in OME-TIFF).
"""

import os
from pathlib import Path
from typing import Self

import numpy as np
import tifffile
from monai.data import WSIReader

BACKENDS = ("tifffile", "openslide")
THUMBNAIL_SIDE = 2048  # a level whose longer side exceeds this is not read whole for a thumbnail
BAND_ROWS = 512  # level-0 rows read at a time when a thumbnail is made from level 0


class Slide:
    """One open slide: ``shape`` (H, W) level-0 pixels, ``region`` reads RGB uint8 (h, w, 3) at level 0."""

    def __init__(self, path: str | os.PathLike, backend: str = "tifffile"):
        if backend not in BACKENDS:
            raise ValueError(f"wsi_backend must be one of {BACKENDS}, got {backend!r}")
        self.path, self.backend = Path(path), backend
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: slide not found")
        try:
            self.reader = WSIReader(backend=backend, level=0, mode="RGB")
            self.wsi = self.reader.read(str(self.path))
            self.shape = tuple(int(size) for size in self.reader.get_size(self.wsi, 0))
            if backend == "tifffile":
                self.levels = len(self.wsi.series[0].levels)
                self._check_tiff_rgb()
            else:
                self.levels = self.reader.get_level_count(self.wsi)
        except (OSError, ValueError, KeyError, IndexError, tifffile.TiffFileError) as error:
            raise ValueError(f"{self.path}: cannot read the slide with the {backend} backend, the file is corrupt, "
                             f"truncated or not a (pyramidal) TIFF/SVS ({type(error).__name__}: {error})") from error

    def _check_tiff_rgb(self) -> None:
        page = self.wsi.pages[0]
        if page.shaped[-1] not in (3, 4) or page.dtype != np.uint8 or page.planarconfig != 1:
            raise ValueError(f"expected interleaved 8-bit RGB(A) at level 0, got shape {page.shaped[1:]} "
                             f"dtype {page.dtype} planar configuration {page.planarconfig}")

    def close(self) -> None:
        self.wsi.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def level_shape(self, level: int) -> tuple[int, int]:
        """(H, W) of a pyramid level (negative counts from the smallest)."""
        level = level % self.levels
        if self.backend == "tifffile":
            return tuple(int(size) for size in self.wsi.series[0].levels[level].shape[:2])
        return tuple(int(size) for size in self.reader.get_size(self.wsi, level))

    def thumbnail(self, level: int = -1) -> tuple[np.ndarray, float]:
        """A whole pyramid level (negative counts from the smallest): (RGB uint8 (h, w, 3), level-0 pixels per
        pixel of it). With tifffile, read from the first series: MONAI's backend takes page i as level i, which
        mixes in an SVS's thumbnail / label / macro pages and misses sub-IFDs. A level with a side above
        ``THUMBNAIL_SIDE`` (a slide without a pyramid) is not read whole: the thumbnail is averaged from level 0
        band by band, so memory stays bounded by a band."""
        level = level % self.levels
        if max(self.level_shape(level)) > THUMBNAIL_SIDE:
            return self._averaged_thumbnail()
        try:
            if self.backend == "tifffile":
                image = self.wsi.series[0].levels[level].asarray()[..., :3]
            else:
                image = np.moveaxis(self.reader.get_data(self.wsi, level=level)[0], 0, -1)
        except (OSError, ValueError, RuntimeError, tifffile.TiffFileError) as error:
            raise ValueError(f"{self.path}: cannot read pyramid level {level}, the file is corrupt or truncated "
                             f"({type(error).__name__}: {error})") from error
        image = np.asarray(image, dtype=np.uint8)
        return image, self.shape[0] / image.shape[0]

    def _averaged_thumbnail(self) -> tuple[np.ndarray, float]:
        """Level 0 averaged over factor x factor blocks (factor: the integer bringing the longer side to at most
        ``THUMBNAIL_SIDE``), read in bands of about ``BAND_ROWS`` rows; partial edge blocks average what they hold."""
        height, width = self.shape
        factor = -(-max(height, width) // THUMBNAIL_SIDE)
        band = factor * max(1, BAND_ROWS // factor)
        rows = []
        for y in range(0, height, band):
            pixels = self.region(y, 0, min(band, height - y), width).astype(np.float32)
            pad = ((0, -pixels.shape[0] % factor), (0, -width % factor), (0, 0))
            counts = np.pad(np.ones(pixels.shape[:2] + (1,), np.float32), pad)
            pixels = np.pad(pixels, pad)
            blocks = (pixels.shape[0] // factor, factor, pixels.shape[1] // factor, factor)
            total = pixels.reshape(*blocks, 3).sum(axis=(1, 3))
            rows.append(np.rint(total / counts.reshape(*blocks, 1).sum(axis=(1, 3))).astype(np.uint8))
        return np.concatenate(rows), float(factor)

    def region(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Level-0 pixels [y, y + height) x [x, x + width), inside the slide, as RGB uint8 (height, width, 3)."""
        if y < 0 or x < 0 or y + height > self.shape[0] or x + width > self.shape[1]:
            raise ValueError(f"{self.path}: region {(y, x, height, width)} outside the slide {self.shape}")
        try:
            if self.backend == "tifffile":
                return _tiff_region(self.wsi.pages[0], y, x, height, width)
            image, _ = self.reader.get_data(self.wsi, location=(y, x), size=(height, width), level=0)
            return np.ascontiguousarray(np.moveaxis(np.asarray(image, dtype=np.uint8), 0, -1))
        except (OSError, ValueError, RuntimeError, tifffile.TiffFileError) as error:
            raise ValueError(f"{self.path}: cannot read region (y, x, h, w) = {(y, x, height, width)}, the file is "
                             f"corrupt or truncated ({type(error).__name__}: {error})") from error


def _tiff_region(page: tifffile.TiffPage, y: int, x: int, height: int, width: int) -> np.ndarray:
    """Decode only the TIFF tiles / strips that meet the region. Ours: MONAI's tifffile backend decodes the whole
    level for every patch (unbounded memory and time on a slide), and tifffile's region reading needs zarr."""
    chunk_height, chunk_width = page.chunks[:2] if page.is_tiled else (page.rowsperstrip, page.imagewidth)
    chunk_height = min(chunk_height, page.imagelength)
    per_row = -(-page.imagewidth // chunk_width)
    out = np.empty((height, width, page.shaped[-1]), dtype=np.uint8)
    handle = page.parent.filehandle
    for row in range(y // chunk_height, (y + height - 1) // chunk_height + 1):
        for column in range(x // chunk_width, (x + width - 1) // chunk_width + 1):
            index = row * per_row + column
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            handle.seek(offset)
            data = handle.read(count)
            if len(data) != count:
                raise ValueError(f"chunk {index} is truncated ({len(data)} of {count} bytes)")
            chunk = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)[0]
            chunk = chunk.reshape(chunk.shape[-3:])  # (chunk h, chunk w, samples)
            top, left = row * chunk_height, column * chunk_width
            y0, y1 = max(y, top), min(y + height, top + chunk.shape[0])
            x0, x1 = max(x, left), min(x + width, left + chunk.shape[1])
            out[y0 - y:y1 - y, x0 - x:x1 - x] = chunk[y0 - top:y1 - top, x0 - left:x1 - left]
    return out[..., :3]
