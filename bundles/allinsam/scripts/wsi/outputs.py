"""Outputs of whole-slide inference, written while the tiles stream by and committed only when the slide is done:
QuPath GeoJSON detections, an instance-label TIFF (disk-backed, so memory stays bounded) and optionally NIfTI."""

import json
import os
from pathlib import Path

import numpy as np
import tifffile

from ..data import class_colour


class GeoJsonDetections:
    """A GeoJSON FeatureCollection streamed to ``path`` one nucleus at a time: a Polygon per nucleus in level-0
    pixel coordinates (x right, y down; vertices at boundary pixel centres) with QuPath's ``objectType``
    ``detection``, its ``classification`` {name, color} and ``measurements`` {"instance_id": id in the TIFF}."""

    def __init__(self, path: str | os.PathLike, classes: list[str]):
        self.classes = [{"name": name, "color": list(class_colour(index))}
                        for index, name in enumerate(classes)]
        self.handle = open(path, "w")  # noqa: SIM115 - closed by close(), after the tile loop
        self.handle.write('{"type": "FeatureCollection", "features": [')
        self.count = 0

    def add(self, contour: list[list[int]], class_index: int, instance_id: int) -> None:
        """``contour``: closed [[x, y], ...] (first point = last); padded to the 4 positions GeoJSON rings need."""
        ring = contour + [contour[-1]] * max(0, 4 - len(contour))
        feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                   "properties": {"objectType": "detection", "classification": self.classes[class_index],
                                  "measurements": {"instance_id": instance_id}}}
        self.handle.write(("\n" if self.count == 0 else ",\n") + json.dumps(feature, separators=(",", ":")))
        self.count += 1

    def close(self) -> None:
        self.handle.write("\n]}\n")
        self.handle.close()


class InstanceTiff:
    """A scratch uncompressed uint32 TIFF (C, H, W) of instance ids (0 = background) on disk; ``band`` maps only the
    rows a tile touches, so resident memory stays at one tile whatever the slide size. ``write_tiled`` and
    ``write_nifti`` copy it, band by band, to the outputs."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int]):
        self.path, self.shape = Path(path), tuple(shape)
        array = tifffile.memmap(self.path, shape=self.shape, dtype=np.uint32, photometric="minisblack",
                                bigtiff=self._bigtiff(), metadata={"axes": "CYX"})
        self.offset = array.offset
        array.flush()
        del array

    def _bigtiff(self) -> bool:
        return bool(np.prod(self.shape, dtype=np.int64) * 4 > 2 ** 32 - 2 ** 25)

    def band(self, channel: int, top: int, bottom: int, mode: str = "r+") -> np.memmap:
        """Rows [top, bottom) of channel ``channel`` as an (h, W) view of the file; dropping it releases the pages."""
        _, height, width = self.shape
        offset = self.offset + (channel * height + top) * width * 4
        return np.memmap(self.path, dtype=np.uint32, mode=mode, offset=offset, shape=(bottom - top, width))

    def write_tiled(self, path: str | os.PathLike, tile: int = 256) -> None:
        """Copy to a tiled, zlib-compressed TIFF (C, H, W) uint32: a small fraction of the scratch file's size."""
        channels, height, width = self.shape

        def tiles():
            for channel in range(channels):
                for top in range(0, height, tile):
                    band = np.array(self.band(channel, top, min(top + tile, height), mode="r"))
                    for left in range(0, width, tile):
                        block = np.zeros((tile, tile), dtype=np.uint32)
                        block[:band.shape[0], :min(tile, width - left)] = band[:, left:left + tile]
                        yield block

        tifffile.imwrite(path, tiles(), shape=self.shape, dtype=np.uint32, tile=(tile, tile), compression="zlib",
                         photometric="minisblack", bigtiff=self._bigtiff(), metadata={"axes": "CYX"})

    def write_nifti(self, path: str | os.PathLike) -> None:
        """Copy to NIfTI (x, y[, c]) = (W, H[, C]) uint32, MONAI's / ITK's spatial order, 1 voxel = 1 level-0 pixel;
        NIfTI-2 when a side exceeds NIfTI-1's 32767. The data are gzipped through one memory map of the file."""
        import nibabel

        array = tifffile.memmap(self.path, mode="r")
        data = array[0].T if self.shape[0] == 1 else array.transpose(2, 1, 0)
        image_class = nibabel.Nifti1Image if max(self.shape) <= 32767 else nibabel.Nifti2Image
        image = image_class(data, affine=np.eye(4))
        image.header.set_data_dtype(np.uint32)
        nibabel.save(image, path)
