from .sam_backbones import LITEMEDSAM_SHA256, SamParts, load_litemedsam, sha256_of_file

__all__ = ["LITEMEDSAM_SHA256", "SamParts", "load_litemedsam", "sha256_of_file"]
