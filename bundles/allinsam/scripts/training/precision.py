"""Training numerics: bfloat16 autocast around the trainer's forward pass, which MONAI's ``SupervisedTrainer`` cannot
give on a CPU (its ``amp`` option autocasts on CUDA only)."""

import torch
from torch import nn

from ..networks import bfloat16_cpu

TRAIN_PRECISION_CHOICES = ("float32", "bfloat16")


def fastest_train_precision(device: torch.device | str) -> str:
    """``bfloat16`` on a CPU with native bfloat16 (a training step of the default recipe, batch 2: 2.1-2.5 s against
    4.8-5.5 s in float32 on 2 AVX-512 BF16 cores), else ``float32`` (emulated bfloat16 is several times slower; on
    a GPU, MONAI's own ``amp``)."""
    return "bfloat16" if bfloat16_cpu(device) else "float32"


class Autocast(nn.Module):
    """``module`` run under ``torch.autocast(dtype)``; its outputs (a tensor or a tuple of them) come back in float32
    for the loss. The weights, gradients and optimizer state stay float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args, **kwargs):
        device_type = next(self.module.parameters()).device.type
        with torch.autocast(device_type=device_type, dtype=self.dtype):
            output = self.module(*args, **kwargs)
        return tuple(part.float() for part in output) if isinstance(output, tuple) else output.float()
