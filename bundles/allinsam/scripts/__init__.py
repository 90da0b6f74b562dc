"""Code of the allinsam bundle.

- ``networks/``: SAM-family backbones (LiteMedSAM, segment-anything ViT-B/L/H) and their loading.
- ``annotation/``: SAM-empowered annotation, boxes -> instance maps; marker-guided cell classes (P2).
- ``registration/``: ITK registration of an IF image to the PAS image, and the molecular-labels workflow.
- ``data/``: instance maps, boxes, class maps and image/label file I/O shared by every workflow.
- ``losses/``: Dice + BCE per class and MOCL (molecular-oriented corrective learning).
- ``metrics/``: the nuclei metrics of every workflow and both bundles.
- ``training/``: kill-safe checkpoints, resuming a run (or starting from another run's weights), NaN stop, torchrun.
- ``inference/``: one tile through inference.json's recipe (``TilePredictor``), checkpoint loading, the
  threshold and instance split chosen on validation images (``calibrate``).
- ``wsi/``: whole-slide inference: tissue tiles, stitched instances, QuPath GeoJSON / instance TIFF / NIfTI; cohorts
  sharded across torchrun ranks (``cohort.py``).
"""

from pathlib import Path

# The configs resolve paths against this, so ``monai.bundle run`` works from any working directory.
BUNDLE_ROOT = str(Path(__file__).resolve().parent.parent)
