"""Prepare MoNuSeg 2018 for the bundles: instance maps, binary masks, tight boxes, datalists, label fractions.

    python scripts/prepare_monuseg.py --source_dir ../shared/data/monuseg --output_dir data/monuseg

Reads every ``<name>.tif`` under ``source_dir`` with its annotation, either the official ``<name>.xml``
polygons (one ``Region`` per nucleus) or a uint16 instance label map ``instance_masks/<name>.png``, and writes

    <output_dir>/cases/{images,labels,instances}/<name>.png   RGB uint8 / binary uint8 0-1 / instance ids uint16
    <output_dir>/cases/boxes/<name>.json                       tight boxes [x0, y0, x1, y1], end exclusive
    <output_dir>/fractions/<fraction>_seed<seed>/...           the same for the label-fraction training images
    <output_dir>/datalist_all.json, datalist_4pct_seed0.json, datalist_0.5pct_seed0.json
    <output_dir>/prepare_report.json                           counts of images and nuclei per split

Datalists hold ``training`` / ``validation`` / ``test`` lists of ``{"image", "label", "instances", "boxes"}``
with paths relative to the datalist. Fractions change only ``training``: ``4pct`` keeps one random 200x200
patch per training image, ``0.5pct`` one patch from each of three random training images (the other images
are left out); pixels outside the patches are 0 in the image and the labels. A patch is drawn from
``(seed, image name)`` alone, so ``0.5pct`` patches are a subset of the ``4pct`` patches of the same seed.
"""

import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)
import fire
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from scripts.data import (  # noqa: E402  (the bundle's package, on the path above)
    boxes_from_instances,
    read_instance_map,
    read_rgb_image,
    read_xml_polygons,
    relabel_sequential,
    write_json_atomic,
    write_png_atomic,
)

SPLITS = ("training", "validation", "test")
SPLIT_FILE_KEYS = {"training": "train", "validation": "validation", "test": "test"}
FRACTIONS = {"all": None, "4pct": None, "0.5pct": 3}  # fraction -> number of training images patched (None: all)
DEFAULT_SPLIT_FILE = "split_lvit.json"


@dataclass(frozen=True)
class Case:
    """One MoNuSeg image and its annotation file (``.xml`` polygons or ``.png`` instance map)."""

    name: str
    image: Path
    annotation: Path


def find_cases(source_dir: Path) -> dict[str, Case]:
    """Index ``source_dir`` recursively: every ``.tif`` image paired with its ``.xml`` or instance-map ``.png``."""
    images, annotations = {}, {}
    for path in sorted(source_dir.rglob("*")):
        suffix = path.suffix.lower()
        if suffix in (".tif", ".tiff"):
            target = images
        elif suffix == ".xml" or (suffix == ".png" and path.parent.name == "instance_masks"):
            target = annotations
        else:
            continue
        if path.stem in target:
            raise ValueError(f"{path}: a second file for {path.stem} (first: {target[path.stem]})")
        target[path.stem] = path
    return {name: Case(name, image, annotations[name]) for name, image in images.items() if name in annotations}


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
    if case.annotation.suffix.lower() == ".xml":
        polygons = read_xml_polygons(case.annotation)
        instances, regions = rasterise_polygons(polygons, image.shape[:2]), len(polygons)
    else:
        instances = read_instance_map(case.annotation)
        regions = len(np.unique(instances[instances > 0]))
        if instances.shape != image.shape[:2]:
            raise ValueError(
                f"{case.annotation}: instance map of size {instances.shape} does not match "
                f"the image {case.image} of size {image.shape[:2]}"
            )
    return image, relabel_sequential(instances), regions


def write_case(root: Path, name: str, image: np.ndarray, instances: np.ndarray) -> dict[str, str]:
    """Write image, binary label, instance map and boxes of one case under ``root``; return their paths."""
    boxes = boxes_from_instances(instances)
    paths = {key: root / key / f"{name}{ext}" for key, ext in
             (("images", ".png"), ("labels", ".png"), ("instances", ".png"), ("boxes", ".json"))}
    write_png_atomic(paths["images"], image)
    write_png_atomic(paths["labels"], (instances > 0).astype(np.uint8))
    write_png_atomic(paths["instances"], instances)
    write_json_atomic(paths["boxes"], {
        "image": paths["images"].name,
        "size": list(instances.shape),
        "instance_ids": list(range(1, len(boxes) + 1)),
        "boxes": boxes.tolist(),
    })
    return {"image": paths["images"], "label": paths["labels"], "instances": paths["instances"],
            "boxes": paths["boxes"]}


def patch_origin(name: str, seed: int, shape: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the random ``patch_size`` square of image ``name``, drawn from ``(seed, name)``."""
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


def read_split(split_file: Path, cases: dict[str, Case]) -> dict[str, list[str]]:
    """``{"training": names, "validation": names, "test": names}`` from a split JSON (keys train/validation/test)."""
    try:
        content = json.loads(split_file.read_text())
        split = {key: list(content[file_key]) for key, file_key in SPLIT_FILE_KEYS.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{split_file}: expected JSON with 'train', 'validation' and 'test' name lists ({error!r})")
    missing = sorted(name for names in split.values() for name in names if name not in cases)
    if missing:
        raise ValueError(f"{split_file}: {len(missing)} images have no image + annotation pair: {missing[:5]}")
    return split


def relative_entry(entry: dict[str, Path], base: Path) -> dict[str, str]:
    return {key: str(path.relative_to(base)) for key, path in entry.items()}


def prepare(
    source_dir: str = "../shared/data/monuseg",
    output_dir: str = "data/monuseg",
    split_file: str | None = None,
    fractions: tuple[str, ...] = ("all", "4pct", "0.5pct"),
    seeds: tuple[int, ...] = (0,),
    patch_size: int = 200,
) -> dict:
    """Prepare MoNuSeg; returns the report that is also written to ``<output_dir>/prepare_report.json``.

    Args:
        source_dir: the official MoNuSeg layout (``.tif`` images, ``.xml`` polygons or ``instance_masks/*.png``).
        output_dir: where everything is written; must not lie inside ``source_dir``.
        split_file: JSON with ``train`` / ``validation`` / ``test`` name lists; default ``source_dir/split_lvit.json``.
        fractions: any of ``all``, ``4pct``, ``0.5pct``.
        seeds: one set of fraction datalists per seed.
        patch_size: side of the labelled square patch in pixels.
    """
    source, output = Path(source_dir).resolve(), Path(output_dir).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: MoNuSeg source folder not found")
    if output == source or source in output.parents:
        raise ValueError(f"{output}: the output folder must not be inside the source folder {source}")
    unknown = [fraction for fraction in fractions if fraction not in FRACTIONS]
    if unknown:
        raise ValueError(f"unknown fractions {unknown}; choose from {list(FRACTIONS)}")
    cases = find_cases(source)
    split = read_split(Path(split_file) if split_file else source / DEFAULT_SPLIT_FILE, cases)

    entries, report = {}, {"source_dir": str(source), "splits": {}, "fractions": {}}
    training = {}  # name -> (image, instances): the fractions cut patches from these
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
                datalist["training"], nuclei = [], 0
                for name in tqdm(images_with_patches(split["training"], fraction, seed), desc=tag, unit="image"):
                    image, instances = training[name]
                    y0, x0 = patch_origin(name, seed, image.shape[:2], patch_size)
                    keep = np.zeros(image.shape[:2], dtype=bool)
                    keep[y0 : y0 + patch_size, x0 : x0 + patch_size] = True
                    patched = relabel_sequential(np.where(keep, instances, 0))
                    entry = write_case(output / "fractions" / tag, name, np.where(keep[..., None], image, 0), patched)
                    datalist["training"].append(relative_entry(entry, output))
                    datalist["patches"].append({"image": name, "box": [x0, y0, x0 + patch_size, y0 + patch_size]})
                    nuclei += int(patched.max())
                report["fractions"][tag] = {"training_images": len(datalist["training"]), "training_nuclei": nuclei}
            write_json_atomic(output / f"datalist_{tag}.json", datalist)

    write_json_atomic(output / "prepare_report.json", report)
    print_report(report, output)
    return report


def print_report(report: dict, output: Path) -> None:
    print(f"\nMoNuSeg prepared in {output}")
    print(f"{'split':<12}{'images':>8}{'nuclei':>8}{'regions':>9}")
    for split_name, counts in report["splits"].items():
        print(f"{split_name:<12}{counts['images']:>8}{counts['nuclei']:>8}{counts['annotated_regions']:>9}")
    for tag, counts in report["fractions"].items():
        print(f"{tag:<12}{counts['training_images']:>8}{counts['training_nuclei']:>8}   (training only)")


if __name__ == "__main__":
    try:
        fire.Fire(prepare, serialize=lambda report: None)  # the report is printed as a table already
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"prepare_monuseg: error: {error}")
