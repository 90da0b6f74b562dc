from .dice_bce import DiceBCELoss, dice_bce
from .mocl import MOCL_VARIANTS, MOCLLoss, mocl_weights, prototype_similarity

__all__ = ["DiceBCELoss", "MOCLLoss", "MOCL_VARIANTS", "dice_bce", "mocl_weights", "prototype_similarity"]
