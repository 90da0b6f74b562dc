"""Score prediction folders of any number of runs with one metric code, and compare methods with paired tests.

    python scripts/compare.py table \
        --runs "allinsam=runs/grid_0.5pct/*/test,nnunet=runs/nnunet_0.5pct/*/predictions" \
        --datalist data/monuseg/datalist_all.json --output docs/results/comparison_0.5pct_cpu

A prediction folder holds ``<name>_prob.png`` (foreground probability x 255) and ``<name>_mask.png`` (0/1) per test
image, the layout both bundles write. Its run (fraction, labels, seed) is read from the first path component named
``<fraction>_<labels>_seed<seed>`` (e.g. ``0.5pct_weak_seed1``). Every folder is scored by
``bundles/allinsam/scripts/metrics`` against the datalist's test split; the outputs are

- ``<output>.md`` / ``.csv``: the table of docs/method.md section 6 (mean ± sd over seeds of each run's mean), with the
  paired Wilcoxon signed-rank p-value of each method against ``reference`` on the per-image Dice (and AJI) of the
  same setting (per image: the mean over seeds), and the paper's numbers beside;
- ``<output>_per_image.csv``: every image's metrics of every run;
- ``<output>_dice.png``: Dice vs label fraction, one line per method and labels, the paper's numbers as markers;
- ``<output>_panel.png``: one test image, each method's prediction in the paper's Fig. 3 colours (white true
  positive, green false positive, red false negative).
"""

import csv
import glob
import os
import re
from pathlib import Path

import fire
import numpy as np
from PIL import Image
from scipy.stats import wilcoxon
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)

from scripts.metrics import METRIC_NAMES, nuclei_metrics  # noqa: E402  (the allinsam bundle's package)

RUN_PATTERN = re.compile(r"^(?P<fraction>all|[0-9.]+pct)_(?P<labels>[A-Za-z]+)_seed(?P<seed>[0-9]+)$")
TABLE_COLUMNS = ("dice", "auc", "recall", "precision", "best_f1", "iou", "adj", "aji", "detection_f1")
TESTED_METRICS = ("dice", "aji")
FRACTION_PERCENT = {"0.5pct": 0.5, "4pct": 4.0, "all": 100.0}
# docs/method.md section 6 (P1, MoNuSeg test): Dice per (method, labels, fraction).
PAPER_DICE = {
    ("nnunet", "complete"): {"all": 0.8244, "4pct": 0.7920, "0.5pct": 0.7623},
    ("allinsam", "complete"): {"all": 0.8254, "4pct": 0.8134, "0.5pct": 0.7816},
    ("nnunet", "weak"): {"all": 0.8212, "4pct": 0.7913, "0.5pct": 0.7500},
    ("allinsam", "weak"): {"all": 0.8246, "4pct": 0.8099, "0.5pct": 0.7873},
}
# Fig. 3 of P1: true positive white, false positive green, false negative red, true negative black.
OUTCOME_COLOURS = np.array([[0, 0, 0], [255, 255, 255], [0, 200, 0], [220, 0, 0]], dtype=np.uint8)


def _read_png(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing prediction (each folder needs <name>_prob.png and <name>_mask.png "
                                f"for every test image)")
    with Image.open(path) as image:
        return np.asarray(image)


def _run_key(folder: Path) -> tuple[str, str, int]:
    for part in folder.parts:
        match = RUN_PATTERN.match(part)
        if match:
            return match["fraction"], match["labels"], int(match["seed"])
    raise ValueError(f"{folder}: no path component named <fraction>_<labels>_seed<seed> (e.g. 0.5pct_weak_seed0)")


def _test_cases(datalist: str) -> dict[str, tuple[str, str]]:
    """Test image name -> (image path, truth instance map (or mask) path), from the datalist's ``test`` split."""
    from monai.data import load_decathlon_datalist

    entries = load_decathlon_datalist(datalist, data_list_key="test",
                                      base_dir=os.path.dirname(os.path.abspath(datalist)))
    return {Path(entry["image"]).stem: (entry["image"], entry.get("instances", entry["label"])) for entry in entries}


def score_folder(folder: str, truths: dict[str, np.ndarray], instances: str = "components") -> dict[str, dict]:
    """Per test image name -> ``nuclei_metrics`` of ``<name>_prob.png`` / ``<name>_mask.png`` in ``folder``."""
    scores = {}
    for name, truth in truths.items():
        probability = _read_png(Path(folder) / f"{name}_prob.png").astype(np.float64) / 255
        mask = _read_png(Path(folder) / f"{name}_mask.png")
        scores[name] = nuclei_metrics(probability, truth, instances=instances, mask=mask)
    return scores


def _parse_runs(runs: str | dict) -> dict[str, list[Path]]:
    """``"method=glob,method=glob"`` (or a dict) -> method -> sorted prediction folders."""
    if isinstance(runs, str):
        pairs = [item.split("=", 1) for item in runs.split(",") if item]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"runs must be 'method=glob,method=glob', got {runs!r}")
        runs = {method: pattern for method, pattern in pairs}
    folders = {}
    for method, pattern in runs.items():
        found = sorted(Path(path) for path in glob.glob(pattern) if Path(path).is_dir())
        if not found:
            raise FileNotFoundError(f"{method}: no prediction folder matches {pattern!r}")
        folders[method] = found
    return folders


def _mean_sd(values: list[float]) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" if len(values) > 1 else f"{values.mean():.4f}"


def _wilcoxon_p(first: np.ndarray, second: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples; 1 when every difference is zero."""
    if np.allclose(first, second):
        return 1.0
    return float(wilcoxon(first, second).pvalue)


def _read_scored(scored: str, names: list[str]) -> dict[tuple, tuple[None, dict]]:
    """``"method=per_image.csv,..."``: the rows of ``method`` in a ``_per_image.csv`` this command wrote earlier (runs
    scored by this same code whose prediction folders are gone) -> the ``scores`` entries of ``table``."""
    scores = {}
    for item in (part for part in scored.split(",") if part):
        method, _, path = item.partition("=")
        with open(path) as handle:
            for row in csv.DictReader(handle):
                if row["method"] != method or row["image"] not in names:
                    continue
                key = (method, row["data"], row["labels"], int(row["seed"]))
                scores.setdefault(key, (None, {}))[1][row["image"]] = {m: float(row[m]) for m in METRIC_NAMES}
        if not any(key[0] == method for key in scores):
            raise ValueError(f"{path}: no per-image rows of method {method!r}")
    incomplete = [key for key, (_, per_image) in scores.items() if set(per_image) != set(names)]
    if incomplete:
        raise ValueError(f"{scored}: runs {incomplete} do not cover the {len(names)} test images")
    return scores


def table(runs: str | dict, datalist: str = "data/monuseg/datalist_all.json", output: str = "comparison",
          reference: str = "allinsam", instances: str = "components", hardware: str = "CPU, 2 cores",
          note: str = "", panel_image: str | None = None, scored: str | None = None) -> str:
    """Score every run folder, write the table (Markdown + CSV), the per-image CSV, the Dice figure and the panel.
    ``scored``: methods taken from an earlier per-image CSV instead of folders (``"nnunet=old_per_image.csv"``)."""
    folders = _parse_runs(runs)
    cases = _test_cases(datalist)
    truths = {name: _read_png(Path(truth)) for name, (_, truth) in cases.items()}
    names = sorted(truths)
    scores = _read_scored(scored, names) if scored else {}  # (method, fraction, labels, seed) -> {image: metrics}
    for method, method_folders in folders.items():
        for folder in tqdm(method_folders, desc=f"score {method}", unit="run"):
            key = (method, *_run_key(folder))
            if key in scores:
                raise ValueError(f"{folder}: a second folder for {key}")
            scores[key] = (folder, score_folder(str(folder), truths, instances))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_per_image(scores, names, output.with_name(output.name + "_per_image.csv"))
    settings = sorted({(fraction, labels) for _, fraction, labels, _ in scores}, key=lambda s: (-FRACTION_PERCENT.get(
        s[0], 0), s[1]))
    methods = list(folders) + sorted({method for method, *_ in scores} - set(folders))
    rows, summary = [], {}
    for fraction, labels in settings:
        per_image = {}
        for method in methods:
            seeds = sorted(seed for m, f, label, seed in scores if (m, f, label) == (method, fraction, labels))
            if not seeds:
                continue
            runs_of = [scores[(method, fraction, labels, seed)][1] for seed in seeds]
            means = {metric: [np.nanmean([run[name][metric] for name in names]) for run in runs_of]
                     for metric in TABLE_COLUMNS}
            per_image[method] = {metric: np.array([np.mean([run[name][metric] for run in runs_of]) for name in names])
                                 for metric in TESTED_METRICS}
            summary[(method, labels, fraction)] = (np.mean(means["dice"]), np.std(means["dice"], ddof=1)
                                                   if len(seeds) > 1 else 0.0)
            rows.append({"labels": labels, "method": method, "data": fraction, "seeds": len(seeds), **means})
        for row in rows:
            if (row["labels"], row["data"]) != (labels, fraction):
                continue
            for metric in TESTED_METRICS:
                row[f"p_{metric}"] = ("" if row["method"] == reference or reference not in per_image else
                                      _wilcoxon_p(per_image[row["method"]][metric], per_image[reference][metric]))
    _write_table(rows, output, reference, hardware, note, len(names))
    _plot_dice(summary, output.with_name(output.name + "_dice.png"), hardware)
    first = {}
    for (method, fraction, labels, seed), (folder, _) in sorted(scores.items()):
        if folder is not None:  # runs read from a per-image CSV have no predictions to draw
            first.setdefault((method, labels, fraction), folder)
    _plot_panel(first, panel_image or names[0], truths, cases, datalist,
                output.with_name(output.name + "_panel.png"))
    return str(output.with_name(output.name + ".md"))


def _write_per_image(scores: dict, names: list[str], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["method", "data", "labels", "seed", "image"] + list(METRIC_NAMES))
        for (method, fraction, labels, seed), (_, per_image) in sorted(scores.items()):
            for name in names:
                writer.writerow([method, fraction, labels, seed, name] +
                                [f"{per_image[name][metric]:.6f}" for metric in METRIC_NAMES])


def _write_table(rows: list[dict], output: Path, reference: str, hardware: str, note: str, images: int) -> None:
    columns = list(TABLE_COLUMNS)
    tests = [f"p_{metric}" for metric in TESTED_METRICS]
    with open(output.with_name(output.name + ".csv"), "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["labels", "method", "data", "seeds"] + [f"{c}_{s}" for c in columns for s in ("mean", "sd")]
                        + tests + ["paper_dice"])
        for row in rows:
            stats = []
            for column in columns:
                values = np.asarray(row[column])
                stats += [f"{values.mean():.4f}", f"{values.std(ddof=1):.4f}" if len(values) > 1 else ""]
            writer.writerow([row["labels"], row["method"], row["data"], row["seeds"]] + stats +
                            [_format_p(row.get(test, "")) for test in tests] + [_paper(row)])
    header = ["Label", "Method", "Data", "seeds"] + [_TITLES[c] for c in columns] + \
             [f"p ({_TITLES[m]} vs {reference})" for m in TESTED_METRICS] + ["paper Dice"]
    lines = [f"Test images: {images}; hardware: {hardware}. Mean ± sd over seeds of each run's mean over images; "
             f"p: two-sided paired Wilcoxon signed-rank test over the images (per image: mean over seeds).", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["labels"].capitalize(), row["method"], row["data"], str(row["seeds"])]
        cells += [_mean_sd(row[column]) for column in columns]
        cells += [_format_p(row.get(test, "")) for test in tests] + [_paper(row)]
        lines.append("| " + " | ".join(cells) + " |")
    output.with_name(output.name + ".md").write_text("\n".join(lines) + "\n")


_TITLES = {"dice": "Dice", "auc": "AUC", "recall": "Recall", "precision": "Precision", "best_f1": "bestF1",
           "iou": "IoU", "adj": "ADJ", "aji": "AJI", "detection_f1": "det. F1", "pq": "PQ"}


def _format_p(value) -> str:
    return "" if value == "" else f"{value:.3g}"


def _paper(row: dict) -> str:
    value = PAPER_DICE.get((row["method"], row["labels"]), {}).get(row["data"])
    return "" if value is None else f"{value:.4f}"


def _plot_dice(summary: dict, path: Path, hardware: str) -> None:
    """Dice (mean ± sd over seeds) vs label fraction (log axis), one line per (method, labels); paper as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    lines = sorted({(method, labels) for method, labels, _ in summary})
    for index, (method, labels) in enumerate(lines):
        colour = f"C{index}"
        points = sorted((FRACTION_PERCENT[f], *summary[(method, labels, f)]) for m, label, f in summary
                        if (m, label) == (method, labels) and f in FRACTION_PERCENT)
        x, mean, sd = (np.array(v) for v in zip(*points))
        axis.errorbar(x, mean, yerr=sd, marker="o", capsize=3, color=colour, label=f"{method}, {labels} (here)")
        paper = PAPER_DICE.get((method, labels), {})
        if paper:
            px = [FRACTION_PERCENT[f] for f in paper]
            axis.plot(px, list(paper.values()), linestyle=":", marker="*", markersize=9, color=colour,
                      label=f"{method}, {labels} (paper)")
    axis.set_xscale("log")
    axis.set_xticks([0.5, 4, 100], ["0.5 %", "4 %", "100 %"])
    axis.set_xlabel("labelled fraction of the training set")
    axis.set_ylabel("Dice, MoNuSeg test")
    axis.set_ylim(0, 1)
    axis.set_title(f"Dice vs label fraction ({hardware})", fontsize=9)
    axis.legend(fontsize=7, loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


def outcome_map(mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(H, W) prediction and truth (non-zero = foreground) -> (H, W, 3) uint8 in Fig. 3's colours."""
    prediction, truth = np.asarray(mask) > 0, np.asarray(truth) > 0
    outcome = np.where(prediction & truth, 1, np.where(prediction, 2, np.where(truth, 3, 0)))
    return OUTCOME_COLOURS[outcome]


def _plot_panel(folders: dict, name: str, truths: dict, cases: dict, datalist: str, path: Path) -> None:
    """The test image ``name`` and, per (method, labels, fraction) (its lowest seed), the outcome map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if name not in truths:
        raise ValueError(f"panel_image {name!r} is not a test image of {datalist}")
    image = _read_png(Path(cases[name][0]))
    panels = [("image", image)] + [(f"{m}, {label}, {f}", outcome_map(_read_png(Path(folder) / f"{name}_mask.png"),
                                                                      truths[name]))
                                   for (m, label, f), folder in sorted(folders.items())]
    columns = len(panels) if len(panels) <= 5 else 4
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows + 0.4), dpi=120, squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (title, picture) in zip(axes.ravel(), panels):
        axis.imshow(picture)
        axis.set_title(title, fontsize=8)
    figure.suptitle(f"{name}: white TP, green FP, red FN", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


if __name__ == "__main__":
    fire.Fire({"table": table})
