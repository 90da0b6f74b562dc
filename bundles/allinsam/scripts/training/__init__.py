from .checkpoints import (
    LAST_CHECKPOINT_PREFIX,
    EarlyStopState,
    KeepUntilReplacedDiskSaver,
    StopOnNonFiniteLoss,
    last_checkpoint,
    resume_from_last_checkpoint,
    resume_or_start_from,
)
from .distributed import init_distributed

__all__ = [
    "LAST_CHECKPOINT_PREFIX",
    "EarlyStopState",
    "KeepUntilReplacedDiskSaver",
    "StopOnNonFiniteLoss",
    "init_distributed",
    "last_checkpoint",
    "resume_from_last_checkpoint",
    "resume_or_start_from",
]
