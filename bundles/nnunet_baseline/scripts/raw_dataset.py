"""A split of a prepared datalist -> an nnU-Net v2 raw dataset of 2D RGB PNGs (nnU-Net's natural-image layout).

``nnUNet_raw/<DatasetNNN_Name>/imagesTr/<case>_0000.png`` (RGB uint8, one file for the three channels),
``labelsTr/<case>.png`` (uint8 0/1) and ``dataset.json`` (``file_ending ".png"``, read by ``NaturalImage2DIO``).
MONAI's nnU-Net runner cannot be used for this: its converter treats an RGB PNG as one channel.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist
from PIL import Image

CHANNEL_NAMES = {"0": "R", "1": "G", "2": "B"}
LABELS = {"background": 0, "nucleus": 1}


def datalist_images(datalist: str, split: str = "test") -> list[str]:
    """Absolute image paths of one split of a datalist (entries relative to the datalist's folder)."""
    entries = load_decathlon_datalist(datalist, data_list_key=split,
                                      base_dir=os.path.dirname(os.path.abspath(datalist)))
    return [entry["image"] for entry in entries]


def _checked_case(image: str, label: str) -> None:
    """Raise ``ValueError`` naming the file unless ``image`` is an RGB image and ``label`` a 0/1 mask of its size."""
    with Image.open(image) as opened:
        if opened.mode != "RGB":
            raise ValueError(f"{image}: nnU-Net's RGB dataset needs an RGB image, this one is mode {opened.mode}")
        size = opened.size
    with Image.open(label) as opened:
        mask = np.asarray(opened)
    if mask.ndim != 2 or mask.shape[::-1] != size:
        raise ValueError(f"{label}: label of shape {mask.shape} does not match its image {image} ({size[1]}x{size[0]})")
    values = np.unique(mask)
    if not set(values.tolist()) <= {0, 1}:
        raise ValueError(f"{label}: labels must be 0 (background) / 1 (nucleus), found values {values[:8].tolist()}")


def _same_tree(left: Path, right: Path) -> bool:
    """True when two folders hold the same relative file names with the same bytes."""
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())  # noqa: E731
    names = files(left)
    return names == files(right) and all((left / n).read_bytes() == (right / n).read_bytes() for n in names)


def write_raw_dataset(datalist: str, raw_dir: str, dataset_name: str, splits: tuple[str, ...] = ("training",),
                      description: str = "") -> str:
    """Write the cases of ``splits`` of ``datalist`` as ``raw_dir/dataset_name``; returns that folder.

    Args:
        datalist: decathlon-style JSON; each entry has ``image`` (RGB PNG) and ``label`` (0/1 PNG).
        raw_dir: the ``nnUNet_raw`` folder.
        dataset_name: ``DatasetNNN_Name`` (nnU-Net's pattern, three-digit id).
        splits: datalist keys whose cases become nnU-Net training cases.

    Rerunning with the same data is a no-op (a resumed run keeps its plans and preprocessed data); a different
    dataset under the same name is refused rather than overwritten.
    """
    if not (dataset_name.startswith("Dataset") and dataset_name[7:10].isdigit() and dataset_name[10:11] == "_"):
        raise ValueError(f"dataset_name must look like Dataset001_Name (nnU-Net's pattern), got {dataset_name!r}")
    base_dir = os.path.dirname(os.path.abspath(datalist))
    cases = {}
    for split in splits:
        for entry in load_decathlon_datalist(datalist, data_list_key=split, base_dir=base_dir):
            case = Path(entry["image"]).stem
            if case in cases:
                raise ValueError(f"{datalist}: case {case!r} appears twice (splits {list(splits)})")
            _checked_case(entry["image"], entry["label"])
            cases[case] = (entry["image"], entry["label"])
    if not cases:
        raise ValueError(f"{datalist}: no cases in splits {list(splits)}")
    target = Path(raw_dir) / dataset_name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset_name}.", dir=target.parent))
    try:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        for case, (image, label) in sorted(cases.items()):
            _copy_as_png(image, staging / "imagesTr" / f"{case}_0000.png")
            _copy_as_png(label, staging / "labelsTr" / f"{case}.png")
        dataset_json = {"name": dataset_name, "description": description or f"{Path(datalist).name} {list(splits)}",
                        "channel_names": CHANNEL_NAMES, "labels": LABELS, "numTraining": len(cases),
                        "file_ending": ".png"}
        (staging / "dataset.json").write_text(json.dumps(dataset_json, indent=4) + "\n")
        if target.exists():
            if not _same_tree(staging, target):
                raise FileExistsError(f"{target} holds a different dataset; use another work_dir or dataset_id")
            return str(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _copy_as_png(source: str, destination: Path) -> None:
    """PNG sources are copied byte for byte; other formats are re-encoded losslessly as PNG."""
    if Path(source).suffix.lower() == ".png":
        shutil.copyfile(source, destination)
    else:
        with Image.open(source) as opened:
            opened.save(destination)
