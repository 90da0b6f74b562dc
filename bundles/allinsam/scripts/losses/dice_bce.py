"""Soft Dice (or Jaccard) + BCE on per-class binary masks, with an optional per-pixel weight.

Ours because MONAI's ``DiceCELoss`` switches to softmax cross-entropy when C > 1, while the P2 layout has one
independent binary mask per class; for C = 1 and no weight this equals ``DiceCELoss(sigmoid=True)``.
"""

import torch
import torch.nn.functional as F
from torch import nn

SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr = smooth_dr


def dice_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, jaccard: bool = False,
             weight_denominator: bool = True) -> torch.Tensor:
    """Scalar loss: soft Dice per (image, class), averaged, plus the pixel-mean BCE.

    Args:
        logits: (B, C, H, W) raw scores.
        target: (B, C, H, W) binary masks (float).
        weight: (B, C, H, W) per-pixel weight of both terms; None is 1 everywhere.
        jaccard: soft Jaccard instead of Dice (MONAI's form: denominator 2 * (|p| + |y| - |p y|)).
        weight_denominator: weight the Dice denominator too (False: numerator only, as the MOCL authors' code).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    probability = torch.sigmoid(logits)
    weight = torch.ones_like(target) if weight is None else weight
    spatial = tuple(range(2, logits.ndim))
    intersection = (weight * probability * target).sum(spatial)
    if weight_denominator:
        denominator = (weight * probability).sum(spatial) + (weight * target).sum(spatial)
    else:
        denominator = probability.sum(spatial) + target.sum(spatial)
    if jaccard:
        denominator = 2.0 * (denominator - intersection)
    dice = 1.0 - (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return dice.mean() + (weight * bce).mean()


class DiceBCELoss(nn.Module):
    """``dice_bce`` as a loss module: forward(logits (B, C, H, W), target (B, C, H, W)) -> scalar."""

    def __init__(self, jaccard: bool = False):
        super().__init__()
        self.jaccard = jaccard

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_bce(input, target, jaccard=self.jaccard)
