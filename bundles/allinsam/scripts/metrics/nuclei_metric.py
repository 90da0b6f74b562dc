"""``NucleiMetric``: one metric of ``segmentation.nuclei_metrics`` as a MONAI metric, for Ignite metric handlers,
``MetricsSaver`` per-image CSVs and the SupervisedEvaluator (MONAI has no AUC-per-image, best-F1, ADJ, AJI or PQ)."""

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction

from .segmentation import METRIC_NAMES, nuclei_metrics


class NucleiMetric(CumulativeIterationMetric):
    """Per image and channel: y_pred (B, C, H, W) foreground probability, y (B, C, H, W) instance map or binary
    mask (a single truth channel serves every prediction channel) -> (B, C) values of metric ``name``.

    Args:
        name: one of ``METRIC_NAMES``.
        threshold: probability >= threshold is foreground.
        instances: ``components`` or ``watershed``, how predicted nuclei are separated.
        reduction: MONAI reduction of the buffered (N, C) values; NaN (undefined AUC) is skipped.
    """

    def __init__(self, name: str, threshold: float = 0.5, instances: str = "components", reduction: str = "mean"):
        super().__init__()
        if name not in METRIC_NAMES:
            raise ValueError(f"unknown metric {name!r}; choose from {METRIC_NAMES}")
        self.name, self.threshold, self.instances, self.reduction = name, threshold, instances, reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        probability, truth = y_pred.detach().float().cpu().numpy(), y.detach().cpu().numpy()
        values = [[nuclei_metrics(probability[b, c], truth[b, min(c, truth.shape[1] - 1)], self.threshold,
                                  self.instances, (self.name,))[self.name]
                   for c in range(probability.shape[1])] for b in range(probability.shape[0])]
        return torch.tensor(values, dtype=torch.float64)

    def aggregate(self) -> torch.Tensor:
        value, _ = do_metric_reduction(self.get_buffer(), self.reduction)
        return value
