"""SAM-Adapter (Chen et al.; explicit visual prompting): prompts from the image's high frequencies and the patch
embedding, added before every block of a frozen SAM image encoder.

- ViT (segment-anything): one ``PromptGenerator`` for the whole encoder.
- TinyViT (LiteMedSAM): one ``PromptGenerator`` per stage, since stage widths and resolutions differ (the
  SAM2-Adapter pattern for hierarchical encoders); one lightweight MLP per block, one shared MLP per stage.
"""

import math

import torch
from torch import nn

from .encoder_tail import is_vit_encoder


def high_frequency_component(image: torch.Tensor, rate: float = 0.25) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): |IFFT| of the spectrum with its central low-frequency square zeroed.

    The square covers ``rate`` of the area, side ``2 * int(sqrt(H * W * rate) // 2)`` (SAM-Adapter's ``freq_nums``).
    """
    height, width = image.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(image.float(), norm="forward"), dim=(-2, -1))
    side = 2 * int(math.sqrt(height * width * rate) // 2)
    top, left = (height - side) // 2, (width - side) // 2
    keep = torch.ones(height, width, device=image.device)
    keep[top:top + side, left:left + side] = 0
    spectrum = torch.fft.ifftshift(spectrum * keep, dim=(-2, -1))
    return torch.fft.ifft2(spectrum, norm="forward").real.abs()


def _reference_init(module: nn.Module) -> None:
    """SAM-Adapter's initialisation: small prompts at the start, so the pretrained encoder is barely disturbed
    (PyTorch's default init moves LiteMedSAM's embedding by 140 %; this by 0.2 %)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(module.bias)


class PromptGenerator(nn.Module):
    """Prompts for ``depth`` blocks of width ``dim`` working on a ``stride``-times downsampled token grid.

    prompt_i = shared_mlp(lightweight_mlp_i(handcrafted + embedding)), with c = dim // scale_factor:
    handcrafted = Conv2d(3 -> c, kernel = stride = ``stride``) of the high-frequency image,
    embedding = Linear(dim -> c) of the tokens entering the blocks, lightweight_mlp_i = Linear(c, c) + GELU,
    shared_mlp = Linear(c -> dim).
    """

    def __init__(self, dim: int, depth: int, stride: int, scale_factor: int = 32):
        super().__init__()
        hidden = max(dim // scale_factor, 1)
        self.handcrafted = nn.Conv2d(3, hidden, kernel_size=stride, stride=stride)
        self.embedding = nn.Linear(dim, hidden)
        self.lightweight_mlps = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()) for _ in range(depth))
        self.shared_mlp = nn.Linear(hidden, dim)
        self.apply(_reference_init)

    def features(self, high_frequency: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) high-frequency image and (B, h, w, dim) tokens -> (B, h, w, c) prompt features."""
        return self.handcrafted(high_frequency).permute(0, 2, 3, 1) + self.embedding(tokens)

    def prompt(self, block: int, features: torch.Tensor) -> torch.Tensor:
        """(B, h, w, c) -> (B, h, w, dim): the prompt added before ``block``."""
        return self.shared_mlp(self.lightweight_mlps[block](features))


class AdaptedViTEncoder(nn.Module):
    """segment-anything's ``ImageEncoderViT`` with a prompt added before each block (after the position embedding).

    (B, 3, S, S) normalised image -> (B, 256, S/16, S/16) embedding.
    """

    def __init__(self, encoder: nn.Module, freq_rate: float = 0.25, scale_factor: int = 32):
        super().__init__()
        self.encoder, self.freq_rate = encoder, freq_rate
        dim = encoder.patch_embed.proj.out_channels
        stride = encoder.patch_embed.proj.stride[0]
        self.generators = nn.ModuleList([PromptGenerator(dim, len(encoder.blocks), stride, scale_factor)])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        high_frequency = high_frequency_component(image, self.freq_rate)
        tokens = self.encoder.patch_embed(image)  # (B, h, w, D)
        features = self.generators[0].features(high_frequency, tokens)
        if self.encoder.pos_embed is not None:
            tokens = tokens + self.encoder.pos_embed
        for index, block in enumerate(self.encoder.blocks):
            tokens = block(tokens + self.generators[0].prompt(index, features))
        return self.encoder.neck(tokens.permute(0, 3, 1, 2))


class AdaptedTinyViTEncoder(nn.Module):
    """LiteMedSAM's TinyViT with one prompt generator per stage.

    (B, 3, S, S) normalised image -> (B, 256, E, E) embedding. Stage 0 (MBConv) works on (B, C, h, w) maps, the
    attention stages on (B, h*w, C) tokens; prompts are laid out to match.
    """

    def __init__(self, encoder: nn.Module, freq_rate: float = 0.25, scale_factor: int = 32):
        super().__init__()
        self.encoder, self.freq_rate = encoder, freq_rate
        self.generators = nn.ModuleList(
            PromptGenerator(stage.dim, len(stage.blocks), encoder.img_size // stage.input_resolution[0], scale_factor)
            for stage in encoder.layers
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        high_frequency = high_frequency_component(image, self.freq_rate)
        x = self.encoder.patch_embed(image)
        for stage, generator in zip(self.encoder.layers, self.generators):
            height, width = stage.input_resolution
            channels_first = x.ndim == 4
            tokens = x.permute(0, 2, 3, 1) if channels_first else x.view(len(x), height, width, -1)
            features = generator.features(high_frequency, tokens)
            for index, block in enumerate(stage.blocks):
                prompt = generator.prompt(index, features)
                x = block(x + (prompt.permute(0, 3, 1, 2) if channels_first else prompt.flatten(1, 2)))
            if stage.downsample is not None:
                x = stage.downsample(x)
        side = self.encoder.img_size // 4
        return self.encoder.neck(x.view(len(x), side, side, -1).permute(0, 3, 1, 2))


def adapt_encoder(encoder: nn.Module, freq_rate: float = 0.25, scale_factor: int = 32) -> nn.Module:
    """Wrap a SAM image encoder (segment-anything ViT or LiteMedSAM TinyViT) with SAM-Adapter prompts."""
    if is_vit_encoder(encoder):
        return AdaptedViTEncoder(encoder, freq_rate, scale_factor)
    if hasattr(encoder, "layers") and hasattr(encoder, "img_size"):
        return AdaptedTinyViTEncoder(encoder, freq_rate, scale_factor)
    raise TypeError(f"no SAM-Adapter for image encoder {type(encoder).__name__}")
