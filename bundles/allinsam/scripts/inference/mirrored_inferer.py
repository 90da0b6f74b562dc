"""Test-time mirroring: the mean of the logits over mirrored copies of the input, as nnU-Net predicts by default.

MONAI has no inferer for this (its ``TestTimeAugmentation`` samples random transforms and inverts each one through
the data pipeline); mirroring is its own inverse, so a wrapper around any inferer is enough.
"""

import itertools
from collections.abc import Callable, Sequence

import torch
from monai.inferers import Inferer


class MirroredInferer(Inferer):
    """Image (B, C, *spatial) -> logits (B, K, *spatial): the mean of ``inferer``'s logits over every subset of
    ``spatial_axes`` (0 is the first spatial axis), each input mirrored before and its logits mirrored back after.
    ``spatial_axes`` (0, 1) on a 2D image: 4 passes (none, rows, columns, both); ``()``: one pass, ``inferer``
    alone."""

    def __init__(self, inferer: Inferer, spatial_axes: Sequence[int] = ()):
        if len(set(spatial_axes)) != len(spatial_axes) or any(axis < 0 for axis in spatial_axes):
            raise ValueError(f"spatial_axes must be distinct non-negative axes, got {list(spatial_axes)}")
        self.inferer = inferer
        self.spatial_axes = tuple(int(axis) for axis in spatial_axes)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        if any(axis >= inputs.ndim - 2 for axis in self.spatial_axes):
            raise ValueError(f"spatial_axes {list(self.spatial_axes)} for an input of {inputs.ndim - 2} spatial axes")
        subsets = [dims for count in range(len(self.spatial_axes) + 1)
                   for dims in itertools.combinations([axis + 2 for axis in self.spatial_axes], count)]
        total = None
        for dims in subsets:
            mirrored = torch.flip(inputs, dims) if dims else inputs
            logits = self.inferer(mirrored, network, *args, **kwargs)
            logits = torch.flip(logits, dims) if dims else logits
            total = logits if total is None else total + logits
        return total / len(subsets)
