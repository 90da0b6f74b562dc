"""MOCL, molecular-oriented corrective learning (P2 section 3.3; docs/method.md section 4): Dice + BCE whose per-pixel
weights trust the annotation Y where the model is confident (W) and its decoder features agree with a prototype of
the annotation (S).

Two variants (``variant``):

- ``paper``: w = exp(W) * max(S, 0) on annotated pixels, weights detached, Dice weighted in numerator and
  denominator. Outside Y the weight is 1: the formula's ``exp(W) * Y * S * Y`` would give the background no loss at
  all (the model would learn to call everything nucleus), and a negative cosine would reward errors, hence max(S, 0).
- ``authors``: the authors' code: w_W = 1.5 ** (W * Y) (1 outside Y), w_S = S' * Y with S' min-max normalised over
  the batch, loss = (L(w_W) + L(w_S)) / 2, weights not detached, Dice weighted in the numerator only.
- ``none``: every weight 1, the plain Dice + BCE: fine-tuning without correction under the same recipe.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .dice_bce import dice_bce

MOCL_VARIANTS = ("paper", "authors", "none")


def prototype_similarity(confidence: torch.Tensor, target: torch.Tensor, features: torch.Tensor, k: int = 100
                         ) -> torch.Tensor:
    """Cosine similarity S (B, C, H, W) of every pixel's feature to its image's class prototype.

    The prototype of (image b, class c) is the mean feature of the k annotated pixels with the highest confidence
    (fewer if fewer are annotated), without gradient. S is 0 for a class with no annotated pixel.

    Args:
        confidence: W (B, C, H, W), foreground probability.
        target: Y (B, C, H, W), binary annotation.
        features: E (B, D, H, W), the decoder's per-pixel embedding.
    """
    batch, classes = target.shape[:2]
    unit = F.normalize(features, dim=1)  # (B, D, H, W)
    flat_features = features.detach().flatten(2)  # (B, D, HW)
    similarity = torch.zeros_like(confidence)
    for b in range(batch):
        for c in range(classes):
            annotated = target[b, c].flatten() > 0
            count = min(k, int(annotated.sum()))
            if count == 0:
                continue
            score = torch.where(annotated, confidence[b, c].detach().flatten(), torch.tensor(-1.0))
            top = score.topk(count).indices
            prototype = F.normalize(flat_features[b][:, top].mean(dim=1), dim=0)  # (D,)
            similarity[b, c] = torch.einsum("dhw,d->hw", unit[b], prototype)
    return similarity


def mocl_weights(logits: torch.Tensor, target: torch.Tensor, features: torch.Tensor, k: int = 100,
                 variant: str = "paper") -> tuple[torch.Tensor, ...]:
    """Per-pixel weights (B, C, H, W): ``paper`` -> (w,), ``authors`` -> (w_W, w_S). See the module's docstring."""
    if variant not in ("paper", "authors"):
        raise ValueError(f"variant must be 'paper' or 'authors', got {variant!r}")
    confidence = torch.sigmoid(logits)
    similarity = prototype_similarity(confidence, target, features, k)
    annotated = target > 0
    if variant == "paper":
        weight = torch.exp(confidence) * similarity.clamp(min=0.0)
        return (torch.where(annotated, weight, torch.ones_like(weight)).detach(),)
    low, high = similarity.min(), similarity.max()
    normalised = (similarity - low) / (high - low).clamp(min=1e-8)
    return 1.5 ** (confidence * target), normalised * target


class MOCLLoss(nn.Module):
    """forward(input, target, features=None) -> scalar MOCL loss.

    ``input`` is the logits (B, C, H, W), or the network's ``(logits, features)`` pair
    (``AllInSamNet(..., return_features=True)``, as the MOCL trainer's inferer calls it); ``target`` the lay
    annotation (B, C, H, W); ``features`` the decoder's per-pixel embedding E (B, D, H', W'), resized to (H, W) when
    it differs. Variant ``none`` needs no features.

    Args:
        variant: ``paper`` (default), ``authors`` or ``none``.
        k: prototype size (the authors' 100).
    """

    def __init__(self, variant: str = "paper", k: int = 100):
        super().__init__()
        if variant not in MOCL_VARIANTS:
            raise ValueError(f"variant must be one of {MOCL_VARIANTS}, got {variant!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.variant, self.k = variant, k

    def forward(self, input: torch.Tensor | tuple, target: torch.Tensor, features: torch.Tensor | None = None
                ) -> torch.Tensor:
        if isinstance(input, (tuple, list)):
            input, features = input
        if self.variant == "none":
            return dice_bce(input, target)
        if features is None:
            raise ValueError(f"MOCLLoss({self.variant!r}) needs the decoder features: call the network with "
                             f"return_features=True")
        if features.shape[-2:] != input.shape[-2:]:
            features = F.interpolate(features, size=input.shape[-2:], mode="bilinear", align_corners=False)
        weights = mocl_weights(input, target, features, self.k, self.variant)
        if self.variant == "paper":
            return dice_bce(input, target, weights[0])
        return sum(dice_bce(input, target, weight, weight_denominator=False) for weight in weights) / len(weights)
