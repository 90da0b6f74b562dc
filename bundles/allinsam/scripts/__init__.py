"""Code of the allinsam bundle.

- ``networks/``: SAM-family backbones (LiteMedSAM, segment-anything ViT-B/L/H) and their loading.
- ``annotation/``: SAM-empowered annotation, boxes -> instance maps; marker-guided cell classes (P2).
- ``registration/``: ITK registration of an IF image to the PAS image, and the molecular-labels workflow.
- ``data/``: instance maps, boxes, class maps and image/label file I/O shared by every workflow.
- ``losses/``: Dice + BCE per class and MOCL (molecular-oriented corrective learning).
- ``metrics/``: the nuclei metrics of every workflow and both bundles.
- ``training/``: kill-safe checkpoints, resuming a run (or starting from another run's weights), NaN stop, torchrun.
- ``inference/``: one tile through inference.json's recipe (``TilePredictor``), checkpoint loading, test-time
  mirroring (``MirroredInferer``), the threshold and instance split chosen on validation images (``calibrate``).
- ``wsi/``: whole-slide inference: tissue tiles, stitched instances, QuPath GeoJSON / instance TIFF / NIfTI; cohorts
  sharded across torchrun ranks (``cohort.py``).
"""

from pathlib import Path

# The configs resolve paths against this, so ``monai.bundle run`` works from any working directory.
BUNDLE_ROOT = str(Path(__file__).resolve().parent.parent)


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
