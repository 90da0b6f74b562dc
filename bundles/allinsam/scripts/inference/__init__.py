from .calibration import (
    CALIBRATION_THRESHOLDS,
    UNCALIBRATED,
    calibrate,
    calibrated_postprocessing,
    calibration_path,
    choose_postprocessing,
)
from .tile_predictor import TilePredictor, load_checkpoint

__all__ = [
    "CALIBRATION_THRESHOLDS",
    "UNCALIBRATED",
    "TilePredictor",
    "calibrate",
    "calibrated_postprocessing",
    "calibration_path",
    "choose_postprocessing",
    "load_checkpoint",
]
