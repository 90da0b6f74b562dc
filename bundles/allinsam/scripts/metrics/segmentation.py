"""Segmentation metrics shared by every workflow and both bundles (one implementation)."""

import numpy as np


def dice_iou(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Pixel Dice and IoU of two binary maps (any shape; non-zero = foreground). Both empty gives (1, 1)."""
    prediction, truth = np.asarray(prediction) > 0, np.asarray(truth) > 0
    overlap = np.count_nonzero(prediction & truth)
    total = np.count_nonzero(prediction) + np.count_nonzero(truth)
    if total == 0:
        return 1.0, 1.0
    return 2 * overlap / total, overlap / (total - overlap)


def paired_instance_iou(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU (N,) of truth instance i with prediction instance i, for i = 1..N = truth.max().

    For prompted annotation, where prompt i was made from truth instance i, so ids correspond by construction.
    """
    prediction, truth = np.asarray(prediction).ravel(), np.asarray(truth).ravel()
    count = int(truth.max(initial=0)) + 1
    same = np.bincount(truth[(prediction == truth) & (truth > 0)], minlength=count)
    truth_area = np.bincount(truth, minlength=count)
    prediction_area = np.bincount(prediction[prediction < count], minlength=count)
    union = truth_area + prediction_area - same
    return (same / np.maximum(union, 1))[1:]
