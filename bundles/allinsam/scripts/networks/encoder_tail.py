"""A SAM image encoder cut in two: a frozen prefix, whose output can be cached per view, and a trainable tail of
``stages`` stages.

- TinyViT (LiteMedSAM): a stage is one of its 4 layers; the tail is the last ``stages`` of them and the neck (1: the
  last stage, 2 attention blocks with 320 channels on the 64x64 grid; 2: also the 6 blocks of stage 2, 160 channels).
  The prefix (patch embedding, stages 0-2) is about three quarters of the encoder's forward time on a CPU.
- ViT (segment-anything): a stage is a window-attention group with the global-attention block that closes it; the
  tail is the last ``stages`` of them (1: blocks 9-11 of ViT-B) and the neck.

Tokens between the two: (B, h*w, C) for TinyViT, (B, h, w, C) for ViT (position embedding added).
"""

import torch
from torch import nn


def is_vit_encoder(encoder: nn.Module) -> bool:
    """A segment-anything ``ImageEncoderViT`` (else LiteMedSAM's TinyViT, which has ``layers``)."""
    return hasattr(encoder, "blocks") and hasattr(encoder, "pos_embed")


def _check_stages(encoder: nn.Module, stages: int) -> None:
    available = len(encoder.blocks) if is_vit_encoder(encoder) else len(encoder.layers)
    if not 1 <= stages < available:
        raise ValueError(f"tail_stages must be 1..{available - 1} for this encoder, got {stages}")


def _vit_tail_start(encoder: nn.Module, stages: int) -> int:
    """Index of the first tail block: the one after the global-attention block ``stages + 1`` from the end."""
    global_blocks = [index for index, block in enumerate(encoder.blocks) if block.window_size == 0]
    return global_blocks[-stages - 1] + 1 if len(global_blocks) > stages else len(encoder.blocks) - stages


def tail_modules(encoder: nn.Module, stages: int = 1) -> list[nn.Module]:
    """The encoder modules trained with ``trainable="tail"``."""
    _check_stages(encoder, stages)
    if is_vit_encoder(encoder):
        return list(encoder.blocks[_vit_tail_start(encoder, stages):]) + [encoder.neck]
    return list(encoder.layers[-stages:]) + [encoder.neck]


def encoder_prefix(encoder: nn.Module, image: torch.Tensor, stages: int = 1) -> torch.Tensor:
    """(B, 3, S, S) normalised image -> the tokens entering the tail of ``stages`` stages."""
    _check_stages(encoder, stages)
    if is_vit_encoder(encoder):
        x = encoder.patch_embed(image)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks[:_vit_tail_start(encoder, stages)]:
            x = block(x)
        return x
    x = encoder.patch_embed(image)
    for stage in encoder.layers[:-stages]:
        x = stage(x)
    return x


def encoder_tail(encoder: nn.Module, tokens: torch.Tensor, stages: int = 1) -> torch.Tensor:
    """Tokens from ``encoder_prefix`` (same ``stages``) -> (B, 256, E, E) image embedding."""
    if is_vit_encoder(encoder):
        for block in encoder.blocks[_vit_tail_start(encoder, stages):]:
            tokens = block(tokens)
        return encoder.neck(tokens.permute(0, 3, 1, 2))
    for stage in encoder.layers[-stages:]:
        tokens = stage(tokens)
    height, width = encoder.layers[-1].input_resolution
    return encoder.neck(tokens.view(len(tokens), height, width, -1).permute(0, 3, 1, 2))
