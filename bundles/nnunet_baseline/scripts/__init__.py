"""Code of the nnunet_baseline bundle: nnU-Net v2 (2d) on the allinsam bundle's prepared datalists.

- ``raw_dataset``: a datalist split -> an nnU-Net raw dataset (``imagesTr``, ``labelsTr``, ``dataset.json``).
- ``experiment``: ``NnUNetExperiment``, plan + preprocess, train (CPU or GPU, resumable) and predict through
  nnunetv2's own API, predictions written in the allinsam bundle's layout (``<name>_prob.png``, ``<name>_mask.png``).
"""

from pathlib import Path

from .experiment import NnUNetExperiment
from .raw_dataset import datalist_images, write_raw_dataset

# The configs resolve paths against this, so ``monai.bundle run`` works from any working directory.
BUNDLE_ROOT = str(Path(__file__).resolve().parent.parent)

__all__ = ["BUNDLE_ROOT", "NnUNetExperiment", "datalist_images", "flag", "write_raw_dataset"]


# the same check as the allinsam bundle's scripts.flag: each bundle is shipped alone
def flag(value: bool | int | str, name: str) -> bool:
    """A yes / no option as ``monai.bundle run`` hands it over: a bool (the config, ``--<option> False``), 0 / 1, or the
    string of ``--<option> false`` / ``true`` (fire keeps lowercase words as strings, and any non-empty string is
    true, so ``--use_mirroring false`` would mirror). Anything else is refused, naming the option."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"--{name} must be true or false, got {value!r}")
