"""AllInSamNet: a SAM with SAM-Adapter prompts in its frozen image encoder, decoding nuclei without any prompt."""

import logging
import math
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .encoder_tail import encoder_prefix, encoder_tail, tail_modules
from .onnx_runtime import OnnxRuntimeForward, OpenVinoForward, check_runtime, exported_forward
from .sam_adapter import adapt_encoder
from .sam_backbones import SamBackbone, build_sam_vit, load_litemedsam, load_sam, read_network_weights

logger = logging.getLogger(__name__)
TRAINABLE_CHOICES = ("adapter", "tail", "decoder", "full")
PRECISION_CHOICES = ("float32", "bfloat16", "int8")
# the trainable parts start after a frozen part of the encoder, whose output can be cached per view
CACHEABLE_CHOICES = ("tail", "decoder")
ADAPTER_KEY = ".generators."  # in the parameter names of the SAM-Adapter prompt generators (adapter, full)


def native_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matrix multiplies run natively on ``device``: a GPU, or a CPU that oneDNN runs them on (AVX-512
    or newer). Elsewhere torch emulates them: on a 2-core AVX2 CPU a LiteMedSAM window took 15-61 s under bfloat16
    autocast (depending on the image) against 2.6 s in float32 (``docs/results/convergence_0.5pct.md`` section 12)."""
    return device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bfloat16_cpu(device: torch.device | str) -> bool:
    """Whether ``device`` (a ``torch.device`` or its name, as the MONAI Label app passes it) is a CPU with native
    bfloat16: where the CPU defaults of inference and training choose bfloat16."""
    device = torch.device(device)
    return device.type == "cpu" and native_bfloat16(device)


def fastest_precision(device: torch.device | str) -> str:
    """The workflows' default numerics on ``device`` (their runtime: ``runtime_of``): ``bfloat16`` (OpenVINO) on a CPU
    with native bfloat16, else ``int8`` (ONNX Runtime; on a GPU, where neither runs, float32 torch). Chosen on MoNuSeg
    validation images: on 2 AVX-512 BF16 cores a 1000x1000 image took 10.8 s against 14.5 s in int8 (Dice against the
    truth 0.7582 / 0.7586, float32 0.7575; ``docs/results/inference_runtime.md`` in the repository)."""
    return "bfloat16" if bfloat16_cpu(device) else "int8"


def recipe_of_checkpoint(ckpt_path: str | os.PathLike | None, default: str = "tail") -> str:
    """The ``trainable`` to build for inference from ``ckpt_path``: ``adapter`` when it holds SAM-Adapter prompt
    generators (trained with ``adapter`` or ``full``), else ``default`` (``tail`` and ``decoder`` build the same
    network). ``default`` when there is no file yet (a bundle before training)."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return default
    return "adapter" if any(ADAPTER_KEY in key for key in read_network_weights(ckpt_path)) else default


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
            ``tail`` (no adapter; the encoder's last stage and neck + mask decoder + no-mask embedding, see
            ``encoder_tail``), ``decoder`` (no adapter; mask decoder + no-mask embedding) or ``full`` (everything,
            with the adapter). With ``tail`` and ``decoder`` the frozen part's output can be cached per view.
        tail_stages: how many of the encoder's last stages ``tail`` trains (see ``encoder_tail``); every value
            builds the same network, so a checkpoint loads whatever it was trained with.
        out_channels: C, one binary mask per class, read from the decoder's first C mask tokens (at most 4).
        freq_rate: share of the spectrum's area removed as low frequencies for the handcrafted feature.
        scale_factor: adapter width = encoder width // scale_factor.
        inference_precision: ``float32``, or ``bfloat16``: on torch, in eval mode the forward pass runs under
            bfloat16 autocast (about 2x faster on a CPU with AVX-512 BF16; emulated and 6-23x slower on one without,
            which the first call warns about, see ``native_bfloat16``); on OpenVINO, its bfloat16 hint (native
            bfloat16 or float32). Logits come back as float32. ``int8``: with ``inference_runtime`` onnxruntime only,
            the exported graph's MatMul nodes quantised dynamically (``OnnxRuntimeForward``). Where an exported
            runtime does not run (GPU, adapter recipes) the pass is torch: int8 as float32. Training's numerics are
            its own (train.json's ``train_precision``, ``scripts.training.Autocast``).
        inference_runtime: ``torch``, ``onnxruntime`` (float32 or int8) or ``openvino`` (float32 or bfloat16): in
            eval mode, forward passes on CPU tensors run through the graph exported to ONNX (``OnnxRuntimeForward``,
            ``OpenVinoForward``) from the current weights at the first such call and again whenever a weight has
            changed since, by loading or training. The adapter recipes (FFT) and any export that fails warn once and
            stay on torch. Features for MOCL always come from torch.
        foreground_prior: None keeps the decoder's own logits (the paper). A share in (0, 1) adds a trainable
            per-class bias to the logits, set on the first training batch so that its mean logit is
            logit(``foreground_prior``): the pretrained decoder's prompt-free logits start near -20 (probability
            3e-9), far from any foreground share (the prior initialisation of RetinaNet's classifier, from data).
        window_minmax: LiteMedSAM only: True stretches every window to [0, 1] (its pretraining convention); False
            gives the encoder the image scaled by 1/255, so that a pale window with few nuclei is not stretched
            until its tissue looks like nuclei. Kept in the weights (a buffer): inference follows the checkpoint.
    """

    def __init__(self, backbone: str = "litemedsam", checkpoint: str | os.PathLike | None = None,
                 pretrained: bool = True, image_size: int = 1024, trainable: str = "adapter", out_channels: int = 1,
                 freq_rate: float = 0.25, scale_factor: int = 32, checkpoint_sha256: str | None = None,
                 inference_precision: str = "float32", tail_stages: int = 1, foreground_prior: float | None = None,
                 inference_runtime: str = "torch", window_minmax: bool = True):
        super().__init__()
        if foreground_prior is not None and not 0.0 < foreground_prior < 1.0:
            raise ValueError(f"foreground_prior must be None or in (0, 1), got {foreground_prior}")
        if trainable not in TRAINABLE_CHOICES:
            raise ValueError(f"trainable must be one of {TRAINABLE_CHOICES}, got {trainable!r}")
        if inference_precision not in PRECISION_CHOICES:
            raise ValueError(f"inference_precision must be one of {PRECISION_CHOICES}, got {inference_precision!r}")
        check_runtime("inference", inference_runtime, inference_precision, torch_precisions=("float32", "bfloat16"))
        self.inference_runtime = inference_runtime
        self._exported: OnnxRuntimeForward | OpenVinoForward | None = None
        self._exported_weights: tuple = ()  # weights_version() of the exported weights
        self._export_failed = False
        self.inference_precision = inference_precision
        self._precision_checked = False
        sam = _build_backbone(backbone, checkpoint, pretrained, image_size, checkpoint_sha256)
        tokens = sam.mask_decoder.num_mask_tokens
        if not 1 <= out_channels <= tokens:
            raise ValueError(f"out_channels must be 1..{tokens} (the decoder's mask tokens), got {out_channels}")
        self.sam, self.backbone, self.trainable, self.out_channels = sam, backbone, trainable, out_channels
        self.tail_stages = tail_stages
        self.frozen_encoder = [sam.image_encoder]  # the SAM's own encoder (a list: not registered a second time)
        for parameter in sam.image_encoder.parameters():
            parameter.requires_grad = trainable == "full"
        if trainable == "tail":
            for module in tail_modules(sam.image_encoder, tail_stages):
                module.requires_grad_(True)
        if trainable in ("adapter", "full"):
            sam.image_encoder = adapt_encoder(sam.image_encoder, freq_rate, scale_factor)
        for parameter in sam.prompt_encoder.parameters():
            parameter.requires_grad = False
        sam.prompt_encoder.no_mask_embed.weight.requires_grad = True
        self.foreground_prior = foreground_prior
        self.logit_bias = nn.Parameter(torch.zeros(out_channels), requires_grad=foreground_prior is not None)
        self.register_buffer("logit_bias_set", torch.tensor(foreground_prior is None))
        if not window_minmax and sam.normalisation != "minmax":
            raise ValueError(f"window_minmax=False applies to LiteMedSAM's min-max input; {backbone} uses ImageNet "
                             "statistics and never stretches a window")
        self.register_buffer("window_minmax", torch.tensor(float(window_minmax)))
        trained, total = self.parameter_counts()
        recipe = f"trainable={trainable}" + (f", tail_stages={tail_stages}" if trainable == "tail" else "")
        logger.info(f"AllInSamNet({backbone}, {recipe}): {trained:,} of {total:,} parameters trainable")

    @property
    def image_size(self) -> int:
        return self.sam.image_size

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        parameters = list(self.parameters())
        return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; weights of another recipe or backbone fail with a short message saying
        which (instead of hundreds of missing and unexpected names)."""
        defaults = {"logit_bias": torch.zeros_like(self.logit_bias),  # weights from before the output bias:
                    "logit_bias_set": torch.tensor(True),  # the decoder's own logits
                    "window_minmax": torch.tensor(1.0)}  # from before the option: LiteMedSAM's per-window stretch
        added = {name: value for name, value in defaults.items() if name not in state_dict}
        if added:
            metadata = getattr(state_dict, "_metadata", None)
            state_dict = OrderedDict(state_dict, **added)
            if metadata is not None:
                state_dict._metadata = metadata
        if strict:
            own, given = set(self.state_dict()), set(state_dict)
            if own != given:
                missing, unexpected = sorted(own - given), sorted(given - own)
                adapters_given, adapters_here = any(ADAPTER_KEY in k for k in given), any(ADAPTER_KEY in k for k in own)
                if adapters_given and not adapters_here:
                    hint = "they hold SAM-Adapter prompt generators: build the network with --trainable adapter"
                elif adapters_here and not adapters_given:
                    hint = "they hold no SAM-Adapter prompt generators: build it with --trainable tail"
                else:
                    hint = "they are from another backbone or network (--backbone, --sam_checkpoint)"
                raise ValueError(
                    f"weights do not fit AllInSamNet(backbone={self.backbone!r}, trainable={self.trainable!r}): "
                    f"{hint} ({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, "
                    f"e.g. {unexpected[:2]})")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def cacheable(self) -> bool:
        """Whether training can run on cached ``frozen_features`` (``trainable`` is ``tail`` or ``decoder``)."""
        return self.trainable in CACHEABLE_CHOICES

    def train(self, mode: bool = True) -> "AllInSamNet":
        """A frozen (or partly frozen) encoder stays in eval mode (its BatchNorm statistics and drop-path do not
        change; a trained tail still gets gradients)."""
        super().train(mode)
        if self.trainable != "full":
            self.frozen_encoder[0].eval()
        return self

    def forward(self, image: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C, S, S); with ``return_features`` also the decoder's per-pixel embedding E (B, D, S, S)
        (the upscaled image embedding the mask tokens are read from; D = 32 for every SAM here), for MOCL."""
        if self.training:
            return self._forward(image, return_features)
        if self.inference_runtime != "torch" and not return_features and image.device.type == "cpu":
            runtime = self._exported_runtime()
            if runtime is not None:
                self._check_image(image)
                return runtime(image)
        if self.inference_precision != "bfloat16":  # int8 where no exported graph runs: float32 torch
            return self._forward(image, return_features)
        if not self._precision_checked:
            self._precision_checked = True
            if not native_bfloat16(image.device):
                logger.warning("inference_precision bfloat16 on a CPU without native bfloat16 (torch capability "
                               f"{torch.backends.cpu.get_cpu_capability()}): emulated, 6-23x slower than float32 "
                               "as measured; use --inference_precision float32")
        with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16):
            output = self._forward(image, return_features)
        return tuple(part.float() for part in output) if return_features else output.float()

    def weights_version(self) -> tuple:
        """Identity and in-place version counter of every tensor of the state dict: changes whenever a weight is
        loaded, replaced or stepped by an optimizer (not when eval() rebuilds TinyViT's derived attention biases)."""
        return tuple((id(tensor), tensor._version) for tensor in self.state_dict(keep_vars=True).values())

    def _exported_runtime(self) -> OnnxRuntimeForward | OpenVinoForward | None:
        """The ``inference_runtime`` session of the current weights, exported on first use and again after any weight
        changed; None (warned once) where the export fails."""
        if self._exported is not None and self._exported_weights != self.weights_version():
            self._exported = None
        if self._exported is None and not self._export_failed and self.trainable in ("adapter", "full"):
            self._export_failed = True
            logger.warning(f"inference_runtime {self.inference_runtime}: the SAM-Adapter's FFT feature has no ONNX "
                           f"operator, so AllInSamNet(trainable={self.trainable}) infers on torch in float32")
        if self._exported is None and not self._export_failed:
            try:
                example = torch.zeros(1, 3, self.image_size, self.image_size)
                self._exported = exported_forward(self.inference_runtime, lambda image: self._forward(image, False),
                                                  self, (example,), self.inference_precision)
                self._exported_weights = self.weights_version()
            except Exception as error:  # any exporter or runtime failure: torch still runs the network
                self._export_failed = True
                logger.warning(f"inference_runtime {self.inference_runtime}: the export of AllInSamNet("
                               f"{self.backbone}, trainable={self.trainable}) failed, so inference runs on torch in "
                               f"float32 ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
        return self._exported

    def _forward(self, image: torch.Tensor, return_features: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.cacheable:
            return self.forward_features(self.frozen_features(image), return_features)
        self._check_image(image)
        return self._decoded(self.sam.image_encoder(self.encoder_input(image)), return_features)

    def encoder_input(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 1] -> the encoder's input, by the backbone's convention and ``window_minmax``."""
        return self.sam.preprocess(image * 255.0, self.window_minmax.to(image.dtype))

    def frozen_features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 1] -> the output of the frozen part (no gradient): for ``tail`` the tokens
        entering the encoder's tail (LiteMedSAM: (B, 4096, 320) with one tail stage, (B, 4096, 160) with two), for
        ``decoder`` the (B, 256, E, E) embedding."""
        if not self.cacheable:
            raise ValueError(f"trainable={self.trainable!r} trains the whole encoder path: nothing to cache")
        self._check_image(image)
        with torch.no_grad():
            tokens = encoder_prefix(self.sam.image_encoder, self.encoder_input(image), self.tail_stages)
            if self.trainable == "decoder":
                return encoder_tail(self.sam.image_encoder, tokens, self.tail_stages)
            return tokens

    def forward_features(self, features: torch.Tensor, return_features: bool = False
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``frozen_features`` output (cached or fresh) -> logits (B, C, S, S) (and E, as ``forward``)."""
        return self._decoded(self._embed_features(features), return_features)

    def _decoded(self, embeddings: torch.Tensor, return_features: bool
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not return_features:
            return _resized(self.decode(embeddings), self.image_size)
        logits, features = self.decode(embeddings, return_features=True)
        return _resized(logits, self.image_size), _resized(features, self.image_size)

    def _embed_features(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        if self.trainable == "tail":
            return encoder_tail(self.sam.image_encoder, features, self.tail_stages)
        return features

    def _check_image(self, image: torch.Tensor) -> None:
        size = self.image_size
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != (size, size):
            raise ValueError(f"AllInSamNet expects (B, 3, {size}, {size}) RGB in [0, 1], got {tuple(image.shape)}")

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
        logits = self._with_logit_bias(torch.cat(masks)[:, :self.out_channels])
        return (logits, torch.cat(features)) if return_features else logits

    def _with_logit_bias(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) + the per-class ``logit_bias``, which the first training batch sets (``foreground_prior``)."""
        if self.training and not bool(self.logit_bias_set):
            mean = logits.detach().float().mean(dim=(0, 2, 3))
            if dist.is_available() and dist.is_initialized():  # one bias for every rank
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            with torch.no_grad():
                self.logit_bias.copy_(math.log(self.foreground_prior / (1.0 - self.foreground_prior)) - mean)
                self.logit_bias_set.fill_(True)
            logger.info(f"logit bias set on the first batch: {self.logit_bias.tolist()} (mean logit {mean.tolist()})")
        return logits + self.logit_bias.to(logits.dtype).view(1, -1, 1, 1)


class FeatureHead(nn.Module):
    """The trainable part of a cacheable ``AllInSamNet`` as a network of its own: ``frozen_features`` -> logits
    (B, C, S, S). What a trainer runs on cached features; it shares (and saves as) the wrapped network's weights."""

    def __init__(self, network: AllInSamNet):
        super().__init__()
        if not network.cacheable:
            raise ValueError(f"trainable={network.trainable!r}: only 'tail' or 'decoder' train on cached features")
        self.network = network

    def forward(self, features: torch.Tensor, return_features: bool = False):
        return self.network.forward_features(features, return_features)


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
