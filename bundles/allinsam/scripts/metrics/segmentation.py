"""Segmentation metrics shared by every workflow and both bundles (one implementation).

Pixel metrics of P1's table (Dice, IoU, AUC, recall, precision, best F1, ADJ) and instance metrics on instances
taken from the binary prediction (AJI, detection F1 at IoU 0.5, PQ). Maps are numpy arrays of any 2D shape.
Empty-image convention: a prediction that agrees with an empty truth scores 1; AUC is NaN when the truth has a
single class (it is undefined there).
"""

import numpy as np

from ..data.instances import instances_from_mask

METRIC_NAMES = ("dice", "iou", "auc", "recall", "precision", "best_f1", "adj", "aji", "detection_f1", "pq")


def dice_iou(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Pixel Dice and IoU of two binary maps (any shape; non-zero = foreground). Both empty gives (1, 1)."""
    prediction, truth = np.asarray(prediction) > 0, np.asarray(truth) > 0
    overlap = np.count_nonzero(prediction & truth)
    total = np.count_nonzero(prediction) + np.count_nonzero(truth)
    if total == 0:
        return 1.0, 1.0
    return 2 * overlap / total, overlap / (total - overlap)


def recall_precision(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Pixel recall and precision of two binary maps; an empty truth (recall) or prediction (precision) scores 1 when
    the other map is empty too, else 0."""
    prediction, truth = np.asarray(prediction) > 0, np.asarray(truth) > 0
    overlap = np.count_nonzero(prediction & truth)
    positives, predicted = np.count_nonzero(truth), np.count_nonzero(prediction)
    recall = overlap / positives if positives else float(predicted == 0)
    precision = overlap / predicted if predicted else float(positives == 0)
    return recall, precision


def roc_auc(probability: np.ndarray, truth: np.ndarray) -> float:
    """Area under the pixel ROC curve (Mann-Whitney U with tied ranks averaged); NaN if the truth has one class."""
    from scipy.stats import rankdata

    probability, truth = np.asarray(probability, dtype=np.float64).ravel(), np.asarray(truth).ravel() > 0
    positives = np.count_nonzero(truth)
    negatives = truth.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(probability)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def best_f1(probability: np.ndarray, truth: np.ndarray) -> float:
    """Pixel F1 at the best threshold: max over every distinct probability t of F1(probability >= t), and of the
    empty prediction."""
    probability, truth = np.asarray(probability, dtype=np.float64).ravel(), np.asarray(truth).ravel() > 0
    positives = np.count_nonzero(truth)
    order = np.argsort(-probability, kind="stable")
    ordered = probability[order]
    last_of_each_value = np.r_[np.flatnonzero(np.diff(ordered)), ordered.size - 1]
    true_positives = np.cumsum(truth[order])[last_of_each_value]
    predicted = last_of_each_value + 1
    f1 = 2 * true_positives / (predicted + positives)
    return float(max(f1.max(initial=0.0), float(positives == 0)))


def adjusted_rand_index(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Adjusted Rand index of two binary maps as pixel labellings (P1's ADJ), from the pair confusion matrix."""
    prediction, truth = np.asarray(prediction).ravel() > 0, np.asarray(truth).ravel() > 0
    pixels = truth.size
    table = np.bincount(2 * truth + prediction, minlength=4).reshape(2, 2).astype(object)  # python ints: no overflow
    sum_squares = int((table ** 2).sum())
    rows, columns = table.sum(axis=1), table.sum(axis=0)
    same_both = sum_squares - pixels
    same_truth_only = int((table * columns[None, :]).sum()) - sum_squares
    same_prediction_only = int((table * rows[:, None]).sum()) - sum_squares
    different_both = pixels ** 2 - same_truth_only - same_prediction_only - sum_squares
    if same_truth_only == 0 and same_prediction_only == 0:
        return 1.0
    numerator = 2 * (same_both * different_both - same_truth_only * same_prediction_only)
    denominator = ((same_both + same_prediction_only) * (same_prediction_only + different_both)
                   + (same_both + same_truth_only) * (same_truth_only + different_both))
    return float(numerator / denominator)


def _instance_overlaps(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance maps -> (intersection (T, P), truth areas (T,), prediction areas (P,)) over ids 1..max."""
    prediction, truth = np.asarray(prediction).ravel().astype(np.int64), np.asarray(truth).ravel().astype(np.int64)
    width = int(prediction.max(initial=0)) + 1
    joint = np.bincount(truth * width + prediction, minlength=(int(truth.max(initial=0)) + 1) * width)
    joint = joint.reshape(-1, width)
    return joint[1:, 1:], joint.sum(axis=1)[1:], joint.sum(axis=0)[1:]


def _present(areas: np.ndarray) -> np.ndarray:
    return np.flatnonzero(areas > 0)


def aggregated_jaccard_index(prediction: np.ndarray, truth: np.ndarray) -> float:
    """AJI (Kumar et al. 2017) of two instance maps: each truth nucleus takes the predicted one of highest IoU;
    the intersections over the unions of those pairs, plus the areas of unmatched truth and predicted nuclei."""
    intersection, truth_area, prediction_area = _instance_overlaps(prediction, truth)
    truths, predictions = _present(truth_area), _present(prediction_area)
    intersection = intersection[np.ix_(truths, predictions)]
    truth_area, prediction_area = truth_area[truths], prediction_area[predictions]
    if truths.size == 0 or predictions.size == 0:
        return float(truths.size == predictions.size)
    union = truth_area[:, None] + prediction_area[None, :] - intersection
    best = (intersection / union).argmax(axis=1)
    rows = np.arange(truths.size)
    matched = intersection[rows, best] > 0
    overlap = intersection[rows, best][matched].sum()
    total = union[rows, best][matched].sum() + truth_area[~matched].sum()
    used = np.zeros(predictions.size, dtype=bool)
    used[best[matched]] = True
    return float(overlap / (total + prediction_area[~used].sum()))


def detection_f1_pq(prediction: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5) -> tuple[float, float]:
    """(detection F1, panoptic quality) of two instance maps; a pair with IoU > ``iou_threshold`` >= 0.5 is a true
    positive (such pairs are unique, so no assignment is needed)."""
    if iou_threshold < 0.5:
        raise ValueError(f"iou_threshold must be >= 0.5 for unique matches, got {iou_threshold}")
    intersection, truth_area, prediction_area = _instance_overlaps(prediction, truth)
    truths, predictions = _present(truth_area), _present(prediction_area)
    if truths.size == 0 and predictions.size == 0:
        return 1.0, 1.0
    intersection = intersection[np.ix_(truths, predictions)]
    union = truth_area[truths][:, None] + prediction_area[predictions][None, :] - intersection
    iou = intersection / np.maximum(union, 1)
    matched = iou[iou > iou_threshold]
    true_positives = matched.size
    misses = truths.size - true_positives + predictions.size - true_positives
    f1 = 2 * true_positives / (2 * true_positives + misses)
    return float(f1), float(matched.sum() / (true_positives + misses / 2))


def nuclei_metrics(probability: np.ndarray, truth: np.ndarray, threshold: float = 0.5,
                   instances: str = "components", names: tuple[str, ...] = METRIC_NAMES,
                   mask: np.ndarray | None = None) -> dict[str, float]:
    """The named metrics of one image.

    Args:
        probability: (H, W) foreground probability in [0, 1] (a binary map also works; AUC and best F1 then
            reduce to one operating point).
        truth: (H, W) instance map (ids, 0 = background) or binary mask (its 8-connected components are the
            instances).
        threshold: probability >= threshold is foreground.
        instances: how predicted instances are formed, ``components`` or ``watershed``.
        mask: (H, W) the binary prediction when it was stored apart (e.g. a ``*_mask.png``, non-zero =
            foreground); otherwise ``probability >= threshold``.
    """
    unknown = set(names) - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRIC_NAMES}")
    probability, truth = np.asarray(probability, dtype=np.float64), np.asarray(truth)
    if probability.shape != truth.shape or (mask is not None and np.shape(mask) != truth.shape):
        shapes = probability.shape if mask is None else (probability.shape, np.shape(mask))
        raise ValueError(f"prediction shape {shapes} differs from the truth's {truth.shape}")
    binary = probability >= threshold if mask is None else np.asarray(mask) > 0
    truth_mask = truth > 0
    values = {}
    if {"dice", "iou"} & set(names):
        values["dice"], values["iou"] = dice_iou(binary, truth_mask)
    if {"recall", "precision"} & set(names):
        values["recall"], values["precision"] = recall_precision(binary, truth_mask)
    if "auc" in names:
        values["auc"] = roc_auc(probability, truth_mask)
    if "best_f1" in names:
        values["best_f1"] = best_f1(probability, truth_mask)
    if "adj" in names:
        values["adj"] = adjusted_rand_index(binary, truth_mask)
    if {"aji", "detection_f1", "pq"} & set(names):
        truth_instances = truth if truth.max(initial=0) > 1 else instances_from_mask(truth_mask)
        predicted_instances = instances_from_mask(binary, instances)
        values["aji"] = aggregated_jaccard_index(predicted_instances, truth_instances)
        values["detection_f1"], values["pq"] = detection_f1_pq(predicted_instances, truth_instances)
    return {name: values[name] for name in names}


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
