"""Datalists and image globs checked before a workflow reads anything, so that a bad file stops the run at once with
an error naming it and the problem, rather than deep inside a data loader (or half-way through the outputs)."""

import glob
import json
import os
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist
from PIL import Image, UnidentifiedImageError

UNREADABLE = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of an image file, after decoding all of it (a truncated file fails here)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    except UNREADABLE as error:
        raise ValueError(f"{path}: cannot read the image: the file is truncated, corrupt or not an image "
                         f"({type(error).__name__}: {error})") from error


def check_binary(path: Path, key: str) -> None:
    """The mask at ``path`` holds only 0 (background) and 1 (foreground); ValueError naming the file otherwise."""
    with Image.open(path) as image:
        values = np.unique(np.asarray(image))
    if values.size and (values.min() < 0 or values.max() > 1):
        advice = " (a 0/255 mask: save it divided by 255)" if set(values.tolist()) <= {0, 255} else ""
        raise ValueError(f"{path}: the {key!r} holds values {values[:6].tolist()}{'...' if values.size > 6 else ''}; "
                         f"expected 0 (background) and 1 (nucleus){advice}")


def check_entries(entries: list[dict], keys: list[str], source: str, binary_keys: tuple[str, ...] = ()) -> list[dict]:
    """Every entry has every key, each file exists and decodes, all files of an entry have one size, and the files of
    ``binary_keys`` are 0/1 masks."""
    for index, entry in enumerate(entries):
        sizes = {}
        for key in keys:
            if key not in entry:
                raise ValueError(f"{source}: entry {index} has no {key!r} ({entry})")
            path = Path(entry[key])
            if not path.is_file():
                raise FileNotFoundError(f"{path}: file not found (the {key!r} of entry {index} in {source})")
            sizes[key] = image_size(path)
            if key in binary_keys:
                check_binary(path, key)
        first = keys[0]
        for key, size in sizes.items():
            if size != sizes[first]:
                raise ValueError(f"{entry[key]}: the {key!r} is {size[0]}x{size[1]} pixels but its {first!r} "
                                 f"{entry[first]} is {sizes[first][0]}x{sizes[first][1]} (entry {index} in {source})")
    return entries


def checked_datalist(datalist: str | os.PathLike, split: str, keys: list[str],
                     binary_keys: tuple[str, ...] = ()) -> list[dict]:
    """MONAI's ``load_decathlon_datalist`` of ``split`` (paths relative to the datalist file), checked with
    ``check_entries`` (``binary_keys``: 0/1 masks); an empty split is an error."""
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist not found")
    try:
        entries = load_decathlon_datalist(str(path), data_list_key=split, base_dir=str(path.parent))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed datalist JSON ({error})") from error
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: no usable {split!r} list ({error})") from error
    if not entries:
        raise ValueError(f"{path}: the {split!r} list is empty")
    return check_entries(entries, keys, str(path), tuple(binary_keys))


def checked_image_glob(pattern: str) -> list[dict]:
    """``[{"image": path}, ...]`` of the files matching ``pattern`` in sorted order, checked; none is an error."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"{pattern}: no file matches this pattern")
    return check_entries([{"image": path} for path in paths], ["image"], pattern)
