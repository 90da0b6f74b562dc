"""Train and evaluate a bundle over label types and seeds: the allinsam bundle (``run``, tabulated by ``table``) or
the nnunet_baseline bundle (``nnunet``, scored with ``scripts/compare.py``) on the same datalists (docs/method.md
section 6).

    python scripts/train_grid.py run --fraction 0.5pct --labels complete,weak --seeds 0,1,2 --epochs 15
    python scripts/train_grid.py table --runs_dir runs/grid_0.5pct --output docs/results/allinsam_0.5pct_cpu
    python scripts/train_grid.py nnunet --fraction 0.5pct --epochs 10 --iterations_per_epoch 50   # the baseline
    python scripts/train_grid.py nnunet --fraction 0.5pct --budget_minutes 10 --iterations_per_epoch 50  # same clock

Each run is the bundle's own two commands (``monai.bundle run training`` with ``configs/datasets/monuseg.json``
merged, then ``inference.json`` + ``evaluate.json`` on the test split), logged to ``<runs_dir>/<tag>/*.log``.
A finished run (its ``test/metrics.csv`` exists) is skipped, so a killed grid resumes where it stopped.
"""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "allinsam" / "configs"
import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)

from scripts import flag  # noqa: E402  (the bundle's package)
from scripts.data import prepared_datalist  # noqa: E402
from scripts.metrics import METRIC_NAMES  # noqa: E402
from scripts.training import last_checkpoint  # noqa: E402

# options that change the network's parameters: evaluation must build the same network as training
NETWORK_OPTIONS = ("trainable", "backbone", "sam_checkpoint", "sam_checkpoint_sha256")
TABLE_COLUMNS = ("dice", "auc", "recall", "precision", "best_f1", "iou", "adj", "aji", "detection_f1", "pq")


def _check_options(config_files: list[Path], options: dict) -> None:
    """Refuse an extra ``--key value`` that no config file defines (a typo, or fire's ``--help`` taken as an option),
    before any run starts."""
    known = set().union(*(json.loads(Path(path).read_text()) for path in config_files))
    unknown = sorted(key for key in options if key.split("#")[0] not in known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join('--' + key for key in unknown)}: not a key of "
                         f"{', '.join(str(Path(path).relative_to(REPO)) for path in config_files)} "
                         f"(help: `python scripts/{Path(__file__).name} <command> -- --help`)")


def _bundle_command(config_files: list[Path], run_id: str | None, overrides: dict) -> list[str]:
    files = "[" + ",".join(f"'{path}'" for path in config_files) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run"] + ([run_id] if run_id else []) + ["--config_file", files]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def _run_logged(command: list[str], log: Path) -> float:
    """Run ``command`` with output appended to ``log`` (a resumed run keeps the history); seconds taken. Raises with
    the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(command)} failed ({log}):\n" + "\n".join(tail))
    return time.perf_counter() - start


def training_steps(checkpoint: Path | None) -> int | None:
    """Optimizer steps a training run took, from its last checkpoint's trainer state."""
    if checkpoint is None:
        return None
    import torch
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["trainer"]["iteration"])


def seed_list(seeds: str | int | tuple) -> list[int]:
    """Fire's ``--seeds 0,1,2`` (a string, an int or a tuple) -> [0, 1, 2]."""
    return [int(seed) for seed in (str(seeds).split(",") if isinstance(seeds, (str, int)) else seeds)]


def _grid(labels: str | tuple, seeds: str | int | tuple) -> tuple[list[str], list[int]]:
    """Fire's ``--labels complete,weak --seeds 0,1,2`` -> (labels, seeds) lists."""
    return (labels.split(",") if isinstance(labels, str) else list(labels)), seed_list(seeds)


def run(fraction: str = "0.5pct", labels: str | tuple = ("complete", "weak"), seeds: str | tuple = (0, 1, 2),
        epochs: int = 15, val_interval: int = 5, val_crop_size: int = 256, sw_overlap: float = 0.0,
        checkpoint: str = "last", dataset_dir: str = "data/monuseg", runs_dir: str | None = None,
        calibrate: bool = False, evaluate: bool = True, **overrides) -> str:
    """Train + evaluate every (labels, seed); extra ``--key value`` options go to training (e.g. ``--batch_size 1``).

    ``checkpoint``: ``last`` (the final epoch; for short CPU budgets, where the validation Dice of a few
    validation crops is a noisy pick) or ``best`` (``model.pt``, best validation Dice).
    ``calibrate``: choose the threshold and the instance split on the validation images (the bundle's
    ``calibrate.json``) and score the test split with them, instead of 0.5 and components.
    ``evaluate``: False trains only (its time and steps go to ``timing.csv``); a later run with True evaluates the
    trained runs without training them again, so budgeted trainings can run alone on the machine and their
    evaluations later, beside other work.
    """
    if checkpoint not in ("last", "best"):
        raise ValueError(f"checkpoint must be 'last' or 'best', got {checkpoint!r}")
    calibrate, evaluate = flag(calibrate, "calibrate"), flag(evaluate, "evaluate")
    _check_options([CONFIGS / "train.json", CONFIGS / "datasets" / "monuseg.json"], overrides)
    labels, seeds = _grid(labels, seeds)
    runs = Path(runs_dir or REPO / "runs" / f"grid_{fraction}")
    dataset = {"dataset_dir": dataset_dir, "fraction": fraction}
    for seed in seeds:
        for label in labels:
            run_dir = runs / f"{fraction}_{label}_seed{seed}"
            if (run_dir / "test" / "metrics.csv").is_file():
                print(f"{run_dir.name}: done already")
                continue
            timing = run_dir / "timing.csv"
            seconds = _read_timing(timing)["train_s"]
            if seconds != seconds:  # not trained yet (NaN)
                train = {**dataset, "labels": label, "seed": seed, "epochs": epochs, "val_interval": val_interval,
                         "val_crop_size": val_crop_size, "ckpt_dir": run_dir / "models",
                         "output_dir": run_dir / "tensorboard", **overrides}
                seconds = _run_logged(_bundle_command(
                    [CONFIGS / "train.json", CONFIGS / "datasets" / "monuseg.json"], "training", train),
                    run_dir / "train.log")
                steps = training_steps(last_checkpoint(run_dir / "models"))
                timing.write_text(f"train_s,evaluate_s,steps\n{seconds:.1f},,{steps}\n")
            if not evaluate:
                print(f"{run_dir.name}: trained in {seconds:.0f} s")
                continue
            weights = run_dir / "models" / "model.pt" if checkpoint == "best" else last_checkpoint(run_dir / "models")
            inference = {**dataset, "labels": label, "ckpt_path": weights, "sw_overlap": sw_overlap,
                         **{key: overrides[key] for key in NETWORK_OPTIONS if key in overrides}}
            chosen = _calibrated(run_dir, inference) if calibrate else {}
            evaluate = {**inference, "output_dir": run_dir / "test", **chosen}
            eval_seconds = _run_logged(_bundle_command(
                [CONFIGS / "inference.json", CONFIGS / "evaluate.json", CONFIGS / "datasets" / "monuseg.json"],
                None, evaluate), run_dir / "evaluate.log")
            with open(timing) as handle:
                trained = next(csv.DictReader(handle))  # written once, when training finished
            timing.write_text(f"train_s,evaluate_s,steps\n{trained['train_s']},{eval_seconds:.1f},{trained['steps']}\n")
            print(f"{run_dir.name}: trained in {seconds:.0f} s ({trained['steps']} steps), "
                  f"evaluated in {eval_seconds:.0f} s")
    return str(runs)


def _calibrated(run_dir: Path, inference: dict) -> dict:
    """The bundle's ``calibrate.json`` on the validation split (predictions into ``<run_dir>/validation``); the
    ``--calibration_file`` option that makes evaluation use its choice."""
    calibration = run_dir / "validation" / "calibration.json"
    if not calibration.is_file():
        _run_logged(_bundle_command(
            [CONFIGS / "inference.json", CONFIGS / "calibrate.json", CONFIGS / "datasets" / "monuseg.json"], None,
            {**inference, "output_dir": run_dir / "validation", "calibration_file": calibration}),
            run_dir / "validation.log")
    return {"calibration_file": calibration}


def nnunet(fraction: str = "0.5pct", labels: str | tuple = ("complete", "weak"), seeds: str | tuple = (0, 1, 2),
           epochs: int = 1000, iterations_per_epoch: int = 250, use_mirroring: bool = True, tile_step_size: float = 0.5,
           dataset_dir: str = "data/monuseg", runs_dir: str | None = None, **overrides) -> str:
    """The nnunet_baseline bundle on the same datalists: train (``configs/train.json``) and predict the test split
    (``configs/inference.json``) per (labels, seed), into ``<runs_dir>/<fraction>_<labels>_seed<s>/test``; score
    with ``scripts/compare.py``. Extra ``--key value`` options go to training (e.g. ``--val_iterations_per_epoch``).
    A run whose ``timing.csv`` exists is skipped; a killed training resumes from nnU-Net's latest checkpoint."""
    configs = REPO / "bundles" / "nnunet_baseline" / "configs"
    use_mirroring = flag(use_mirroring, "use_mirroring")
    _check_options([configs / "train.json", configs / "datasets" / "monuseg.json"], overrides)
    labels, seeds = _grid(labels, seeds)
    runs = Path(runs_dir or REPO / "runs" / f"nnunet_{fraction}")
    for seed in seeds:
        for label in labels:
            run_dir = runs / f"{fraction}_{label}_seed{seed}"
            if (run_dir / "timing.csv").is_file():
                print(f"{run_dir.name}: done already")
                continue
            dataset = {"datalist": prepared_datalist(dataset_dir, fraction, labels=label),
                       "dataset_name": f"MoNuSeg_{fraction.replace('.', 'p')}_{label}", "work_dir": run_dir / "nnunet"}
            train = {**dataset, "seed": seed, "epochs": epochs, "iterations_per_epoch": iterations_per_epoch,
                     **overrides}
            seconds = _run_logged(_bundle_command([configs / "train.json", configs / "datasets" / "monuseg.json"],
                                                  "training", train), run_dir / "train.log")
            predict = {**dataset, "output_dir": run_dir / "test", "use_mirroring": use_mirroring,
                       "tile_step_size": tile_step_size}
            predict_seconds = _run_logged(_bundle_command(
                [configs / "inference.json", configs / "datasets" / "monuseg.json"], None, predict),
                run_dir / "predict.log")
            (run_dir / "timing.csv").write_text(f"train_s,predict_s\n{seconds:.1f},{predict_seconds:.1f}\n")
            print(f"{run_dir.name}: trained in {seconds:.0f} s, predicted in {predict_seconds:.0f} s")
    return str(runs)


def _read_means(metrics_csv: Path) -> dict[str, float]:
    with open(metrics_csv) as handle:
        return {name: float(value) for name, value in csv.reader(handle)}


def _read_timing(timing: Path) -> dict[str, float]:
    """``train_s`` (whole training command, start-up included) and ``steps`` of a run's ``timing.csv``; NaN where
    not recorded."""
    row = {}
    if timing.is_file():
        with open(timing) as handle:
            row = next(csv.DictReader(handle))
    return {key: float(row[key]) if row.get(key) not in (None, "", "None") else float("nan")
            for key in ("train_s", "steps")}


def _read_postprocessing(metrics_csv: Path) -> str:
    """``threshold / instances`` the test split was scored with: ``calibrate.json``'s choice, else the defaults."""
    calibration = metrics_csv.parent.parent / "validation" / "calibration.json"
    if not calibration.is_file():
        return "0.5 / components"
    chosen = json.loads(calibration.read_text())
    return f"{chosen['threshold']:g} / {chosen['instances']}"


def _span(values: list[float], form: str) -> str:
    """``a-b`` over the seeds (``a`` when all equal; ``?`` when unknown)."""
    known = [value for value in values if value == value]
    if not known:
        return "?"
    low, high = form.format(min(known)), form.format(max(known))
    return low if low == high else f"{low}-{high}"


def table(runs_dir: str, output: str, hardware: str = "CPU, 2 cores", note: str = "") -> str:
    """Mean ± sd over seeds of the per-run test means, per (fraction, labels); writes ``output``.md and .csv."""
    rows = {}
    for metrics_csv in sorted(Path(runs_dir).glob("*/test/metrics.csv")):
        fraction, label, seed = metrics_csv.parent.parent.name.rsplit("_", 2)
        timing = _read_timing(metrics_csv.parent.parent / "timing.csv")
        rows.setdefault((fraction, label), []).append(
            (seed, _read_means(metrics_csv) | timing | {"post": _read_postprocessing(metrics_csv)}))
    if not rows:
        raise FileNotFoundError(f"{runs_dir}: no */test/metrics.csv (run `train_grid.py run` first)")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    header = ["labels", "data", "seeds", "train min", "steps", "threshold / instances"] + list(TABLE_COLUMNS)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with open(output.with_name(output.name + ".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["labels", "data", "seed", "train_s", "steps", "threshold_instances"] + list(METRIC_NAMES))
        for (fraction, label), runs in sorted(rows.items()):
            for seed, means in runs:
                writer.writerow([label, fraction, seed, means["train_s"], means["steps"], means["post"]]
                                + [f"{means[name]:.4f}" for name in METRIC_NAMES])
            values = {name: np.array([means[name] for _, means in runs]) for name in TABLE_COLUMNS}
            cells = [f"{values[name].mean():.4f} ± {values[name].std(ddof=1) if len(runs) > 1 else 0:.4f}"
                     for name in TABLE_COLUMNS]
            spent = _span([means["train_s"] / 60 for _, means in runs], "{:.1f}")
            steps = _span([means["steps"] for _, means in runs], "{:.0f}")
            post = ", ".join(sorted({means["post"] for _, means in runs}))
            lines.append("| " + " | ".join([label, fraction, str(len(runs)), spent, steps, post] + cells) + " |")
    text = (f"# All-in-SAM (LiteMedSAM) on the MoNuSeg test set (14 images)\n\n"
            f"Hardware: {hardware}. Mean ± sd over seeds of each run's mean over the test images; train min: the whole "
            f"training command (start-up and feature caching included), steps: optimizer steps; threshold / "
            f"instances: the post-processing the test split was scored with (chosen on the validation images by "
            f"the bundle's `calibrate.json`, or the defaults). {note}\n\n"
            + "\n".join(lines) + "\n")
    output.with_name(output.name + ".md").write_text(text)
    print(text)
    return str(output.with_name(output.name + ".md"))


if __name__ == "__main__":
    fire.Fire({"run": run, "nnunet": nnunet, "table": table}, serialize=lambda result: None)
