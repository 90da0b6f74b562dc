from .allinsam_net import AllInSamNet, FeatureHead, recipe_of_checkpoint
from .encoder_tail import encoder_prefix, encoder_tail, tail_modules
from .onnx_runtime import ONNX_PRECISION_CHOICES, RUNTIME_CHOICES, OnnxRuntimeForward
from .sam_adapter import (
    AdaptedTinyViTEncoder,
    AdaptedViTEncoder,
    PromptGenerator,
    adapt_encoder,
    high_frequency_component,
)
from .sam_backbones import (
    LITEMEDSAM_SHA256,
    SamBackbone,
    build_sam_vit,
    fuse_conv_bn_for_inference,
    load_litemedsam,
    load_sam,
    read_network_weights,
    sha256_of_file,
)

__all__ = [
    "read_network_weights",
    "recipe_of_checkpoint",
    "LITEMEDSAM_SHA256",
    "ONNX_PRECISION_CHOICES",
    "RUNTIME_CHOICES",
    "AdaptedTinyViTEncoder",
    "AdaptedViTEncoder",
    "AllInSamNet",
    "FeatureHead",
    "OnnxRuntimeForward",
    "PromptGenerator",
    "SamBackbone",
    "adapt_encoder",
    "build_sam_vit",
    "encoder_prefix",
    "encoder_tail",
    "fuse_conv_bn_for_inference",
    "high_frequency_component",
    "load_litemedsam",
    "load_sam",
    "sha256_of_file",
    "tail_modules",
]
