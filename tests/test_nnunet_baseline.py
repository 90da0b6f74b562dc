"""nnunet_baseline bundle: conversion accepted by nnU-Net's own integrity check, and a tiny real CPU training +
prediction through ``monai.bundle run`` on the real MoNuSeg sample crops.

The bundle's ``scripts`` package shares its name with the allinsam bundle's (MONAI's convention), so the bundle
runs in subprocesses, as users run it, and its conversion module is loaded from its file.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE_CROPS
from PIL import Image

BUNDLE = REPO / "bundles" / "nnunet_baseline"
CONFIGS = BUNDLE / "configs"


def _raw_dataset_module():
    spec = importlib.util.spec_from_file_location("nnunet_raw_dataset", BUNDLE / "scripts" / "raw_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sample_copy(tmp_path):
    """A writable copy of the sample crops (their datalist paths are relative)."""
    copy = tmp_path / "crops"
    shutil.copytree(SAMPLE_CROPS, copy)
    return copy


def test_conversion_passes_nnunet_integrity_check(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    raw = _raw_dataset_module()
    datalist = SAMPLE_CROPS / "datalist.json"
    folder = raw.write_raw_dataset(str(datalist), str(tmp_path / "nnUNet_raw"), "Dataset001_Crops",
                                   ("training", "validation"))
    dataset = json.loads((tmp_path / "nnUNet_raw" / "Dataset001_Crops" / "dataset.json").read_text())
    assert dataset["numTraining"] == 3 and dataset["file_ending"] == ".png"
    assert dataset["channel_names"] == {"0": "R", "1": "G", "2": "B"} and dataset["labels"]["nucleus"] == 1
    verify_dataset_integrity(folder, num_processes=1)  # nnU-Net's own check; raises on a bad dataset
    entry = json.loads(datalist.read_text())["training"][0]
    case = entry["image"].split("/")[-1][:-4]
    assert (tmp_path / "nnUNet_raw/Dataset001_Crops/imagesTr" / f"{case}_0000.png").read_bytes() == \
        (SAMPLE_CROPS / entry["image"]).read_bytes()
    # same data again: a no-op; different data under the same name: refused
    assert raw.write_raw_dataset(str(datalist), str(tmp_path / "nnUNet_raw"), "Dataset001_Crops",
                                 ("training", "validation")) == folder
    with pytest.raises(FileExistsError, match="different dataset"):
        raw.write_raw_dataset(str(datalist), str(tmp_path / "nnUNet_raw"), "Dataset001_Crops", ("training",))


def test_conversion_names_the_bad_file(tmp_path):
    raw = _raw_dataset_module()
    crops = _sample_copy(tmp_path)
    entry = json.loads((crops / "datalist.json").read_text())["training"][0]
    label = crops / entry["label"]
    Image.fromarray((np.asarray(Image.open(label)) > 0).astype(np.uint8) * 255).save(label)
    with pytest.raises(ValueError, match=f"{label.name}.*0 \\(background\\) / 1"):
        raw.write_raw_dataset(str(crops / "datalist.json"), str(tmp_path / "raw"), "Dataset002_Bad")
    image = crops / entry["image"]
    Image.open(image).convert("L").save(image)
    with pytest.raises(ValueError, match=f"{image.name}.*mode L"):
        raw.write_raw_dataset(str(crops / "datalist.json"), str(tmp_path / "raw"), "Dataset002_Bad")
    assert not (tmp_path / "raw" / "Dataset002_Bad").exists()


def _bundle(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


DATALIST = SAMPLE_CROPS / "datalist.json"
FOLD = "nnUNet_results/Dataset001_MoNuSeg/nnUNetTrainer__nnUNetPlans__2d/fold_all"


def _on_cpu(work_dir: Path) -> list[str]:
    return ["--work_dir", str(work_dir), "--device", "$torch.device('cpu')"]


def _training(work_dir: Path) -> list[str]:
    """Two steps an epoch; augmentation in the training process (``num_workers`` 0: nnU-Net's worker processes
    cost about 13 s of start-up a run, for two steps); one process in each of nnU-Net's fingerprint, integrity-check
    and preprocessing pools (each spawned process imports torch and MONAI again, for two crops)."""
    return ["training", "--config_file", str(CONFIGS / "train.json"), "--datalist", str(DATALIST),
            "--iterations_per_epoch", "2", "--val_iterations_per_epoch", "1", "--num_workers", "0",
            "--num_processes", "1", *_on_cpu(work_dir)]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """A work folder after one epoch of the sample crops: planned, preprocessed (nnU-Net's spawned worker pools, done
    once for the module) and trained."""
    work_dir = tmp_path_factory.mktemp("nnunet") / "work"
    _bundle(*_training(work_dir), "--epochs", "1")
    return work_dir


@pytest.mark.slow
def test_tiny_cpu_training_resume_and_prediction(one_epoch, tmp_path):
    work_dir = tmp_path / "work"
    shutil.copytree(one_epoch, work_dir)
    fold = work_dir / FOLD
    assert torch.load(fold / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 1
    # a second run with more epochs continues from the checkpoint instead of starting again
    second = _bundle(*_training(work_dir), "--epochs", "2")
    assert "planned and preprocessed already" in second.stdout
    assert torch.load(fold / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 2
    assert "Epoch 0" not in (second.stdout + second.stderr)
    # prediction of the test crops, in the allinsam bundle's layout
    predicted = _bundle("--config_file", str(CONFIGS / "inference.json"), "--datalist", str(DATALIST),
                        "--use_mirroring", "false", "--output_dir", str(tmp_path / "predictions"), *_on_cpu(work_dir))
    # the command line hands "false" over as a string (true in Python): scripts.flag reads it as False
    assert "nnU-Net prediction: mirroring off, tile step 0.5" in predicted.stdout
    for entry in json.loads(DATALIST.read_text())["test"]:
        name = entry["image"].split("/")[-1][:-4]
        image = np.asarray(Image.open(SAMPLE_CROPS / entry["image"]))
        probability = np.asarray(Image.open(tmp_path / "predictions" / f"{name}_prob.png"))
        mask = np.asarray(Image.open(tmp_path / "predictions" / f"{name}_mask.png"))
        assert probability.shape == mask.shape == image.shape[:2]
        assert set(np.unique(mask).tolist()) <= {0, 1}
        # the mask is the argmax of the two-class softmax: foreground exactly where the probability is above 1/2
        assert np.all(probability[mask == 1] >= 127) and np.all(probability[mask == 0] <= 128)


@pytest.mark.slow
def test_budgeted_training_stops_past_the_budget_and_resumes_with_what_is_left(one_epoch, tmp_path):
    work_dir = tmp_path / "work"
    shutil.copytree(one_epoch, work_dir, ignore=shutil.ignore_patterns("nnUNet_results"))  # planned, not trained
    train, fold = _training(work_dir), work_dir / FOLD
    _bundle(*train, "--budget_minutes", "0.05")  # 3 s: the first epoch ends past it
    spent = json.loads((fold / "training_budget.json").read_text())
    assert spent["epochs"] == 1 and spent["elapsed_s"] >= 3
    assert torch.load(fold / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 1
    assert "trained already (1 epochs)" in _bundle(*train, "--budget_minutes", "0.05").stdout
    # a longer budget goes on from the checkpoint for what is left, the poly schedule spread over the budget
    longer = _bundle(*train, "--budget_minutes", f"{(spent['elapsed_s'] + 6) / 60:.4f}")
    resumed = json.loads((fold / "training_budget.json").read_text())
    assert resumed["epochs"] >= 2 and resumed["elapsed_s"] >= spent["elapsed_s"] + 6
    assert torch.load(fold / "checkpoint_final.pth", weights_only=False)["current_epoch"] == resumed["epochs"]
    log = longer.stdout + longer.stderr
    assert "Epoch 0" not in log and "Epoch 1" in log
    rates = [float(line.rsplit(":", 1)[1]) for line in log.splitlines() if "Current learning rate" in line]
    assert rates and rates[0] < 0.0095  # nnU-Net's 0.01 decayed over the budget's few epochs, not over 1000

def test_grid_refuses_an_option_no_config_defines_before_running(tmp_path):
    import train_grid

    with pytest.raises(ValueError, match="--help: not a key of bundles/nnunet_baseline/configs/train.json"):
        train_grid.nnunet(runs_dir=str(tmp_path), help=True)  # fire's --help swallowed as an option
    with pytest.raises(ValueError, match="--batch_sise"):
        train_grid.run(runs_dir=str(tmp_path), batch_sise=1)
    assert not list(tmp_path.iterdir())  # nothing started


def test_grid_trains_alone_then_evaluates_without_training_again(tmp_path, monkeypatch):
    import train_grid

    commands = []

    def fake_run(command: list[str], log) -> float:
        """Stands in for the bundle's processes: training leaves a checkpoint, evaluation its metrics."""
        commands.append(command)
        options = {key: value for key, value in zip(command, command[1:]) if key.startswith("--")}
        if "training" in command:
            models = Path(options["--ckpt_dir"])
            models.mkdir(parents=True)
            torch.save({"trainer": {"iteration": 7}}, models / "last_checkpoint_epoch=1.pt")
            return 42.0
        Path(options["--output_dir"]).mkdir(parents=True)
        (Path(options["--output_dir"]) / "metrics.csv").write_text("dice,0.5\n")
        return 3.0

    monkeypatch.setattr(train_grid, "_run_logged", fake_run)
    train_grid.run(labels="weak", seeds="0", runs_dir=str(tmp_path), evaluate=False, budget_minutes=10)
    assert len(commands) == 1 and "training" in commands[0]
    assert (tmp_path / "0.5pct_weak_seed0/timing.csv").read_text() == "train_s,evaluate_s,steps\n42.0,,7\n"
    train_grid.run(labels="weak", seeds="0", runs_dir=str(tmp_path), budget_minutes=10)
    assert len(commands) == 2 and "training" not in commands[1]  # evaluated, not trained again
    assert (tmp_path / "0.5pct_weak_seed0/timing.csv").read_text() == "train_s,evaluate_s,steps\n42.0,3.0,7\n"


def test_grid_gives_nnunet_the_datalist_file_the_allinsam_bundle_names(tmp_path, monkeypatch):
    """The baseline reads the datalist by path (the naming rule lives in the allinsam bundle only): the grid passes
    the weak 4 % file to training and prediction, and the dataset config resolves an explicit ``--datalist``."""
    import train_grid
    from monai.bundle import ConfigParser

    commands = []

    def fake_run(command: list[str], log: Path) -> float:
        log.parent.mkdir(parents=True, exist_ok=True)
        commands.append(command)
        return 1.0

    monkeypatch.setattr(train_grid, "_run_logged", fake_run)
    train_grid.nnunet(fraction="4pct", labels="weak", seeds="1", runs_dir=str(tmp_path), dataset_dir="prepared")
    assert len(commands) == 2  # training, then prediction of the test split
    for command in commands:
        options = dict(zip(command, command[1:]))
        assert options["--datalist"] == str(Path("prepared") / "datalist_4pct_seed0_weak.json")
        assert options["--dataset_name"] == "MoNuSeg_4pct_weak" and "--fraction" not in options
    parser = ConfigParser()
    parser.read_config([CONFIGS / "train.json", CONFIGS / "datasets" / "monuseg.json"])
    assert parser.get_parsed_content("datalist") == str(Path("data/monuseg") / "datalist_0.5pct_seed0.json")
    parser.update({"datalist": "elsewhere/datalist_all.json"})
    assert parser.get_parsed_content("datalist") == "elsewhere/datalist_all.json"
