"""One tile through the bundle's inference recipe, for the workflows that hold pixels rather than files."""

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import CheckpointLoader
from monai.transforms import Compose


def load_checkpoint(network: torch.nn.Module, ckpt_path: str | os.PathLike, device: torch.device | str) -> None:
    """Load ``ckpt_path`` (a ``model.pt`` state dict or a ``{"model": ...}`` checkpoint) with MONAI's
    CheckpointLoader, as inference.json's handler does."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"{ckpt_path}: checkpoint not found (set --ckpt_path to a trained model.pt)")
    CheckpointLoader(load_path=str(ckpt_path), load_dict={"model": network}, map_location=device)(
        Engine(lambda engine, batch: None))


class TilePredictor:
    """RGB uint8 tile (h, w, 3) -> ``{"pred": (C, h, w) float32 probabilities, "mask": (C, h, w) bool}``.

    Runs inference.json's own objects (``tile_predictor`` there): its ``load`` transforms after the file reader
    (channel first, scaling to [0, 1]), ``inferer`` on ``network`` (eval mode, no gradients) and ``activation``
    (sigmoid, threshold). The whole-slide workflow predicts every tile through it, so a change to the recipe reaches
    slides and single images alike.
    """

    def __init__(self, network: torch.nn.Module, inferer: Callable, preprocessing: Sequence[Callable],
                 postprocessing: Sequence[Callable], device: torch.device | str = "cpu"):
        self.network, self.inferer, self.device = network, inferer, device
        self.preprocessing, self.postprocessing = Compose(preprocessing), Compose(postprocessing)

    def __call__(self, tile: np.ndarray) -> dict[str, np.ndarray]:
        if tile.ndim != 3 or tile.shape[2] != 3:
            raise ValueError(f"a tile must be RGB (h, w, 3), got shape {tile.shape}")
        # what LoadImaged hands the load transforms: channel last, marked as such
        image = MetaTensor(torch.as_tensor(np.ascontiguousarray(tile)), meta={"original_channel_dim": -1})
        batch = self.preprocessing({"image": image})["image"][None].to(self.device)
        self.network.eval()
        with torch.no_grad():
            logits = self.inferer(batch, self.network)
        outputs = self.postprocessing({"pred": logits[0]})
        return {"pred": _float32(outputs["pred"]), "mask": _float32(outputs["mask"]) > 0}


def _float32(tensor: torch.Tensor) -> np.ndarray:
    return torch.as_tensor(tensor).detach().float().cpu().numpy()
