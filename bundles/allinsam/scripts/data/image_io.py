"""Reading and writing the image, label and box files of the workflows, with errors that name the file.

Writes are atomic (temporary file + rename), so a killed run never leaves a half-written output.
"""

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

TIFF_SUFFIXES = (".tif", ".tiff")
logger = logging.getLogger(__name__)


def _read_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return tifffile.imread(path)
        with Image.open(path) as image:
            return np.array(image)
    except (OSError, ValueError, UnidentifiedImageError, tifffile.TiffFileError) as error:
        raise ValueError(f"{path}: cannot read image, the file is corrupt or not an image ({error})") from error


def read_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF or PNG/JPEG image as RGB uint8 (H, W, 3); an alpha channel is dropped."""
    path = Path(path)
    image = _read_array(path)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{path}: expected an RGB image (H, W, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{path}: expected 8-bit RGB, got dtype {image.dtype}")
    return image


def read_instance_map(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label map (H, W) of non-negative integers (0 = background)."""
    path = Path(path)
    instances = _read_array(path)
    if instances.ndim != 2 or not np.issubdtype(instances.dtype, np.integer) or instances.min(initial=0) < 0:
        raise ValueError(
            f"{path}: expected an instance label map of non-negative integers (H, W), "
            f"got shape {instances.shape} dtype {instances.dtype}"
        )
    return instances


@contextmanager
def staged(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` (same suffixes, so writers that pick the format from them work) that is
    renamed onto ``path`` when the block succeeds and removed when it fails: an output is never seen half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes))
    os.close(fd)
    try:
        yield Path(tmp_name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp's 0600 would hide the output from other users
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _atomic_write(path: Path, write) -> None:
    with staged(path) as tmp:
        write(str(tmp))


def write_png_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write uint8 (H, W) / (H, W, 3) or uint16 (H, W) losslessly as PNG."""
    array = np.ascontiguousarray(array)
    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"{path}: PNG needs uint8 or uint16, got {array.dtype}")
    _atomic_write(Path(path), lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def write_json_atomic(path: str | os.PathLike, content) -> None:
    """Write ``content`` as indented JSON."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(content, handle, indent=1)
            handle.write("\n")

    _atomic_write(Path(path), write)


# PIL modes converted to 8-bit RGB by ``to_rgb8``, and how (logged once per file)
CONVERSIONS = {
    "RGBA": "alpha channel dropped", "RGBa": "alpha channel dropped", "LA": "greyscale, repeated to RGB, alpha dropped",
    "L": "greyscale, repeated to RGB", "1": "bilevel, repeated to RGB", "P": "palette colours expanded to RGB",
    "PA": "palette colours expanded to RGB, alpha dropped", "CMYK": "CMYK converted to RGB",
    "YCbCr": "YCbCr converted to RGB",
}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(image: Image.Image) -> Image.Image:
    """A ``PILReader`` converter: any image of ``CONVERSIONS`` or 16-bit greyscale -> 8-bit RGB, with a logged note
    naming the file; RGB passes unchanged; float images are refused. 16-bit values are divided by 257 (65535 -> 255)."""
    name = getattr(image, "filename", "") or "image"
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise ValueError(f"{name}: 32-bit integer image with values outside 0-65535; save it as 8-bit RGB")
        logger.warning(f"{name}: 16-bit greyscale image ({image.mode}) scaled to 8 bits (value / 257), repeated to RGB")
        return Image.fromarray(np.rint(values / 257).astype(np.uint8)).convert("RGB")
    if image.mode not in CONVERSIONS:
        raise ValueError(f"{name}: unsupported image mode {image.mode!r}; save it as 8-bit RGB (PNG or TIFF)")
    logger.warning(f"{name}: {image.mode} image converted to 8-bit RGB ({CONVERSIONS[image.mode]})")
    return image.convert("RGB")
