"""Training survives faults: a SIGKILL mid-epoch resumes from the last checkpoint with every piece of state, no
checkpoint is ever half-written or missing, and a NaN loss stops the run with a message and the last good checkpoint
kept. Real training config, real sample crops, embedded LiteMedSAM."""

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import BUNDLE, REPO, TRAINED_ALLINSAM_OPTIONS, bundle_workflow

from scripts.training import KeepUntilReplacedDiskSaver

TRAIN = BUNDLE / "configs" / "train.json"
VIEWS = 4  # cached views for the tail recipe (2 per crop); the adapter recipe trains on the 2 crops themselves


def _train_command(models, runs, epochs: int, trainable: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN),
            "--epochs", str(epochs), "--val_interval", "1", "--batch_size", "1", "--warmup_steps", "0",
            "--trainable", trainable, "--views", str(VIEWS), "--ckpt_dir", str(models), "--output_dir", str(runs)]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("trainable, steps_per_epoch, into_epoch_s", [("tail", VIEWS, 1.0), ("adapter", 2, 4.0)])
def test_sigkill_mid_epoch_then_the_same_command_resumes(tmp_path, trainable, steps_per_epoch, into_epoch_s):
    """Both recipes: cached features (a step of batch 1 takes about 3.5 s on 2 cores) and the adapter (about 5-8 s).
    Two epochs: killed in the second, resumed for the second only."""
    models, runs = tmp_path / "models", tmp_path / "runs"
    command = _train_command(models, runs, epochs=2, trainable=trainable)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not (models / "last_checkpoint_epoch=1.pt").exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(into_epoch_s)  # into epoch 2
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    kept = sorted(path.name for path in models.iterdir())
    assert kept == ["last_checkpoint_epoch=1.pt", "model.pt"]  # no temporary or half-written file
    at_kill = _load(models / "last_checkpoint_epoch=1.pt")  # loads: written whole
    assert at_kill["trainer"]["iteration"] == steps_per_epoch
    assert set(at_kill) >= {"optimizer", "lr_scheduler", "early_stop", "budget"}

    resumed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from {models / 'last_checkpoint_epoch=1.pt'}" in resumed.stdout
    assert "SupervisedTrainer - INFO - Epoch[1] Complete" not in resumed.stdout  # epoch 1 is not redone
    assert "SupervisedTrainer - INFO - Epoch[2] Complete" in resumed.stdout
    assert sorted(path.name for path in models.iterdir()) == ["last_checkpoint_epoch=2.pt", "model.pt"]
    final = _load(models / "last_checkpoint_epoch=2.pt")
    assert final["trainer"]["iteration"] == 2 * steps_per_epoch  # epoch 2 only, not 2 more
    assert final["lr_scheduler"]["last_epoch"] == 2 * steps_per_epoch  # the scheduler went on from where it stopped
    assert all(step["step"] == 2 * steps_per_epoch for step in final["optimizer"]["state"].values())  # and AdamW
    assert final["budget"]["elapsed_s"] > at_kill["budget"]["elapsed_s"]  # the training clock went on too


def test_early_stopping_and_best_model_state_survive_a_restart(trained_allinsam, tmp_path):
    _, trained = trained_allinsam
    models = tmp_path / "models"
    models.mkdir()
    checkpoint = _load(trained / "last_checkpoint_epoch=2.pt")
    checkpoint["early_stop"].update(counter=3, best_score=1e9)  # no validation can beat this score
    checkpoint["best_model"]["_saved"] = [(0.999, "model.pt")]  # nor this Dice
    torch.save(checkpoint, models / "last_checkpoint_epoch=2.pt")
    shutil.copy(trained / "model.pt", models / "model.pt")
    best_before = (models / "model.pt").read_bytes()

    workflow = bundle_workflow([TRAIN], "train", epochs=3, val_interval=1, early_stop_patience=100,
                               ckpt_dir=str(models), output_dir=str(tmp_path / "runs"), **TRAINED_ALLINSAM_OPTIONS)
    workflow.run()
    early_stop = workflow.parser.get_parsed_content("validate#early_stop")._handler
    assert (early_stop.counter, early_stop.best_score) == (4, 1e9)  # restored, then one more epoch without gain
    assert (models / "model.pt").read_bytes() == best_before  # a worse epoch-3 model did not replace the best
    assert _load(models / "last_checkpoint_epoch=3.pt")["early_stop"]["counter"] == 4


def test_an_old_checkpoint_is_removed_only_after_its_successor_is_on_disk(tmp_path):
    saver = KeepUntilReplacedDiskSaver(tmp_path)
    saver({"model": {"w": torch.ones(2)}}, "last_checkpoint_epoch=1.pt")
    saver.remove("last_checkpoint_epoch=1.pt")  # what ignite's Checkpoint calls before saving the next one
    assert (tmp_path / "last_checkpoint_epoch=1.pt").is_file()  # a kill here still leaves a checkpoint
    with pytest.raises((AttributeError, pickle.PicklingError)):
        saver({"model": {"w": lambda: None}}, "last_checkpoint_epoch=2.pt")  # a save that fails midway
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last_checkpoint_epoch=1.pt"]  # no partial file
    saver({"model": {"w": torch.zeros(2)}}, "last_checkpoint_epoch=2.pt")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last_checkpoint_epoch=2.pt"]
    saver.remove("model.pt")
    saver({"w": torch.ones(1)}, "model.pt")  # a fixed name is replaced in place, not removed
    assert torch.equal(_load(tmp_path / "model.pt")["w"], torch.ones(1))


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(trained_allinsam, tmp_path):
    _, trained = trained_allinsam
    models = tmp_path / "models"
    models.mkdir()
    for name in ("last_checkpoint_epoch=2.pt", "model.pt"):
        shutil.copy(trained / name, models / name)
    before = {path.name: path.read_bytes() for path in models.iterdir()}
    workflow = bundle_workflow([TRAIN], "train", epochs=4, val_interval=1, ckpt_dir=str(models),
                               output_dir=str(tmp_path / "runs"), **TRAINED_ALLINSAM_OPTIONS,
                               loss="$lambda prediction, label: (prediction * float('nan')).mean()")
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps the error of a config expression
        workflow.run()
    assert isinstance(caught.value.__cause__, FloatingPointError)
    assert re.fullmatch(r"training stopped at epoch 3, iteration 3: the loss is nan\. The last good checkpoint is "
                        + re.escape(str(models / "last_checkpoint_epoch=2.pt")) + "; .*", str(caught.value.__cause__))
    assert {path.name: path.read_bytes() for path in models.iterdir()} == before


def test_the_next_run_removes_what_a_kill_mid_write_left(tmp_path):
    """A SIGKILL while ``torch.save`` writes leaves ignite's temporary file (``tmpXXXXXXXX``); the checkpoint it was
    to replace is intact. The next run's saver deletes the leftover and nothing else."""
    import tempfile

    KeepUntilReplacedDiskSaver(tmp_path)({"model": {"w": torch.ones(2)}}, "last_checkpoint_epoch=1.pt")
    with tempfile.NamedTemporaryFile(delete=False, dir=tmp_path) as partial:  # as ignite's atomic save names it
        partial.write(pickle.dumps({"w": torch.ones(2)})[:40])
    (tmp_path / "tmp_notes.txt").write_text("a user's file")
    KeepUntilReplacedDiskSaver(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last_checkpoint_epoch=1.pt", "tmp_notes.txt"]
    assert torch.equal(_load(tmp_path / "last_checkpoint_epoch=1.pt")["model"]["w"], torch.ones(2))
