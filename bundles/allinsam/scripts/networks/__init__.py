from .sam_backbones import (
    LITEMEDSAM_SHA256,
    SamBackbone,
    build_sam_vit,
    fuse_conv_bn_for_inference,
    load_litemedsam,
    load_sam,
    sha256_of_file,
)

__all__ = [
    "LITEMEDSAM_SHA256",
    "SamBackbone",
    "build_sam_vit",
    "fuse_conv_bn_for_inference",
    "load_litemedsam",
    "load_sam",
    "sha256_of_file",
]
