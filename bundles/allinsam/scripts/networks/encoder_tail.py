"""A SAM image encoder cut in two: a frozen prefix, whose output can be cached per view, and a trainable tail.

- TinyViT (LiteMedSAM): the tail is the last stage (2 attention blocks, 320 channels on the 64x64 grid) and the neck;
  the prefix (patch embedding, stages 0-2) is about three quarters of the encoder's forward time on a CPU.
- ViT (segment-anything): the tail is the last window-attention group up to the last global-attention block
  (blocks 9-11 of ViT-B) and the neck.

Tokens between the two: (B, h*w, C) for TinyViT, (B, h, w, C) for ViT (position embedding added).
"""

import torch
from torch import nn


def is_vit_encoder(encoder: nn.Module) -> bool:
    """A segment-anything ``ImageEncoderViT`` (else LiteMedSAM's TinyViT, which has ``layers``)."""
    return hasattr(encoder, "blocks") and hasattr(encoder, "pos_embed")


def _vit_tail_start(encoder: nn.Module) -> int:
    """Index of the first tail block: the one after the second-to-last global-attention block."""
    global_blocks = [index for index, block in enumerate(encoder.blocks) if block.window_size == 0]
    return global_blocks[-2] + 1 if len(global_blocks) > 1 else len(encoder.blocks) - 1


def tail_modules(encoder: nn.Module) -> list[nn.Module]:
    """The encoder modules trained with ``trainable="tail"``."""
    if is_vit_encoder(encoder):
        return list(encoder.blocks[_vit_tail_start(encoder):]) + [encoder.neck]
    return [encoder.layers[-1], encoder.neck]


def encoder_prefix(encoder: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised image -> the tokens entering the tail."""
    if is_vit_encoder(encoder):
        x = encoder.patch_embed(image)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks[:_vit_tail_start(encoder)]:
            x = block(x)
        return x
    x = encoder.patch_embed(image)
    for stage in encoder.layers[:-1]:
        x = stage(x)
    return x


def encoder_tail(encoder: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens from ``encoder_prefix`` -> (B, 256, E, E) image embedding."""
    if is_vit_encoder(encoder):
        for block in encoder.blocks[_vit_tail_start(encoder):]:
            tokens = block(tokens)
        return encoder.neck(tokens.permute(0, 3, 1, 2))
    x = encoder.layers[-1](tokens)
    height, width = encoder.layers[-1].input_resolution
    return encoder.neck(x.view(len(x), height, width, -1).permute(0, 3, 1, 2))
