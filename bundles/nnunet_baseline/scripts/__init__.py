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

__all__ = ["BUNDLE_ROOT", "NnUNetExperiment", "datalist_images", "write_raw_dataset"]
