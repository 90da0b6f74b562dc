"""The bundle on its own: unzipped from the zip the packager writes into a folder with no repository beside it, it
prepares a lab's plain folder of images and instance maps, makes weak labels, trains on them and evaluates."""

import csv
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import SAMPLE_CROPS, copy_bundle
from package_bundle import write_zip

from scripts.data import read_instance_map
from scripts.metrics import METRIC_NAMES

pytestmark = pytest.mark.slow  # five bundle workflows in subprocesses


def _run(bundle, lab, workflow: str, configs: list[str], *options: str) -> str:
    """``python -m monai.bundle run <workflow>`` of the unzipped bundle, from the lab folder, without the repository
    on the Python path; returns its output."""
    config_files = [str(bundle / "configs" / name) for name in configs]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file",
                             str(config_files), *options], cwd=lab, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"{workflow}: {result.stderr[-3000:]}"
    return result.stdout + result.stderr


def test_unzipped_bundle_prepares_weak_labels_trains_and_evaluates_a_plain_folder(tmp_path):
    source = copy_bundle(tmp_path / "source")  # the bundle as shipped: no weights, no runs
    write_zip(source, tmp_path / "allinsam.zip", {})
    with zipfile.ZipFile(tmp_path / "allinsam.zip") as archive:
        archive.extractall(tmp_path / "unzipped")
    bundle, lab, prepared_dir = tmp_path / "unzipped" / "allinsam", tmp_path / "lab", tmp_path / "prepared"
    assert not (bundle / "models" / "model.pt").exists()

    # a lab's data: images/ and instances/ of the same names (the shipped crops), no split file
    sample = json.loads((SAMPLE_CROPS / "datalist.json").read_text())
    names = []
    for entry in [e for split in ("training", "validation", "test") for e in sample[split]]:
        for folder, key in (("images", "image"), ("instances", "instances")):
            (lab / folder).mkdir(parents=True, exist_ok=True)
            (lab / folder / os.path.basename(entry[key])).write_bytes((SAMPLE_CROPS / entry[key]).read_bytes())
        names.append(os.path.basename(entry["image"])[:-len(".png")])

    _run(bundle, lab, "prepare", ["prepare.json"], "--source_dir", str(lab), "--dataset_dir", str(prepared_dir))
    prepared = json.loads((prepared_dir / "datalist_all.json").read_text())
    assert [len(prepared[s]) for s in ("training", "validation", "test")] == [3, 1, 1]  # seeded 70 / 10 / 20
    assert sorted(os.path.basename(e["image"])[:-4] for s in ("training", "validation", "test")
                  for e in prepared[s]) == sorted(names)
    for entry in prepared["training"]:  # instance maps pass through unchanged
        name = os.path.basename(entry["instances"])
        assert np.array_equal(read_instance_map(prepared_dir / entry["instances"]),
                              read_instance_map(lab / "instances" / name))

    _run(bundle, lab, "weak_labels", ["annotate.json"], "--datalist", str(prepared_dir / "datalist_all.json"))
    weak = json.loads((prepared_dir / "datalist_all_weak.json").read_text())
    assert weak["labels"] == "weak" and weak["test"] == prepared["test"]
    assert all(entry["label"].startswith("weak/all_weak/labels/") for entry in weak["training"])

    folder = ["datasets/folder.json"]
    _run(bundle, lab, "training", ["train.json", *folder], "--dataset_dir", str(prepared_dir),
         "--labels", "weak", "--epochs", "1", "--views", "3", "--val_interval", "1",
         "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "runs"))
    assert (tmp_path / "models" / "model.pt").is_file()

    _run(bundle, lab, "run", ["inference.json", "evaluate.json", *folder], "--dataset_dir", str(prepared_dir),
         "--ckpt_path", str(tmp_path / "models" / "model.pt"), "--output_dir", str(tmp_path / "eval"))
    with open(tmp_path / "eval" / "metrics.csv") as handle:
        means = {name: float(value) for name, value in csv.reader(handle)}
    assert set(means) == set(METRIC_NAMES) and 0.0 <= means["dice"] <= 1.0  # one step: learning is tested elsewhere
    with open(tmp_path / "eval" / "dice_raw.csv") as handle:
        scored = [row["filename"] for row in csv.DictReader(handle)]
    assert [os.path.basename(name) for name in scored] == [os.path.basename(e["image"]) for e in prepared["test"]]
    assert not (bundle / "prepared").exists() and not (bundle / "models" / "model.pt").exists()  # lab data stays out
