"""Post-processing chosen on validation images: the probability threshold and the instance split a trained model
is used with. Short CPU trainings leave the model under-confident (its best validation threshold is often 0.15-0.30),
so 0.5 would throw away nuclei it found; ``calibrate.json`` measures the choice once per checkpoint and every
workflow (inference, evaluation, whole slides, the MONAI Label app) reads it from ``calibration_file``.
"""

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist
from PIL import Image

from ..data import INSTANCE_METHODS, read_instance_map, write_json_atomic
from ..metrics import nuclei_metrics
from ..networks.sam_backbones import sha256_of_file

CALIBRATION_THRESHOLDS = tuple(round(0.05 + 0.05 * step, 2) for step in range(19))  # 0.05, 0.10, ..., 0.95
UNCALIBRATED = {"threshold": 0.5, "instances": "components"}


def calibration_path(ckpt_path: str | os.PathLike) -> Path:
    """Where a checkpoint's calibration lives by default: ``models/model.pt`` -> ``models/model_calibration.json``."""
    path = Path(ckpt_path)
    return path.with_name(f"{path.stem}_calibration.json")


def choose_postprocessing(cases: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """The threshold (of ``CALIBRATION_THRESHOLDS``) by the one-standard-error rule over ``cases`` ((H, W)
    probability in [0, 1], (H, W) instance map): of the thresholds whose mean Dice is within one standard error of the
    best one's (the error of the per-image Dice differences, paired; none with one image), the one nearest 0.5. A
    threshold away from 0.5 has to beat it by more than the spread of a few validation images: with weak labels
    (SAM's masks, larger than the nuclei) the plain best pulled the threshold down by 0.2-0.3 at 4 %
    (``docs/results/convergence_0.5pct.md`` section 21). Then the instance split (``INSTANCE_METHODS``) with the best
    mean AJI at it; with the per-choice means and the plain best threshold."""
    per_image = np.array([[nuclei_metrics(p, y, t, names=("dice",))["dice"] for t in CALIBRATION_THRESHOLDS]
                          for p, y in cases])  # (images, thresholds)
    mean = per_image.mean(axis=0)
    nearest_half = [abs(t - UNCALIBRATED["threshold"]) for t in CALIBRATION_THRESHOLDS]
    best = max(range(len(mean)), key=lambda index: (mean[index], -nearest_half[index]))  # ties: nearest 0.5
    gaps = per_image[:, [best]] - per_image
    error = gaps.std(axis=0, ddof=1) / np.sqrt(len(cases)) if len(cases) > 1 else np.zeros(len(mean))
    admissible = [index for index in range(len(mean)) if gaps[:, index].mean() <= error[index]]
    chosen = min(admissible, key=lambda index: (nearest_half[index], -mean[index]))
    threshold = CALIBRATION_THRESHOLDS[chosen]
    aji = {method: float(np.mean([nuclei_metrics(p, y, threshold, method, names=("aji",))["aji"] for p, y in cases]))
           for method in INSTANCE_METHODS}
    return {"threshold": threshold, "instances": max(aji, key=aji.get),
            "dice_by_threshold": dict(zip(CALIBRATION_THRESHOLDS, map(float, mean))),
            "best_dice_threshold": CALIBRATION_THRESHOLDS[best], "aji_by_instances": aji}


def calibrate(predictions_dir: str | os.PathLike, datalist: str | os.PathLike, split: str,
              ckpt_path: str | os.PathLike, calibration_file: str | os.PathLike,
              mirror_axes: Sequence[int] = ()) -> dict:
    """Choose the post-processing from the ``<name>_prob.png`` maps that inference.json wrote into
    ``predictions_dir`` for the ``split`` images of ``datalist`` (scored against their own ``instances``: SAM pseudo
    masks in the weak setting), and write it with ``ckpt_path``'s SHA-256 and the test-time ``mirror_axes`` the maps
    were predicted with to ``calibration_file``. The test split is refused: it is for scoring.
    """
    if split == "test":
        raise ValueError("calibration chooses post-processing on validation images; the test split is for scoring")
    predictions_dir, datalist = Path(predictions_dir), Path(datalist)
    entries = load_decathlon_datalist(datalist, data_list_key=split, base_dir=datalist.parent)
    if not entries:
        raise ValueError(f"{datalist}: no {split!r} images to calibrate on")
    cases = []
    for entry in entries:
        probability_png = predictions_dir / f"{Path(entry['image']).stem}_prob.png"
        if not probability_png.is_file():
            raise FileNotFoundError(f"{probability_png}: missing (run inference.json on the {split} split first)")
        with Image.open(probability_png) as probability:
            cases.append((np.asarray(probability, dtype=np.float64) / 255, read_instance_map(entry["instances"])))
    chosen = choose_postprocessing(cases)
    record = {"threshold": chosen["threshold"], "instances": chosen["instances"], "checkpoint": str(ckpt_path),
              "checkpoint_sha256": sha256_of_file(ckpt_path), "mirror_axes": [int(axis) for axis in mirror_axes],
              "datalist": str(datalist), "split": split, "images": len(cases),
              **{key: chosen[key] for key in ("dice_by_threshold", "best_dice_threshold", "aji_by_instances")}}
    write_json_atomic(calibration_file, record)
    dice, aji = chosen["dice_by_threshold"], chosen["aji_by_instances"]
    best = chosen["best_dice_threshold"]
    print(f"{calibration_file}: threshold {chosen['threshold']} ({split} Dice {dice[chosen['threshold']]:.4f}; "
          f"best {best}: {dice[best]:.4f}; at 0.5 {dice[0.5]:.4f}), instances {chosen['instances']} "
          f"(AJI {aji[chosen['instances']]:.4f}), {len(cases)} images")
    return record


def calibrated_postprocessing(ckpt_path: str | os.PathLike | None, calibration_file: str | os.PathLike | None,
                              mirror_axes: Sequence[int] = ()) -> dict:
    """``{"threshold", "instances"}`` from ``calibration_file`` when it exists and was measured on this very
    checkpoint; ``UNCALIBRATED`` (0.5, components) when there is none, with a warning when it belongs to other
    weights (a retrained ``model.pt``). A warning too when it was measured with other test-time ``mirror_axes`` than
    the inference that uses it (a file without them: none, as before mirroring existed)."""
    if calibration_file is None or not Path(calibration_file).is_file():
        return dict(UNCALIBRATED)
    try:
        record = json.loads(Path(calibration_file).read_text())
        chosen = {"threshold": float(record["threshold"]), "instances": str(record["instances"]),
                  "sha256": str(record["checkpoint_sha256"]),
                  "mirror_axes": [int(axis) for axis in record.get("mirror_axes", [])]}
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{calibration_file}: not a calibration written by calibrate.json ({error})") from None
    if chosen["instances"] not in INSTANCE_METHODS or not 0 < chosen["threshold"] < 1:
        raise ValueError(f"{calibration_file}: threshold {chosen['threshold']} / instances {chosen['instances']!r} "
                         f"out of range (0 < threshold < 1, instances one of {INSTANCE_METHODS})")
    if ckpt_path is None or not Path(ckpt_path).is_file() or sha256_of_file(ckpt_path) != chosen["sha256"]:
        warnings.warn(f"{calibration_file} was measured on other weights than {ckpt_path}; using threshold "
                      f"{UNCALIBRATED['threshold']} and {UNCALIBRATED['instances']} (rerun calibrate.json)",
                      stacklevel=2)
        return dict(UNCALIBRATED)
    if chosen["mirror_axes"] != [int(axis) for axis in mirror_axes]:
        warnings.warn(f"{calibration_file} was measured with mirror_axes {chosen['mirror_axes']}, this inference "
                      f"mirrors {list(mirror_axes)}: its threshold may not fit (rerun calibrate.json with the same "
                      f"--mirror_axes)", stacklevel=2)
    return {"threshold": chosen["threshold"], "instances": chosen["instances"]}
