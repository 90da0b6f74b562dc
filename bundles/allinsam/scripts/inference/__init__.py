from .tile_predictor import TilePredictor, load_checkpoint

__all__ = ["TilePredictor", "load_checkpoint"]
