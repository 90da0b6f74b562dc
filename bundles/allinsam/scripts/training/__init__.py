from .budget import TrainingBudget, ValidateAtTheEnd
from .checkpoints import (
    LAST_CHECKPOINT_PREFIX,
    EarlyStopState,
    KeepUntilReplacedDiskSaver,
    StopOnNonFiniteLoss,
    last_checkpoint,
    resume_from_last_checkpoint,
    resume_or_start_from,
)
from .distributed import handlers_of_rank, init_distributed
from .feature_cache import (
    AugmentedViewd,
    FrozenFeaturesd,
    ViewCacheKey,
    feature_cache_dataset,
    frozen_weights_sha256,
    trainer_network,
    training_dataset,
    view_datalist,
)
from .parameter_groups import parameter_groups
from .precision import TRAIN_PRECISION_CHOICES, Autocast, fastest_train_precision

__all__ = [
    "TRAIN_PRECISION_CHOICES",
    "Autocast",
    "fastest_train_precision",
    "handlers_of_rank",
    "AugmentedViewd",
    "FrozenFeaturesd",
    "TrainingBudget",
    "ValidateAtTheEnd",
    "ViewCacheKey",
    "feature_cache_dataset",
    "frozen_weights_sha256",
    "trainer_network",
    "training_dataset",
    "view_datalist",
    "LAST_CHECKPOINT_PREFIX",
    "EarlyStopState",
    "KeepUntilReplacedDiskSaver",
    "StopOnNonFiniteLoss",
    "init_distributed",
    "parameter_groups",
    "last_checkpoint",
    "resume_from_last_checkpoint",
    "resume_or_start_from",
]
