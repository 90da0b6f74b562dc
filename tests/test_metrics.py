"""Every metric of scripts.metrics against an independent implementation (scikit-learn, scipy, a direct loop),
on a real MoNuSeg crop and on edge cases."""

import numpy as np
import pytest
import torch
from conftest import SAMPLE_CROPS
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as sk

from scripts.data import instances_from_mask, read_instance_map
from scripts.metrics import (
    METRIC_NAMES,
    NucleiMetric,
    adjusted_rand_index,
    aggregated_jaccard_index,
    best_f1,
    detection_f1_pq,
    dice_iou,
    nuclei_metrics,
    recall_precision,
    roc_auc,
)


@pytest.fixture(scope="module")
def crop(sample_datalist):
    """A real crop's instance map and a plausible noisy probability map of it (blurred truth + noise)."""
    truth = read_instance_map(SAMPLE_CROPS / sample_datalist["test"][0]["instances"])
    rng = np.random.default_rng(0)
    blurred = ndimage.gaussian_filter((truth > 0).astype(float), 2.0)
    probability = np.clip(0.8 * blurred + 0.35 * rng.random(truth.shape) - 0.1, 0, 1).round(3)  # ties on purpose
    return truth, probability


def test_pixel_metrics_match_scikit_learn(crop):
    truth, probability = crop
    labels, scores = (truth > 0).ravel(), probability.ravel()
    predicted = scores >= 0.5
    dice, iou = dice_iou(probability >= 0.5, truth)
    assert dice == pytest.approx(sk.f1_score(labels, predicted))
    assert iou == pytest.approx(sk.jaccard_score(labels, predicted))
    recall, precision = recall_precision(probability >= 0.5, truth)
    assert recall == pytest.approx(sk.recall_score(labels, predicted))
    assert precision == pytest.approx(sk.precision_score(labels, predicted))
    assert roc_auc(probability, truth) == pytest.approx(sk.roc_auc_score(labels, scores))
    curve_precision, curve_recall, _ = sk.precision_recall_curve(labels, scores)
    f1 = 2 * curve_precision * curve_recall / np.maximum(curve_precision + curve_recall, 1e-12)
    assert best_f1(probability, truth) == pytest.approx(f1.max())
    assert best_f1(probability, truth) >= dice  # the best threshold is at least as good as 0.5
    assert adjusted_rand_index(probability >= 0.5, truth) == pytest.approx(sk.adjusted_rand_score(labels, predicted))
    assert 0.5 < dice < 0.95 and 0.5 < roc_auc(probability, truth) < 1  # a non-trivial case


def _aji_reference(prediction: np.ndarray, truth: np.ndarray) -> float:
    """AJI as Kumar et al. define it, one nucleus at a time."""
    overlap = union = 0
    used = set()
    for t in np.unique(truth[truth > 0]):
        nucleus = truth == t
        candidates = np.unique(prediction[nucleus & (prediction > 0)])
        if candidates.size == 0:
            union += nucleus.sum()
            continue
        ious = [((nucleus & (prediction == p)).sum() / (nucleus | (prediction == p)).sum(), p) for p in candidates]
        _, best = max(ious)
        overlap += (nucleus & (prediction == best)).sum()
        union += (nucleus | (prediction == best)).sum()
        used.add(best)
    for p in np.unique(prediction[prediction > 0]):
        if p not in used:
            union += (prediction == p).sum()
    return overlap / union


def _detection_reference(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Detection F1 and PQ by optimal assignment (scipy) on the IoU matrix, pairs kept when IoU > 0.5."""
    truths, predictions = np.unique(truth[truth > 0]), np.unique(prediction[prediction > 0])
    iou = np.array([[((truth == t) & (prediction == p)).sum() / ((truth == t) | (prediction == p)).sum()
                     for p in predictions] for t in truths])
    rows, columns = linear_sum_assignment(-iou)
    matched = iou[rows, columns][iou[rows, columns] > 0.5]
    tp, fp, fn = matched.size, predictions.size - matched.size, truths.size - matched.size
    return 2 * tp / (2 * tp + fp + fn), matched.sum() / (tp + fp / 2 + fn / 2)


def test_instance_metrics_match_direct_references(crop):
    truth, probability = crop
    predicted = instances_from_mask(probability >= 0.5)
    assert aggregated_jaccard_index(predicted, truth) == pytest.approx(_aji_reference(predicted, truth))
    f1, pq = detection_f1_pq(predicted, truth)
    reference_f1, reference_pq = _detection_reference(predicted, truth)
    assert (f1, pq) == pytest.approx((reference_f1, reference_pq))
    assert 0.2 < f1 < 1 and 0.1 < pq < 1
    # the truth against itself is perfect; shifting every nucleus by 3 pixels costs AJI and PQ
    assert aggregated_jaccard_index(truth, truth) == 1.0 and detection_f1_pq(truth, truth) == (1.0, 1.0)
    shifted = np.roll(truth, 3, axis=1)
    assert aggregated_jaccard_index(shifted, truth) == pytest.approx(_aji_reference(shifted, truth))
    assert detection_f1_pq(shifted, truth) == pytest.approx(_detection_reference(shifted, truth))


def test_instances_from_mask_components_and_watershed():
    yy, xx = np.mgrid[:40, :60]
    two_touching = ((yy - 20) ** 2 + (xx - 20) ** 2 < 12 ** 2) | ((yy - 20) ** 2 + (xx - 40) ** 2 < 12 ** 2)
    components = instances_from_mask(two_touching)
    assert components.max() == 1 == ndimage.label(two_touching)[1]
    split = instances_from_mask(two_touching, "watershed")
    assert split.max() == 2 and np.array_equal(split > 0, two_touching)
    assert split[20, 15] != split[20, 45]
    with pytest.raises(ValueError, match="instances must be one of"):
        instances_from_mask(two_touching, "blobs")


def test_empty_prediction_and_empty_truth(crop):
    truth, _ = crop
    empty = np.zeros_like(truth)
    # empty prediction on a full truth: every overlap metric is 0, AUC of a constant score is 0.5
    values = nuclei_metrics(np.zeros(truth.shape), truth)
    assert values["dice"] == values["iou"] == values["recall"] == values["aji"] == values["pq"] == 0.0
    assert values["detection_f1"] == 0.0 and values["precision"] == 0.0
    assert values["auc"] == pytest.approx(sk.roc_auc_score((truth > 0).ravel(), np.zeros(truth.size)))
    assert values["adj"] == pytest.approx(sk.adjusted_rand_score((truth > 0).ravel(), np.zeros(truth.size)))
    # empty truth: agreement scores 1, any false positive 0, AUC undefined
    values = nuclei_metrics(np.zeros(truth.shape), empty)
    assert all(values[name] == 1.0 for name in METRIC_NAMES if name != "auc") and np.isnan(values["auc"])
    assert values["adj"] == sk.adjusted_rand_score(empty.ravel(), empty.ravel())
    spot = np.zeros(truth.shape)
    spot[10:20, 10:20] = 0.9
    values = nuclei_metrics(spot, empty)
    assert values["dice"] == values["precision"] == values["aji"] == values["detection_f1"] == 0.0
    assert values["recall"] == 0.0 and values["best_f1"] == 1.0  # a threshold above 0.9 predicts nothing
    assert values["adj"] == pytest.approx(sk.adjusted_rand_score(empty.ravel(), (spot > 0.5).ravel()))


def test_nuclei_metric_is_the_module_metric_per_image_and_channel(crop):
    truth, probability = crop
    metric = NucleiMetric("aji")
    batch_prediction = torch.as_tensor(np.stack([probability, np.zeros_like(probability)]))[:, None]
    batch_truth = torch.as_tensor(np.stack([truth, truth]).astype(np.float32))[:, None]
    values = metric(batch_prediction, batch_truth)
    assert values.shape == (2, 1)
    assert values[0, 0].item() == pytest.approx(nuclei_metrics(probability, truth)["aji"])
    assert values[1, 0].item() == 0.0
    assert metric.aggregate().item() == pytest.approx(values.mean().item())
    with pytest.raises(ValueError, match="unknown metric"):
        NucleiMetric("hausdorff")
    with pytest.raises(ValueError, match="shape"):
        nuclei_metrics(probability[:10], truth)
