"""A two-class nuclei task with noisy "lay" labels made from MoNuSeg ground truth: a proxy for P2's private kidney
PAS/IF data (podocyte / mesangial cells annotated by lay annotators), NOT that data.

    python scripts/simulate_lay_labels.py --dataset_dir data/monuseg --seeds 0,1,2 --test_crop_size 512

Class rule (reproducible, documented in ``two_class/simulation.json``): a nucleus is ``large`` (class 2) when its
area in pixels is at least the median area of the training split's nuclei, else ``small`` (class 1).

Noise model (seeded by ``(seed, image name)``), applied to the training and validation images only; the test split
keeps the clean truth:

- missed nuclei: each nucleus is dropped with probability ``miss_rate``;
- boundaries: each kept nucleus is eroded or dilated (even odds) by 1..``boundary_radius`` px with probability
  ``boundary_rate`` (a nucleus eroded away counts as missed; dilation does not enter other nuclei);
- class flips: each kept nucleus gets the other class with probability ``flip_rate``;
- false nuclei: ``false_rate`` x (number of true nuclei) ellipses, sized like the image's nuclei, placed on
  background, of a random class.

Writes under ``<dataset_dir>/two_class/``: ``classes/<name>.png`` (clean class maps, uint8 0/1/2),
``lay_seed<s>/{labels,instances,classes}/<name>.png``, ``test/{images,instances,classes}/`` (central
``test_crop_size`` crops when given, for CPU budgets), ``datalist_clean.json``, ``datalist_lay_seed<s>.json`` (the
``configs/datasets/monuseg_two_class.json`` layout: ``image``, ``label`` (binary), ``instances``, ``classes``) and
``simulation.json``. Re-running with the same options rewrites identical files.
"""

import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)
import fire
import numpy as np
from scipy import ndimage
from tqdm import tqdm
from train_grid import seed_list  # noqa: E402

from scripts.data import read_instance_map, read_rgb_image, write_json_atomic, write_png_atomic  # noqa: E402

CLASSES = ("small", "large")
TEST_FOLDERS = {"image": "images", "label": "labels", "instances": "instances", "classes": "classes"}


@dataclass(frozen=True)
class LayNoise:
    """The noise model of the module docstring: probabilities per nucleus, ``boundary_radius`` in pixels."""

    miss_rate: float = 0.2
    boundary_rate: float = 0.5
    boundary_radius: int = 2
    flip_rate: float = 0.2
    false_rate: float = 0.1

    def __post_init__(self):
        for name in ("miss_rate", "boundary_rate", "flip_rate", "false_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.boundary_radius < 1:
            raise ValueError(f"boundary_radius must be at least 1 px, got {self.boundary_radius}")


def size_classes(instances: np.ndarray, threshold: float) -> np.ndarray:
    """Class id per instance id (index 0 = background): 2 (large) if area >= ``threshold`` px, else 1 (small)."""
    areas = np.bincount(instances.ravel())
    classes = np.where(areas >= threshold, 2, 1).astype(np.uint8)
    classes[0] = 0
    return classes


def _ellipse(shape: tuple[int, int], centre: tuple[int, int], axes: tuple[float, float], angle: float) -> np.ndarray:
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    dy, dx = rows - centre[0], cols - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    return ((dx * cos + dy * sin) / axes[0]) ** 2 + ((-dx * sin + dy * cos) / axes[1]) ** 2 <= 1.0


def _noisy_nuclei(instances: np.ndarray, classes: np.ndarray, rng: np.random.Generator, noise: LayNoise
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The true nuclei after misses, boundary errors and class flips: (instance map uint16, class map uint8)."""
    noisy = np.zeros(instances.shape, np.uint16)
    noisy_classes = np.zeros(instances.shape, np.uint8)
    background = instances == 0
    pad = noise.boundary_radius + 1
    next_id = 1
    for index, box in enumerate(ndimage.find_objects(instances)):
        if box is None or rng.random() < noise.miss_rate:
            continue
        instance_id = index + 1
        window = tuple(slice(max(s.start - pad, 0), s.stop + pad) for s in box)
        mask = instances[window] == instance_id
        if rng.random() < noise.boundary_rate:
            radius = int(rng.integers(1, noise.boundary_radius + 1))
            if rng.random() < 0.5:
                mask = ndimage.binary_erosion(mask, iterations=radius)
            else:
                mask = ndimage.binary_dilation(mask, iterations=radius) & (mask | background[window])
        mask &= noisy[window] == 0
        if not mask.any():
            continue
        label = int(classes[instance_id])
        if rng.random() < noise.flip_rate:
            label = 3 - label
        noisy[window][mask], noisy_classes[window][mask] = next_id, label
        next_id += 1
    return noisy, noisy_classes


def _add_false_nuclei(noisy: np.ndarray, noisy_classes: np.ndarray, instances: np.ndarray,
                      rng: np.random.Generator, false_rate: float) -> None:
    """Draw ``false_rate`` x (true nuclei) ellipses on free background, sized like the true nuclei, random class;
    written into ``noisy`` / ``noisy_classes`` in place."""
    areas = np.bincount(instances.ravel())[1:]
    radii = np.sqrt(areas[areas > 0] / np.pi)
    free = (instances == 0) & (noisy == 0)
    next_id = int(noisy.max()) + 1
    for _ in range(rng.binomial(len(areas), false_rate) if len(areas) else 0):
        radius = float(rng.choice(radii))
        candidates = np.flatnonzero(ndimage.binary_erosion(free, iterations=max(int(radius), 1)))
        if not candidates.size:
            break
        centre = np.unravel_index(int(rng.choice(candidates)), instances.shape)
        axes = (radius * rng.uniform(0.8, 1.25), radius * rng.uniform(0.8, 1.25))
        mask = _ellipse(instances.shape, centre, axes, rng.uniform(0, np.pi)) & free
        noisy[mask], noisy_classes[mask] = next_id, int(rng.integers(1, 3))
        free &= ~mask
        next_id += 1


def lay_annotation(instances: np.ndarray, classes: np.ndarray, rng: np.random.Generator, noise: LayNoise
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Clean instance map (H, W) and class per id -> noisy (instance map uint16, class map uint8), see the module."""
    noisy, noisy_classes = _noisy_nuclei(instances, classes, rng, noise)
    _add_false_nuclei(noisy, noisy_classes, instances, rng, noise.false_rate)
    return noisy, noisy_classes


def _centre_crop(array: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or min(array.shape[:2]) <= size:
        return array
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def _write_test_case(output: Path, entry: dict, instances: np.ndarray, class_map: np.ndarray,
                     crop_size: int | None) -> dict:
    """A test image with its clean truth (central ``crop_size`` crops when given) -> its datalist entry."""
    name = Path(entry["image"]).stem
    crop = {"image": _centre_crop(read_rgb_image(entry["image"]), crop_size),
            "instances": _centre_crop(instances, crop_size), "classes": _centre_crop(class_map, crop_size)}
    crop["label"] = (crop["instances"] > 0).astype(np.uint8)
    paths = {key: f"test/{folder}/{name}.png" for key, folder in TEST_FOLDERS.items()}
    for key, array in crop.items():
        write_png_atomic(output / paths[key], array)
    return paths


def _write_lay_case(output: Path, image: str, seed: int, instances: np.ndarray, class_of_id: np.ndarray,
                    noise: LayNoise) -> dict:
    """One image's lay labels for ``seed`` (seeded by the seed and the image name) -> its datalist entry."""
    name = Path(image).stem
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    noisy, noisy_classes = lay_annotation(instances, class_of_id, rng, noise)
    folder = f"lay_seed{seed}"
    write_png_atomic(output / folder / "instances" / f"{name}.png", noisy)
    write_png_atomic(output / folder / "labels" / f"{name}.png", (noisy > 0).astype(np.uint8))
    write_png_atomic(output / folder / "classes" / f"{name}.png", noisy_classes)
    return {"image": image, "label": f"{folder}/labels/{name}.png", "instances": f"{folder}/instances/{name}.png",
            "classes": f"{folder}/classes/{name}.png"}


def simulate(dataset_dir: str = "data/monuseg", seeds: str | int | tuple = (0,), miss_rate: float = 0.2,
             boundary_rate: float = 0.5, boundary_radius: int = 2, flip_rate: float = 0.2, false_rate: float = 0.1,
             test_crop_size: int | None = None) -> str:
    """Write the two-class task and its lay labels (see the module docstring); returns the output folder."""
    from monai.data import load_decathlon_datalist

    noise = LayNoise(miss_rate, boundary_rate, boundary_radius, flip_rate, false_rate)
    seeds = seed_list(seeds)
    dataset = Path(dataset_dir)
    datalist_path = dataset / "datalist_all.json"
    if not datalist_path.is_file():
        raise FileNotFoundError(f"{datalist_path}: not found; run scripts/prepare_monuseg.py first")
    splits = {key: load_decathlon_datalist(str(datalist_path), data_list_key=key, base_dir=str(dataset))
              for key in ("training", "validation", "test")}
    output = dataset / "two_class"
    instance_maps = {entry["instances"]: read_instance_map(entry["instances"])  # read once, used twice
                     for entries in splits.values() for entry in entries}
    training_areas = np.concatenate([np.bincount(instance_maps[entry["instances"]].ravel())[1:]
                                     for entry in splits["training"]])
    threshold = float(np.median(training_areas[training_areas > 0]))
    clean = {split: [] for split in splits}
    lay = {seed: {"training": [], "validation": []} for seed in seeds}
    for split, entries in splits.items():
        for entry in tqdm(entries, desc=f"two-class {split}", unit="image"):
            instances = instance_maps[entry["instances"]]
            class_of_id = size_classes(instances, threshold)
            if split == "test":
                clean["test"].append(_write_test_case(output, entry, instances, class_of_id[instances],
                                                      test_crop_size))
                continue
            name = Path(entry["image"]).stem
            write_png_atomic(output / "classes" / f"{name}.png", class_of_id[instances])
            image = os.path.relpath(entry["image"], output)
            clean[split].append({"image": image, "label": os.path.relpath(entry["label"], output),
                                 "instances": os.path.relpath(entry["instances"], output),
                                 "classes": f"classes/{name}.png"})
            for seed in seeds:
                lay[seed][split].append(_write_lay_case(output, image, seed, instances, class_of_id, noise))
    write_json_atomic(output / "datalist_clean.json", {"classes": list(CLASSES), **clean})
    for seed, lists in lay.items():
        write_json_atomic(output / f"datalist_lay_seed{seed}.json",
                          {"classes": list(CLASSES), **lists, "test": clean["test"]})
    write_json_atomic(output / "simulation.json", {
        "what": "proxy two-class task with simulated lay labels from MoNuSeg ground truth (not P2's data)",
        "classes": {"1": "small", "2": "large"}, "class_rule": "large if nucleus area >= median training area",
        "median_training_area_px": threshold, "seeds": seeds, **asdict(noise),
        "test_crop_size": test_crop_size, "source": json.loads(datalist_path.read_text()).get("fraction")})
    return str(output)


if __name__ == "__main__":
    fire.Fire(simulate)
