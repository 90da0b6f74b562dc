"""Checkpoints that survive a kill: atomic writes, the previous file kept until the new one is on disk, and resuming
a killed or extended training run (model, optimizer, scheduler, epoch, early-stopping and best-model state)."""

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, EarlyStopHandler

logger = logging.getLogger(__name__)
LAST_CHECKPOINT_PREFIX = "last"  # train.json's epoch Checkpoint writes <ckpt_dir>/last_checkpoint_epoch=<n>.pt
# the temporary file of an atomic write (tempfile.NamedTemporaryFile's names), left behind when a run is killed
# mid-write
PARTIAL_WRITE = re.compile(r"tmp[a-z0-9_]{8}")


class KeepUntilReplacedDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` with atomic writes (temporary file + rename, on rank 0 only), and an outdated checkpoint
    removed only once its successor is on disk. Own class because ignite's ``Checkpoint`` removes the old file
    *before* writing the new one (a kill in between leaves none), and MONAI's ``CheckpointSaver`` writes
    non-atomically (a kill mid-write leaves a truncated file)."""

    def __init__(self, dirname: str | os.PathLike):
        super().__init__(dirname, atomic=True, require_empty=False)
        self._outdated: list[str] = []
        remove_partial_writes(dirname)

    def remove(self, filename: str) -> None:
        self._outdated.append(filename)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, filename, metadata)
        for outdated in self._outdated:
            if outdated != filename:  # a fixed name such as model.pt was just replaced in place
                super().remove(outdated)
        self._outdated.clear()


def remove_partial_writes(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that a run killed while writing a checkpoint left in ``checkpoint_dir`` (the
    checkpoint they were to become was never renamed into place; the previous one is intact). Returns them."""
    partial = [path for path in Path(checkpoint_dir).glob("tmp*")
               if path.is_file() and PARTIAL_WRITE.fullmatch(path.name)]
    for path in partial:
        logger.info(f"{path}: removed, an unfinished checkpoint write of a killed run")
        path.unlink()
    return partial


class EarlyStopState:
    """The counter and best score of a MONAI ``EarlyStopHandler`` as a checkpointable object (the handler keeps them
    in the ignite ``EarlyStopping`` it builds in ``set_trainer`` and has no ``state_dict`` of its own)."""

    def __init__(self, handler: EarlyStopHandler):
        self.handler = handler

    def _early_stopping(self):
        if self.handler._handler is None:
            raise RuntimeError("call set_trainer on the EarlyStopHandler before saving or loading its state")
        return self.handler._handler

    def state_dict(self) -> dict:
        return dict(self._early_stopping().state_dict())

    def load_state_dict(self, state: Mapping) -> None:
        self._early_stopping().load_state_dict(state)


class StopOnNonFiniteLoss:
    """Stop training with an error naming the epoch, the iteration and the last good checkpoint as soon as the loss
    is NaN or infinite. Own handler because ignite's ``TerminateOnNan`` ends the run with exit status 0."""

    def __init__(self, checkpoint_dir: str | os.PathLike, loss_key: str = "loss"):
        self.checkpoint_dir, self.loss_key = checkpoint_dir, loss_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output[0][self.loss_key] if isinstance(output, list) else output[self.loss_key]
        loss = float(loss)
        if math.isfinite(loss):
            return
        kept = last_checkpoint(self.checkpoint_dir)
        raise FloatingPointError(
            f"training stopped at epoch {engine.state.epoch}, iteration {engine.state.iteration}: the loss is {loss}. "
            f"The last good checkpoint is {kept or 'none (no epoch has finished)'}; nothing after it was saved. "
            f"Lower --learning_rate or check the labels, then run the same command again to resume from it.")


def last_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest ``last_*.pt`` in ``checkpoint_dir``, or None."""
    found = sorted(Path(checkpoint_dir).glob(f"{LAST_CHECKPOINT_PREFIX}_*.pt"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def resume_from_last_checkpoint(trainer: Engine, checkpoint_dir: str | os.PathLike, load_dict: dict) -> Path | None:
    """Attach MONAI's ``CheckpointLoader`` (``torch.load(weights_only=True)``) for the newest last-epoch checkpoint,
    if there is one: every object of ``load_dict`` is restored when the trainer starts. Returns its path."""
    path = last_checkpoint(checkpoint_dir)
    if path is None:
        return None
    logger.info(f"resuming from {path} (use a new ckpt_dir, or --resume false, to start afresh)")
    CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location=torch.device("cpu")).attach(trainer)
    return path


def resume_or_start_from(trainer: Engine, checkpoint_dir: str | os.PathLike, load_dict: dict,
                         start_checkpoint: str | os.PathLike) -> Path:
    """Resume from the newest last-epoch checkpoint in ``checkpoint_dir`` if there is one, else start from the model
    weights of ``start_checkpoint`` (a ``model.pt`` or ``last_*.pt`` of an earlier training: fine-tuning).
    Returns the checkpoint used."""
    resumed = resume_from_last_checkpoint(trainer, checkpoint_dir, load_dict)
    if resumed is not None:
        return resumed
    start_checkpoint = Path(start_checkpoint)
    if not start_checkpoint.is_file():
        raise FileNotFoundError(f"{start_checkpoint}: no such checkpoint to start fine-tuning from (train the "
                                f"plain model first with configs/train.json, or pass --start_ckpt)")
    logger.info(f"starting from the weights of {start_checkpoint}")
    CheckpointLoader(load_path=str(start_checkpoint), load_dict={"model": load_dict["model"]},
                     map_location=torch.device("cpu")).attach(trainer)
    return start_checkpoint
