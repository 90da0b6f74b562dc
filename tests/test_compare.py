"""scripts/compare.py on synthetic prediction folders: per-image numbers, the Wilcoxon p-value, reproducibility."""

import csv
import json

import compare
import numpy as np
import pytest
from PIL import Image
from scipy.stats import wilcoxon


def _disks(shape, centres, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    instances = np.zeros(shape, np.uint16)
    for index, (y, x) in enumerate(centres, start=1):
        instances[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = index
    return instances


@pytest.fixture()
def synthetic(tmp_path):
    """6 test images with 4 disk nuclei; method ``good`` predicts radius 7 disks, ``poor`` radius 5 plus a false
    nucleus on some images, each as two seeds of the 0.5pct weak setting."""
    rng = np.random.default_rng(0)
    shape, test = (64, 64), []
    truths = {}
    for index in range(6):
        centres = [(16, 16), (16, 48), (48, 16), (48, 48)]
        name = f"case{index}"
        truths[name] = _disks(shape, centres, 8)
        image = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
        for kind, array in (("images", image), ("instances", truths[name]), ("labels", (truths[name] > 0) * 1)):
            (tmp_path / kind).mkdir(exist_ok=True)
            Image.fromarray(array.astype(np.uint8 if kind != "instances" else np.uint16)).save(
                tmp_path / kind / f"{name}.png")
        test.append({"image": f"images/{name}.png", "label": f"labels/{name}.png",
                     "instances": f"instances/{name}.png"})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "test": test}))
    for method, radius in (("good", 7), ("poor", 5)):
        for seed in (0, 1):
            folder = tmp_path / method / f"0.5pct_weak_seed{seed}" / "test"
            folder.mkdir(parents=True)
            for index, name in enumerate(truths):
                mask = _disks(shape, [(16, 16), (16, 48), (48, 16), (48, 48)], radius + (index % 3 == 0)) > 0
                if method == "poor" and index % 2:
                    mask[28:36, 28:28 + 2 * index + seed] = True
                probability = np.where(mask, 200, 30).astype(np.uint8)
                Image.fromarray(probability).save(folder / f"{name}_prob.png")
                Image.fromarray(mask.astype(np.uint8)).save(folder / f"{name}_mask.png")
    return tmp_path, truths


def _dice(a, b) -> float:
    a, b = a > 0, b > 0
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_compare_per_image_numbers_and_wilcoxon(synthetic):
    root, truths = synthetic
    runs = f"good={root}/good/*/test,poor={root}/poor/*/test"
    output = root / "out" / "cmp_0.5pct"  # a dot in the name: files are named by appending, not by suffix
    compare.table(runs, datalist=str(root / "datalist.json"), output=str(output), reference="good")
    with open(root / "out" / "cmp_0.5pct_per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 6
    dice = {}
    for row in rows:
        folder = root / row["method"] / f"0.5pct_weak_seed{row['seed']}" / "test"
        mask = np.asarray(Image.open(folder / f"{row['image']}_mask.png"))
        expected = _dice(mask, truths[row["image"]])
        assert float(row["dice"]) == pytest.approx(expected, abs=1e-6)
        dice.setdefault(row["method"], {}).setdefault(row["image"], []).append(expected)
    good = np.array([np.mean(dice["good"][name]) for name in sorted(truths)])
    poor = np.array([np.mean(dice["poor"][name]) for name in sorted(truths)])
    with open(root / "out" / "cmp_0.5pct.csv") as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    assert float(table["poor"]["p_dice"]) == pytest.approx(float(f"{wilcoxon(poor, good).pvalue:.3g}"))
    assert table["good"]["p_dice"] == ""
    seed_means = [np.mean([dice["poor"][name][seed] for name in truths]) for seed in (0, 1)]
    assert float(table["poor"]["dice_mean"]) == pytest.approx(np.mean(seed_means), abs=1e-4)
    assert float(table["poor"]["dice_sd"]) == pytest.approx(np.std(seed_means, ddof=1), abs=1e-4)
    for suffix in (".md", "_dice.png", "_panel.png"):
        assert (root / "out" / f"cmp_0.5pct{suffix}").stat().st_size > 0


def test_compare_is_byte_reproducible_and_names_missing_files(synthetic):
    root, _ = synthetic
    runs = f"good={root}/good/*/test,poor={root}/poor/*/test"
    outputs = []
    for attempt in ("a", "b"):
        output = root / attempt / "table"
        compare.table(runs, datalist=str(root / "datalist.json"), output=str(output), reference="good")
        outputs.append({p.name: p.read_bytes() for p in output.parent.iterdir()})
    assert outputs[0] == outputs[1]
    (root / "poor/0.5pct_weak_seed1/test/case3_prob.png").unlink()
    with pytest.raises(FileNotFoundError, match="case3_prob.png"):
        compare.table(runs, datalist=str(root / "datalist.json"), output=str(root / "c" / "table"))
