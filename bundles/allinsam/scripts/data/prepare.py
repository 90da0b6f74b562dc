"""Dataset preparation: a lab's images and nucleus annotations -> the prepared layout every workflow reads.

Sources (``layout``):
- ``monuseg``: MoNuSeg's official folders, searched recursively: ``<name>.tif`` images with ``<name>.xml``
  (ImageScope polygons, one ``Region`` per nucleus) or ``instance_masks/<name>.png`` (uint16 instance map).
- ``folder``: ``images/<name>.<png|tif|jpg>`` with ``instances/<name>.<ext>`` of the same stem, where the annotation
  is a uint16 instance map (``.png``, ``.tif``), ImageScope XML (``.xml``) or QuPath GeoJSON polygons (``.geojson``,
  ``.json``; each Polygon, and each part of a MultiPolygon, is one nucleus).

Output (paths in datalists are relative to ``output_dir``)::

    cases/{images,labels,instances}/<name>.png   RGB uint8 / binary uint8 0-1 / instance ids uint16, contiguous
    cases/boxes/<name>.json                       tight boxes [x0, y0, x1, y1], end exclusive, row i = id i + 1
    fractions/<fraction>_seed<s>/...              the same for the training images of a label fraction
    datalist_all.json, datalist_<fraction>_seed<s>.json, prepare_report.json

A split file (JSON with ``train`` / ``validation`` / ``test`` name lists) fixes the split; without one the images
are split by a seeded shuffle in the proportions ``split_fractions``. Fractions change only ``training``: ``4pct``
keeps one random ``patch_size`` square per training image, ``0.5pct`` one from each of three random training
images; pixels outside the patches are 0 in the image and the labels. A patch is drawn from ``(seed, image name)``
alone, so ``0.5pct`` patches are a subset of the ``4pct`` patches of the same seed.
"""

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .annotation_xml import read_xml_polygons
from .geojson import read_geojson_polygons
from .image_io import read_instance_map, read_rgb_image, write_json_atomic, write_png_atomic
from .instances import boxes_from_instances, relabel_sequential

SPLITS = ("training", "validation", "test")
SPLIT_FILE_KEYS = {"training": "train", "validation": "validation", "test": "test"}
FRACTIONS = {"all": None, "4pct": None, "0.5pct": 3}  # fraction -> number of training images patched (None: all)
LAYOUTS = ("monuseg", "folder")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
ANNOTATION_SUFFIXES = (".png", ".tif", ".tiff", ".xml", ".geojson", ".json")


@dataclass(frozen=True)
class Case:
    """One image and its annotation file (polygons or an instance map)."""

    name: str
    image: Path
    annotation: Path


def _index(paths, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """``{stem: path}`` of the files with one of ``suffixes``; a second file for a stem is an error."""
    found: dict[str, Path] = {}
    for path in sorted(paths):
        if path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            raise ValueError(f"{path}: a second file for {path.stem} (first: {found[path.stem]})")
        found[path.stem] = path
    return found


def find_cases(source_dir: str | os.PathLike, layout: str = "monuseg") -> dict[str, Case]:
    """Every image of ``source_dir`` paired with its annotation (``layout``: see the module docstring)."""
    source = Path(source_dir)
    if layout == "monuseg":
        files = list(source.rglob("*"))
        images = _index(files, (".tif", ".tiff"))
        annotations = _index([p for p in files if p.suffix.lower() == ".xml" or (
            p.suffix.lower() == ".png" and p.parent.name == "instance_masks")], (".xml", ".png"))
    elif layout == "folder":
        for folder in ("images", "instances"):
            if not (source / folder).is_dir():
                raise FileNotFoundError(f"{source / folder}: the folder layout needs images/ and instances/")
        images = _index((source / "images").iterdir(), IMAGE_SUFFIXES)
        annotations = _index((source / "instances").iterdir(), ANNOTATION_SUFFIXES)
        unpaired = sorted(set(images) ^ set(annotations))
        if unpaired:
            raise ValueError(f"{source}: {len(unpaired)} image(s) or annotation(s) without a partner of the same "
                             f"name in images/ and instances/: {unpaired[:5]}")
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    cases = {name: Case(name, image, annotations[name]) for name, image in images.items() if name in annotations}
    if not cases:
        raise FileNotFoundError(f"{source}: no image with an annotation found (layout {layout!r})")
    return cases


def rasterise_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance map (H, W): polygon k (interior and outline) gets id k + 1; a later polygon overwrites overlaps.

    Ids are not yet contiguous (a polygon may be fully covered by later ones); see ``relabel_sequential``.
    """
    canvas = Image.new("I", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for index, vertices in enumerate(polygons):
        draw.polygon([tuple(vertex) for vertex in vertices.tolist()], fill=index + 1, outline=index + 1)
    return np.array(canvas, dtype=np.int32)


def load_case(case: Case) -> tuple[np.ndarray, np.ndarray, int]:
    """Image (H, W, 3) uint8, contiguous instance map (H, W) uint16, and the number of annotated regions."""
    image = read_rgb_image(case.image)
    suffix = case.annotation.suffix.lower()
    if suffix in (".xml", ".geojson", ".json"):
        polygons = read_xml_polygons(case.annotation) if suffix == ".xml" else read_geojson_polygons(case.annotation)
        instances, regions = rasterise_polygons(polygons, image.shape[:2]), len(polygons)
    else:
        instances = read_instance_map(case.annotation)
        regions = len(np.unique(instances[instances > 0]))
        if instances.shape != image.shape[:2]:
            raise ValueError(f"{case.annotation}: instance map of size {instances.shape} does not match "
                             f"the image {case.image} of size {image.shape[:2]}")
    return image, relabel_sequential(instances), regions


def write_case(root: Path, name: str, image: np.ndarray, instances: np.ndarray) -> dict[str, Path]:
    """Write image, binary label, instance map and boxes of one case under ``root``; return their paths."""
    boxes = boxes_from_instances(instances)
    paths = {key: root / key / f"{name}{ext}" for key, ext in
             (("images", ".png"), ("labels", ".png"), ("instances", ".png"), ("boxes", ".json"))}
    write_png_atomic(paths["images"], image)
    write_png_atomic(paths["labels"], (instances > 0).astype(np.uint8))
    write_png_atomic(paths["instances"], instances)
    write_json_atomic(paths["boxes"], {"image": paths["images"].name, "size": list(instances.shape),
                                       "instance_ids": list(range(1, len(boxes) + 1)), "boxes": boxes.tolist()})
    return {"image": paths["images"], "label": paths["labels"], "instances": paths["instances"],
            "boxes": paths["boxes"]}


def patch_origin(name: str, seed: int, shape: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the random ``patch_size`` square of image ``name``, drawn from ``(seed, name)``."""
    if min(shape) < patch_size:
        raise ValueError(f"{name}: image of size {shape} is smaller than the labelled patch ({patch_size})")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return int(rng.integers(0, shape[0] - patch_size + 1)), int(rng.integers(0, shape[1] - patch_size + 1))


def images_with_patches(training: list[str], fraction: str, seed: int) -> list[str]:
    """The training images that get a labelled patch under ``fraction`` (sorted)."""
    count = FRACTIONS[fraction]
    if count is None:
        return sorted(training)
    if count > len(training):
        raise ValueError(f"fraction {fraction} needs {count} training images, the split has {len(training)}")
    return sorted(np.random.default_rng(seed).choice(sorted(training), size=count, replace=False).tolist())


def read_split(split_file: str | os.PathLike, cases: dict[str, Case]) -> dict[str, list[str]]:
    """``{"training": names, "validation": names, "test": names}`` from a split JSON (keys train/validation/test)."""
    try:
        content = json.loads(Path(split_file).read_text())
        split = {key: list(content[file_key]) for key, file_key in SPLIT_FILE_KEYS.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{split_file}: expected JSON with 'train', 'validation' and 'test' name lists ({error!r})")
    missing = sorted(name for names in split.values() for name in names if name not in cases)
    if missing:
        raise ValueError(f"{split_file}: {len(missing)} images have no image + annotation pair: {missing[:5]}")
    return split


def seeded_split(names, split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                 seed: int = 0) -> dict[str, list[str]]:
    """Training / validation / test names by a seeded shuffle in the proportions ``split_fractions`` (rounded; each
    split gets at least one image when there are three or more)."""
    if len(split_fractions) != 3 or min(split_fractions) < 0 or not sum(split_fractions) > 0:
        raise ValueError(f"split_fractions must be three non-negative proportions, got {split_fractions}")
    names = sorted(names)
    shuffled = np.random.default_rng(seed).permutation(names).tolist()
    shares = np.asarray(split_fractions, dtype=np.float64) / sum(split_fractions)
    counts = np.floor(shares * len(names)).astype(int)
    if len(names) >= 3:
        counts = np.maximum(counts, 1)
    counts[0] = len(names) - counts[1:].sum()
    bounds = np.cumsum([0, *counts])
    return {split: sorted(shuffled[bounds[k]:bounds[k + 1]]) for k, split in enumerate(SPLITS)}


def relative_entry(entry: dict[str, Path], base: Path) -> dict[str, str]:
    return {key: str(path.relative_to(base)) for key, path in entry.items()}


def prepare_dataset(source_dir: str, output_dir: str, layout: str = "monuseg", split_file: str | None = None,
                    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), split_seed: int = 0,
                    fractions: tuple[str, ...] = ("all", "4pct", "0.5pct"), seeds: tuple[int, ...] = (0,),
                    patch_size: int = 200) -> dict:
    """Prepare a dataset; returns the report that is also written to ``<output_dir>/prepare_report.json``.

    Args:
        source_dir: the lab's folder (see ``layout``).
        output_dir: where everything is written; must not lie inside ``source_dir``.
        layout: ``monuseg`` or ``folder`` (module docstring).
        split_file: JSON with ``train`` / ``validation`` / ``test`` name lists; None: ``split_lvit.json`` in
            ``source_dir`` if there is one, else a seeded split (``split_fractions``, ``split_seed``).
        fractions: any of ``all``, ``4pct``, ``0.5pct``.
        seeds: one set of fraction datalists per seed.
        patch_size: side of the labelled square patch in pixels.
    """
    if source_dir is None:
        raise ValueError("no source folder given: run with --source_dir <folder with images/ and instances/>")
    source, output = Path(source_dir).resolve(), Path(output_dir).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: source folder not found")
    if output == source or source in output.parents:
        raise ValueError(f"{output}: the output folder must not be inside the source folder {source}")
    unknown = [fraction for fraction in fractions if fraction not in FRACTIONS]
    if unknown:
        raise ValueError(f"unknown fractions {unknown}; choose from {list(FRACTIONS)}")
    cases = find_cases(source, layout)
    if split_file is None and (source / "split_lvit.json").is_file():
        split_file = str(source / "split_lvit.json")
    split = read_split(split_file, cases) if split_file else seeded_split(cases, split_fractions, split_seed)

    entries, training = {}, {}  # training: name -> (image, instances), the fractions cut patches from these
    report = {"source_dir": str(source), "layout": layout, "split_file": split_file, "splits": {}, "fractions": {}}
    for split_name in SPLITS:
        nuclei = regions = 0
        for name in tqdm(split[split_name], desc=f"prepare {split_name}", unit="image"):
            image, instances, n_regions = load_case(cases[name])
            if split_name == "training":
                training[name] = image, instances
            entries[name] = write_case(output / "cases", name, image, instances)
            nuclei, regions = nuclei + int(instances.max()), regions + n_regions
        report["splits"][split_name] = {"images": len(split[split_name]), "nuclei": nuclei,
                                        "annotated_regions": regions}

    full = {split_name: [relative_entry(entries[name], output) for name in split[split_name]] for split_name in SPLITS}
    for fraction in fractions:
        for seed in (seeds if fraction != "all" else (None,)):
            tag = fraction if seed is None else f"{fraction}_seed{seed}"
            datalist = dict(full, fraction=fraction, seed=seed, patch_size=patch_size, patches=[])
            if fraction != "all":
                datalist["training"], report["fractions"][tag] = _patched_training(
                    training, output, tag, fraction, seed, patch_size, datalist["patches"])
            write_json_atomic(output / f"datalist_{tag}.json", datalist)
    write_json_atomic(output / "prepare_report.json", report)
    return report


def _patched_training(training: dict, output: Path, tag: str, fraction: str, seed: int, patch_size: int,
                      patches: list) -> tuple[list[dict], dict]:
    """Write the training cases of one label fraction (zero outside their patch); append each patch box to
    ``patches``; return the datalist entries and the fraction's counts."""
    entries, nuclei = [], 0
    for name in tqdm(images_with_patches(list(training), fraction, seed), desc=tag, unit="image"):
        image, instances = training[name]
        y0, x0 = patch_origin(name, seed, image.shape[:2], patch_size)
        keep = np.zeros(image.shape[:2], dtype=bool)
        keep[y0:y0 + patch_size, x0:x0 + patch_size] = True
        patched = relabel_sequential(np.where(keep, instances, 0))
        entry = write_case(output / "fractions" / tag, name, np.where(keep[..., None], image, 0), patched)
        entries.append(relative_entry(entry, output))
        patches.append({"image": name, "box": [x0, y0, x0 + patch_size, y0 + patch_size]})
        nuclei += int(patched.max())
    return entries, {"training_images": len(entries), "training_nuclei": nuclei}


def prepared_datalist(dataset_dir: str | os.PathLike, fraction: str = "all", seed: int = 0,
                      labels: str = "complete") -> str:
    """The datalist of a prepared dataset that training reads: ``datalist_<fraction>[_seed<seed>][_weak].json``
    (``weak``: the ``weak_labels`` workflow's output for that datalist)."""
    if fraction not in FRACTIONS:
        raise ValueError(f"fraction must be one of {list(FRACTIONS)}, got {fraction!r}")
    if labels not in ("complete", "weak"):
        raise ValueError(f"labels must be 'complete' or 'weak', got {labels!r}")
    tag = fraction if fraction == "all" else f"{fraction}_seed{seed}"
    return os.path.join(dataset_dir, f"datalist_{tag}{'_weak' if labels == 'weak' else ''}.json")


def print_report(report: dict, output: str | os.PathLike) -> None:
    """The report as a table on stdout."""
    print(f"\nprepared in {output}")
    print(f"{'split':<12}{'images':>8}{'nuclei':>8}{'regions':>9}")
    for split_name, counts in report["splits"].items():
        print(f"{split_name:<12}{counts['images']:>8}{counts['nuclei']:>8}{counts['annotated_regions']:>9}")
    for tag, counts in report["fractions"].items():
        print(f"{tag:<12}{counts['training_images']:>8}{counts['training_nuclei']:>8}   (training only)")
