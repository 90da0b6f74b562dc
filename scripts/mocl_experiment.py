"""Plain fine-tuning vs MOCL refinement on the noisy two-class proxy task (P2's experiment; docs/method.md section 4).

    python scripts/simulate_lay_labels.py --dataset_dir data/monuseg --seeds 0 --test_crop_size 512
    python scripts/mocl_experiment.py run --seeds 0,1,2 --shared_before true --before_epochs 6 --refine_epochs 2 \\
        --runs_dir runs/mocl_shared
    python scripts/mocl_experiment.py table --runs_dir runs/mocl_shared --output docs/results/mocl_two_class_cpu

Per training seed, into ``<runs_dir>/seed<s>/``: ``before`` = ``configs/train.json`` on the lay labels (the "before
correction" model), then from its last checkpoint two arms with the same recipe (``configs/mocl_train.json``: SGD,
Nesterov, poly decay) and the same number of steps: ``plain`` (``--mocl_variant none``) and ``mocl``; each of the
three is scored on the test split against the clean truth by ``configs/evaluate.json`` (per class: Dice, instance
detection F1, ...). Finished steps are skipped, so a killed experiment resumes.
"""

import csv
from pathlib import Path

import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)
import fire
import numpy as np
from compare import _mean_sd, _wilcoxon_p  # noqa: E402
from train_grid import CONFIGS, _bundle_command, _run_logged, seed_list  # noqa: E402

from scripts import flag  # noqa: E402  (the bundle's package)
from scripts.training import last_checkpoint  # noqa: E402

DATASET = CONFIGS / "datasets" / "monuseg_two_class.json"
ARMS = ("before", "plain", "mocl")
TABLE_METRICS = ("detection_f1", "dice", "aji", "pq")


def run(seeds: str | int | tuple = (0, 1, 2), before_epochs: int = 3, refine_epochs: int = 1,
        mocl_variant: str = "paper", shared_before: bool = False, lay_seed: int = 0, dataset_dir: str = "data/monuseg",
        runs_dir: str = "runs/mocl", batch_size: int = 1, learning_rate: float = 0.0005,
        refine_learning_rate: float = 0.001, sw_overlap: float = 0.0, trainable: str = "adapter") -> str:
    """Train before / plain / MOCL per seed and evaluate each (see the module docstring); returns ``runs_dir``.

    ``shared_before``: one before-correction model (``<runs_dir>/before``, seed = the first seed) for every seed,
    so the seeds vary the refinement only (CPU budgets). ``trainable``: the recipe of every arm (``adapter``, as
    measured in docs/results/mocl_two_class_cpu; ``tail`` trains on cached views)."""
    seeds, shared_before = seed_list(seeds), flag(shared_before, "shared_before")
    dataset = {"dataset_dir": dataset_dir, "lay_seed": lay_seed, "labels": "lay", "trainable": trainable}
    train_files = [CONFIGS / "train.json", DATASET]
    refine_files = [CONFIGS / "train.json", CONFIGS / "mocl_train.json", DATASET]
    for seed in seeds:
        root = Path(runs_dir) / f"seed{seed}"
        common = {**dataset, "seed": seed, "batch_size": batch_size, "val_interval": 10 ** 6}  # no validation
        before = Path(runs_dir) / "before" if shared_before else root / "before"
        arms = {before: (train_files, {**common, "seed": seeds[0] if shared_before else seed,
                                       "epochs": before_epochs, "learning_rate": learning_rate})}
        for arm, variant in (("plain", "none"), ("mocl", mocl_variant)):
            arms[root / arm] = (refine_files, {**common, "epochs": refine_epochs,
                                               "learning_rate": refine_learning_rate, "mocl_variant": variant})
        for folder, (files, options) in arms.items():
            if folder != before:
                options["start_ckpt"] = last_checkpoint(before / "models")
            if not (folder / "models" / f"last_checkpoint_epoch={options['epochs']}.pt").is_file():
                seconds = _run_logged(_bundle_command(files, "training", {
                    **options, "ckpt_dir": folder / "models", "output_dir": folder / "tensorboard"}),
                    folder / "train.log")
                (folder / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
            if not (folder / "test" / "metrics.csv").is_file():
                _run_logged(_bundle_command([CONFIGS / "inference.json", CONFIGS / "evaluate.json", DATASET], None, {
                    **dataset, "ckpt_path": last_checkpoint(folder / "models"), "output_dir": folder / "test",
                    "sw_overlap": sw_overlap}), folder / "evaluate.log")
            print(f"seed {seed} {folder.name}: done")
    return runs_dir


def _per_image(folder: Path, metric: str) -> dict[str, list[float]]:
    """image name -> [class0, class1, ...] values of ``metric`` from MONAI's MetricsSaver ``<metric>_raw.csv``."""
    with open(folder / f"{metric}_raw.csv") as handle:
        rows = list(csv.DictReader(handle))
    columns = sorted(key for key in rows[0] if key.startswith("class"))
    return {Path(row["filename"]).stem: [float(row[column]) for column in columns] for row in rows}


def table(runs_dir: str = "runs/mocl", output: str = "docs/results/mocl_two_class_cpu", hardware: str = "CPU, 2 cores",
          classes: tuple = ("small", "large"), note: str = "") -> str:
    """Per class and arm: mean ± sd over seeds of the test means; paired Wilcoxon (per image, seed-averaged) of MOCL
    vs plain and MOCL vs before; writes ``output``.md / .csv / _per_image.csv / .png."""
    runs = sorted(Path(runs_dir).glob("seed*"))
    if not runs:
        raise FileNotFoundError(f"{runs_dir}: no seed*/ runs (run `mocl_experiment.py run` first)")
    values = {}  # (arm, metric) -> array (seeds, images, classes)
    for arm in ARMS:
        for metric in TABLE_METRICS:
            per_seed = [_per_image((run if (run / arm).is_dir() else run.parent) / arm / "test", metric)
                        for run in runs]  # a shared before-correction model lies beside the seeds
            names = sorted(per_seed[0])
            values[arm, metric] = np.array([[scores[name] for name in names] for scores in per_seed])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    header = ["class", "arm"] + [f"{metric}" for metric in TABLE_METRICS] + [
        f"p_{metric} vs plain" for metric in TABLE_METRICS[:2]] + [f"p_{metric} vs before" for metric in
                                                                   TABLE_METRICS[:2]]
    lines = [f"# MOCL vs plain fine-tuning, two-class proxy task ({hardware})", "",
             f"{len(runs)} training seeds, {len(names)} test images; mean ± sd over seeds of the per-seed test means "
             f"(NaN values skipped); p: two-sided Wilcoxon signed-rank test, paired by test image "
             f"(values averaged over seeds). "
             + note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with open(output.with_name(output.name + ".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "arm", "seed"] + list(TABLE_METRICS))
        for c, class_name in enumerate(classes):
            for arm in ARMS:
                for s, run in enumerate(runs):
                    writer.writerow([class_name, arm, run.name] + [
                        f"{np.nanmean(values[arm, metric][s, :, c]):.4f}" for metric in TABLE_METRICS])
                cells = [_mean_sd([np.nanmean(values[arm, metric][s, :, c]) for s in range(len(runs))])
                         for metric in TABLE_METRICS]
                p_values = ["" if arm != "mocl" else f"{_paired_p(values, metric, other, c):.4g}"
                            for other in ("plain", "before") for metric in TABLE_METRICS[:2]]
                lines.append("| " + " | ".join([class_name, arm] + cells + p_values) + " |")
    output.with_name(output.name + ".md").write_text("\n".join(lines) + "\n")
    with open(output.with_name(output.name + "_per_image.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "class", "arm"] + [f"{metric}_seed_mean" for metric in TABLE_METRICS])
        for i, name in enumerate(names):
            for c, class_name in enumerate(classes):
                for arm in ARMS:
                    writer.writerow([name, class_name, arm] + [
                        f"{np.nanmean(values[arm, metric][:, i, c]):.4f}" for metric in TABLE_METRICS])
    _plot(values, classes, output.with_name(output.name + ".png"), hardware)
    return str(output.with_name(output.name + ".md"))


def _paired_p(values: dict, metric: str, other: str, class_index: int) -> float:
    """Wilcoxon p of MOCL vs ``other`` on ``metric`` of one class, paired by image (each image's seed mean)."""
    mocl, baseline = (np.nanmean(values[arm, metric][:, :, class_index], axis=0) for arm in ("mocl", other))
    return _wilcoxon_p(mocl, baseline)


def _plot(values: dict, classes: tuple, path: Path, hardware: str) -> None:
    """Per class: each test image's instance F1 (seed mean) before, plain and MOCL, joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 4), sharey=True)
    for c, (axis, class_name) in enumerate(zip(np.atleast_1d(axes), classes)):
        per_arm = np.array([np.nanmean(values[arm, "detection_f1"][:, :, c], axis=0) for arm in ARMS])
        for image in per_arm.T:
            axis.plot(range(len(ARMS)), image, color="0.7", marker="o", markersize=3)
        axis.plot(range(len(ARMS)), per_arm.mean(axis=1), color="tab:red", marker="s", linewidth=2, label="mean")
        axis.set_xticks(range(len(ARMS)), ARMS)
        axis.set_title(f"class {class_name}")
        axis.set_ylabel("instance F1 (IoU 0.5) vs clean truth")
        axis.legend(loc="lower right")
    figure.suptitle(f"MOCL refinement on simulated lay labels ({hardware})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    fire.Fire({"run": run, "table": table})
