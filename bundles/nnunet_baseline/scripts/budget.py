"""nnU-Net training for a wall-clock budget instead of an epoch count (the allinsam bundle's ``budget_minutes``)."""

import json
import math
import time
from pathlib import Path

import torch

BUDGET_FILE = "training_budget.json"


def spent_seconds(fold_folder: Path) -> float:
    """Training seconds a budgeted run in ``fold_folder`` has spent so far (0 when it has not started)."""
    state = Path(fold_folder) / BUDGET_FILE
    return float(json.loads(state.read_text())["elapsed_s"]) if state.is_file() else 0.0


def train_for_minutes(trainer, minutes: float) -> None:
    """nnU-Net's ``run_training`` loop, stopped at the first epoch end past ``minutes`` of training.

    The loop is repeated here because nnU-Net fixes its epoch range when the loop starts. After each epoch the
    trainer's ``num_epochs`` and its poly learning-rate schedule are set to the epochs that fit the budget at the mean
    epoch time so far, so the learning rate anneals over the budget as over an epoch count. The seconds spent are
    kept in ``<fold folder>/training_budget.json``: a resumed run spends only what is left.
    """
    if minutes <= 0:
        raise ValueError(f"budget_minutes must be positive, got {minutes}")
    budget, state = 60.0 * minutes, Path(trainer.output_folder) / BUDGET_FILE
    spent, started = spent_seconds(trainer.output_folder), time.monotonic()
    trainer.on_train_start()
    if trainer.current_epoch and spent:  # resumed: the schedule of what was spent so far
        _plan_epochs(trainer, budget, trainer.current_epoch, spent)
    while spent + time.monotonic() - started < budget:
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            outputs = [trainer.validation_step(next(trainer.dataloader_val))
                       for _ in range(trainer.num_val_iterations_per_epoch)]
            trainer.on_validation_epoch_end(outputs)
        _plan_epochs(trainer, budget, trainer.current_epoch + 1, spent + time.monotonic() - started)
        trainer.on_epoch_end()
        written = state.with_suffix(".tmp")
        written.write_text(json.dumps({"elapsed_s": spent + time.monotonic() - started, "minutes": minutes,
                                       "epochs": trainer.current_epoch}))
        written.replace(state)
    trainer.on_train_end()


def _plan_epochs(trainer, budget: float, epochs_done: int, elapsed: float) -> None:
    """Set the trainer's epoch count and poly schedule length to the epochs that fit ``budget`` seconds at the mean
    epoch time of ``epochs_done`` epochs in ``elapsed`` seconds (just those epochs once the budget is spent)."""
    planned = max(epochs_done + 1, math.ceil(budget * epochs_done / elapsed)) if elapsed < budget else epochs_done
    trainer.num_epochs = trainer.lr_scheduler.max_steps = planned
