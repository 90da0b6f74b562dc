from .nuclei_metric import NucleiMetric
from .segmentation import (
    METRIC_NAMES,
    adjusted_rand_index,
    aggregated_jaccard_index,
    best_f1,
    detection_f1_pq,
    dice_iou,
    nuclei_metrics,
    paired_instance_iou,
    recall_precision,
    roc_auc,
)

__all__ = [
    "METRIC_NAMES",
    "NucleiMetric",
    "adjusted_rand_index",
    "aggregated_jaccard_index",
    "best_f1",
    "detection_f1_pq",
    "dice_iou",
    "nuclei_metrics",
    "paired_instance_iou",
    "recall_precision",
    "roc_auc",
]
