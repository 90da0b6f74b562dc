from .calibration import (
    CALIBRATION_THRESHOLDS,
    UNCALIBRATED,
    calibrate,
    calibrated_postprocessing,
    calibration_path,
    choose_postprocessing,
)
from .mirrored_inferer import MirroredInferer
from .tile_predictor import TilePredictor, load_checkpoint

__all__ = [
    "CALIBRATION_THRESHOLDS",
    "UNCALIBRATED",
    "MirroredInferer",
    "TilePredictor",
    "calibrate",
    "calibrated_postprocessing",
    "calibration_path",
    "choose_postprocessing",
    "load_checkpoint",
]
