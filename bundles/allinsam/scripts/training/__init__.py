from .checkpoints import LAST_CHECKPOINT_PREFIX, last_checkpoint, resume_from_last_checkpoint

__all__ = ["LAST_CHECKPOINT_PREFIX", "last_checkpoint", "resume_from_last_checkpoint"]
