"""PixelRefiner: a full-resolution correction of the mask decoder's logits from the image itself.

SAM's decoder reads its masks off an embedding 4x smaller than the image (LiteMedSAM: 64x64 tokens for 256 px), so a
nucleus 10-30 px across gets its outline from a few tokens. nnU-Net, the baseline, segments at full resolution. This
module sees the image's pixels beside the decoder's probability and adds a correction to the logits; MONAI's
``Convolution`` blocks, dilated so that one output pixel sees 31 px (a nucleus and its border).
"""

import torch
from monai.networks.blocks import Convolution
from torch import nn

REFINER_KEY = "pixel_refiner."  # in the parameter names of a network built with one


class PixelRefiner(nn.Module):
    """Image (B, 3, S, S) RGB in [0, 1] and logits (B, C, S, S) -> refined logits (B, C, S, S).

    The correction's last convolution starts at zero, so an untrained refiner returns the decoder's logits unchanged.

    Args:
        out_channels: C, the decoder's mask channels.
        width: feature channels of the hidden layers.
        dilations: dilation of each hidden 3x3 layer (receptive field 1 + 2 * sum(dilations) px).
    """

    def __init__(self, out_channels: int = 1, width: int = 16, dilations: tuple[int, ...] = (1, 2, 4, 8)):
        super().__init__()
        layers, channels = [], 3 + out_channels
        for dilation in dilations:
            layers.append(Convolution(2, channels, width, kernel_size=3, dilation=dilation, padding=dilation,
                                      act="relu", norm=None))
            channels = width
        self.features = nn.Sequential(*layers)
        self.correction = nn.Conv2d(width, out_channels, kernel_size=1)
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)

    def forward(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([image - 0.5, torch.sigmoid(logits)], dim=1)
        return logits + self.correction(self.features(inputs))
