"""AllInSamNet: a SAM with SAM-Adapter prompts in its frozen image encoder, decoding nuclei without any prompt."""

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .sam_adapter import adapt_encoder
from .sam_backbones import SamBackbone, build_sam_vit, load_litemedsam, load_sam

logger = logging.getLogger(__name__)
TRAINABLE_CHOICES = ("adapter", "decoder", "full")


class AllInSamNet(nn.Module):
    """Image (B, 3, S, S) RGB in [0, 1] -> ``pred`` logits (B, C, S, S), S = the backbone's input size.

    Args:
        backbone: ``litemedsam`` (TinyViT, S = 256, embedded pretrained weights) or ``vit_b`` / ``vit_l`` / ``vit_h``
            (segment-anything, S = 1024 with Meta's checkpoint).
        checkpoint: the backbone's checkpoint; None means LiteMedSAM's embedded one (a ViT needs a path).
        checkpoint_sha256: the SHA-256 ``checkpoint`` must have, when known (the embedded one is always checked).
        pretrained: False builds a random backbone (tests, ablations).
        image_size: ViT input side for random weights (tests at small sizes); ignored for LiteMedSAM.
        trainable: ``adapter`` (the paper: prompt generators + mask decoder + no-mask embedding),
            ``decoder`` (no adapter; mask decoder + no-mask embedding) or ``full`` (everything, with the adapter).
        out_channels: C, one binary mask per class, read from the decoder's first C mask tokens (at most 4).
        freq_rate: share of the spectrum's area removed as low frequencies for the handcrafted feature.
        scale_factor: adapter width = encoder width // scale_factor.
    """

    def __init__(self, backbone: str = "litemedsam", checkpoint: str | os.PathLike | None = None,
                 pretrained: bool = True, image_size: int = 1024, trainable: str = "adapter", out_channels: int = 1,
                 freq_rate: float = 0.25, scale_factor: int = 32, checkpoint_sha256: str | None = None):
        super().__init__()
        if trainable not in TRAINABLE_CHOICES:
            raise ValueError(f"trainable must be one of {TRAINABLE_CHOICES}, got {trainable!r}")
        sam = _build_backbone(backbone, checkpoint, pretrained, image_size, checkpoint_sha256)
        tokens = sam.mask_decoder.num_mask_tokens
        if not 1 <= out_channels <= tokens:
            raise ValueError(f"out_channels must be 1..{tokens} (the decoder's mask tokens), got {out_channels}")
        self.sam, self.trainable, self.out_channels = sam, trainable, out_channels
        self.frozen_encoder = [sam.image_encoder]  # the SAM's own encoder (a list: not registered a second time)
        for parameter in sam.image_encoder.parameters():
            parameter.requires_grad = trainable == "full"
        if trainable != "decoder":
            sam.image_encoder = adapt_encoder(sam.image_encoder, freq_rate, scale_factor)
        for parameter in sam.prompt_encoder.parameters():
            parameter.requires_grad = False
        sam.prompt_encoder.no_mask_embed.weight.requires_grad = True
        trained, total = self.parameter_counts()
        logger.info(f"AllInSamNet({backbone}, trainable={trainable}): {trained:,} of {total:,} parameters trainable")

    @property
    def image_size(self) -> int:
        return self.sam.image_size

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        parameters = list(self.parameters())
        return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)

    def train(self, mode: bool = True) -> "AllInSamNet":
        """A frozen encoder stays in eval mode (its BatchNorm statistics and drop-path do not change)."""
        super().train(mode)
        if self.trainable != "full":
            self.frozen_encoder[0].eval()
        return self

    def forward(self, image: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C, S, S); with ``return_features`` also the decoder's per-pixel embedding E (B, D, S, S)
        (the upscaled image embedding the mask tokens are read from; D = 32 for every SAM here), for MOCL."""
        size = self.image_size
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != (size, size):
            raise ValueError(f"AllInSamNet expects (B, 3, {size}, {size}) RGB in [0, 1], got {tuple(image.shape)}")
        encoder_input = self.sam.preprocess(image * 255.0)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable != "decoder"):
            embeddings = self.sam.image_encoder(encoder_input)
        if not return_features:
            return _resized(self.decode(embeddings), size)
        logits, features = self.decode(embeddings, return_features=True)
        return _resized(logits, size), _resized(features, size)

    def decode(self, embeddings: torch.Tensor, return_features: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, 256, E, E) -> (B, C, 4E, 4E) low-resolution logits (and, if asked, the decoder's (B, D, 4E, 4E)
        per-pixel embedding), with no prompt: no sparse tokens, the no-mask dense embedding. One image per decoder
        call: segment-anything's decoder pairs every image with every prompt set in a batch."""
        prompt_encoder, decoder = self.sam.prompt_encoder, self.sam.mask_decoder
        positional = prompt_encoder.get_dense_pe()
        sparse = embeddings.new_empty((1, 0, prompt_encoder.embed_dim))
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *embeddings.shape[-2:])
        features = []  # predict_masks does not return it: read the output of its upscaling block, only when asked
        hook = (decoder.output_upscaling.register_forward_hook(lambda module, args, output: features.append(output))
                if return_features else None)
        try:
            masks = [decoder.predict_masks(embedding[None], positional, sparse, dense)[0] for embedding in embeddings]
        finally:
            if hook is not None:
                hook.remove()
        logits = torch.cat(masks)[:, :self.out_channels]
        return (logits, torch.cat(features)) if return_features else logits


def _resized(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size), bilinear; unchanged when already that size (LiteMedSAM: 4E = S)."""
    if tuple(maps.shape[-2:]) == (size, size):
        return maps
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


def _build_backbone(backbone: str, checkpoint, pretrained: bool, image_size: int,
                    checkpoint_sha256: str | None) -> SamBackbone:
    if backbone == "litemedsam":
        return load_litemedsam(checkpoint, checkpoint_sha256, pretrained=pretrained)
    if not pretrained:
        return build_sam_vit(backbone, image_size=image_size)
    return load_sam(backbone, checkpoint, checkpoint_sha256)
