"""The studies folder as MONAI Label's local datastore, confined to it.

MONAI Label's ``LocalDatastore`` joins the image id and the label tag of a request into file paths unchecked
(``PUT /datastore/label?tag=../../x`` writes outside the studies folder) and stores any upload. Here ids and tags
are plain names, and an upload is read before anything is written: what cannot be stored is refused with 422.
"""

import logging
import os
import re
from collections.abc import Callable
from types import ModuleType

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

logger = logging.getLogger(__name__)
# letters, digits, '.', '_', '-', not starting with '.': no separator, never '.' or '..'
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".png", ".tif", ".tiff")


def plain_name(value, what: str) -> str:
    """``value`` if it is a plain file-name stem, else HTTP 422 naming ``what``."""
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value):
        raise HTTPException(status_code=422, detail=f"{what} {value!r} must be a plain name (letters, digits, "
                                                    "'.', '_', '-'; no path, not starting with '.')")
    return value


def _suffix(filename: str, allowed: tuple[str, ...], what: str) -> None:
    if not filename.lower().endswith(allowed):
        raise HTTPException(status_code=422, detail=f"the uploaded {what} must be one of {list(allowed)}, "
                                                    f"got {os.path.basename(filename)!r}")


class ConfinedDatastore(LocalDatastore):
    """``LocalDatastore`` whose writes stay inside ``studies`` and whose uploads are readable tiles and labels.

    Args:
        studies: the studies folder.
        scripts: the bundle's ``scripts`` package; its image readers decide what is readable (one reader for every
            workflow).
        extensions: file patterns of the tiles listed.
    """

    def __init__(self, studies: str, scripts: ModuleType, extensions: list[str]):
        self.read_rgb_image: Callable = scripts.data.read_rgb_image
        self.read_instance_map: Callable = scripts.data.read_instance_map
        super().__init__(studies, extensions=extensions, auto_reload=True)

    def has_image(self, image_id) -> bool:
        """Whether ``image_id`` is the id of a tile of this datastore (a path never is)."""
        return isinstance(image_id, str) and image_id in self._datastore.objects

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        if image_id:
            plain_name(image_id, "image id")
        _suffix(image_filename, IMAGE_SUFFIXES, "image")
        try:
            self.read_rgb_image(image_filename)
        except (ValueError, FileNotFoundError) as error:
            raise HTTPException(status_code=422, detail=f"the uploaded image is not an RGB tile: {error}") from None
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        plain_name(label_tag, "label tag")
        if not self.has_image(image_id):
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not a tile of the studies folder")
        _suffix(label_filename, LABEL_SUFFIXES, "label")
        try:
            label = self.read_instance_map(label_filename)
        except (ValueError, FileNotFoundError) as error:
            raise HTTPException(status_code=422, detail=f"the uploaded label is not an instance map: {error}") from None
        tile_shape = self.read_rgb_image(self.get_image_uri(image_id)).shape[:2]
        if label.shape != tile_shape:
            raise HTTPException(status_code=422, detail=f"the uploaded label is {label.shape[0]}x{label.shape[1]}, "
                                                        f"the tile {image_id!r} is {tile_shape[0]}x{tile_shape[1]}")
        return super().save_label(image_id, label_filename, label_tag, label_info)
