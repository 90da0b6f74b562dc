"""Resuming a killed or extended training run from the last epoch checkpoint written by ``CheckpointSaver``."""

import logging
import os
from pathlib import Path

import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

logger = logging.getLogger(__name__)
LAST_CHECKPOINT_PREFIX = "last"  # train.json's epoch CheckpointSaver writes <ckpt_dir>/last_checkpoint_epoch=<n>.pt


def last_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest ``last_*.pt`` in ``checkpoint_dir``, or None."""
    found = sorted(Path(checkpoint_dir).glob(f"{LAST_CHECKPOINT_PREFIX}_*.pt"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def resume_from_last_checkpoint(trainer: Engine, checkpoint_dir: str | os.PathLike, load_dict: dict) -> Path | None:
    """Attach MONAI's ``CheckpointLoader`` for the newest last-epoch checkpoint, if there is one: model, optimizer,
    scheduler and the trainer's epoch / iteration are restored when the trainer starts. Returns its path."""
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
