from .checkpoints import LAST_CHECKPOINT_PREFIX, last_checkpoint, resume_from_last_checkpoint, resume_or_start_from

__all__ = ["LAST_CHECKPOINT_PREFIX", "last_checkpoint", "resume_from_last_checkpoint", "resume_or_start_from"]
