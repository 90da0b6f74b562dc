"""SAM-empowered annotation: one box per nucleus -> an instance label map.

The image is covered by fixed native-resolution tiles of the encoder's input size; each box is decoded in the
tile where it is most central; the image embedding is computed once per tile and all boxes of that tile go
through the mask decoder in one batched call.
"""

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import read_boxes_json, write_json_atomic, write_png_atomic

logger = logging.getLogger(__name__)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``; the last tile ends at ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def validate_boxes(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, list[dict]]:
    """Clip boxes (N, 4) ``[x0, y0, x1, y1]`` to the image; return the clipped boxes and why others were skipped.

    A skipped box keeps its row (as NaN) so that instance id i + 1 always belongs to input box i.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    skipped = []
    for index, (box, box_clipped) in enumerate(zip(boxes, clipped)):
        if not np.isfinite(box).all():
            reason = "not a finite number"
        elif box[2] <= box[0] or box[3] <= box[1]:
            reason = "empty or inverted (x1 <= x0 or y1 <= y0)"
        elif box_clipped[2] <= box_clipped[0] or box_clipped[3] <= box_clipped[1]:
            reason = "outside the image"
        else:
            continue
        skipped.append({"index": index, "box": box.tolist(), "reason": reason})
        clipped[index] = np.nan
    return clipped, skipped


class BoxPromptedSegmenter:
    """Box-prompted SAM over fixed native tiles.

    Args:
        sam: a backbone with ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` and ``image_size``.
        stride: tile stride in pixels (tiles overlap by ``image_size - stride``).
        device: where the network runs.
    """

    def __init__(self, sam, stride: int = 192, device: str | torch.device = "cpu"):
        self.sam = sam.to(device).eval()
        self.tile = int(sam.image_size)
        self.stride = stride
        self.device = torch.device(device)

    def _normalise(self, tile: np.ndarray) -> torch.Tensor:
        """(h, w, 3) uint8 -> (1, 3, tile, tile) float, min-max scaled to [0, 1] as LiteMedSAM was trained."""
        image = torch.from_numpy(tile).to(self.device, torch.float32).permute(2, 0, 1)[None]
        image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-8)
        pad_h, pad_w = self.tile - tile.shape[0], self.tile - tile.shape[1]
        return F.pad(image, (0, pad_w, 0, pad_h))

    @torch.no_grad()
    def _decode_tile(self, tile: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """Mask logits (N, h, w) for boxes (N, 4) given in tile pixel coordinates."""
        embedding = self.sam.image_encoder(self._normalise(tile))
        sparse, dense = self.sam.prompt_encoder(
            points=None, boxes=torch.as_tensor(boxes, dtype=torch.float32, device=self.device), masks=None
        )
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        logits = F.interpolate(low_res, size=(self.tile, self.tile), mode="bilinear", align_corners=False)
        return logits[:, 0, : tile.shape[0], : tile.shape[1]]

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, dict]:
        """Instance map (H, W) uint16 where id i + 1 is the mask of box i, and a report of used / skipped boxes.

        Overlaps go to the box with the higher mask logit (the lower index on ties).
        """
        height, width = image.shape[:2]
        boxes, skipped = validate_boxes(boxes, height, width)
        valid = np.flatnonzero(np.isfinite(boxes[:, 0]))
        tiles = [(y, x) for y in tile_starts(height, self.tile, self.stride) for x in tile_starts(width, self.tile, self.stride)]
        origins = np.array(tiles, dtype=np.float64).reshape(-1, 2)
        centres = np.stack([(boxes[valid, 1] + boxes[valid, 3]) / 2, (boxes[valid, 0] + boxes[valid, 2]) / 2], 1)
        # distance from each box centre to the nearest border of each tile: (N, T); most central tile wins
        offsets = centres[:, None, :] - origins[None, :, :]
        margin = np.minimum(offsets, self.tile - offsets).min(axis=2)
        home_tile = margin.argmax(axis=1) if len(valid) else np.zeros(0, dtype=int)

        instances = np.zeros((height, width), dtype=np.uint16)
        best_logit = np.full((height, width), -np.inf, dtype=np.float32)
        for tile_index, (y0, x0) in enumerate(tiles):
            members = valid[home_tile == tile_index]
            if len(members) == 0:
                continue
            tile = image[y0 : y0 + self.tile, x0 : x0 + self.tile]
            logits = self._decode_tile(tile, boxes[members] - [x0, y0, x0, y0]).cpu().numpy()
            top = logits.argmax(axis=0)
            top_logit = np.take_along_axis(logits, top[None], axis=0)[0]
            region = (slice(y0, y0 + tile.shape[0]), slice(x0, x0 + tile.shape[1]))
            wins = (top_logit > 0) & (top_logit > best_logit[region])
            instances[region][wins] = members[top[wins]] + 1
            best_logit[region][wins] = top_logit[wins]

        found = np.unique(instances[instances > 0]) - 1
        empty = sorted(set(valid.tolist()) - set(found.tolist()))
        report = {
            "boxes_total": int(len(boxes)),
            "boxes_used": int(len(found)),
            "boxes_skipped": skipped + [{"index": int(i), "reason": "SAM returned an empty mask"} for i in empty],
            "tiles_encoded": int(len(np.unique(home_tile))),
        }
        return instances, report


def annotate_dataset(dataset, segmenter: BoxPromptedSegmenter, output_dir: str) -> list[dict]:
    """Annotate every item ``{"image": (3, H, W) array, "boxes": path of a boxes JSON}`` of ``dataset``.

    Writes per image ``<name>_instances.png`` (uint16 ids), ``<name>_mask.png`` (uint8 0/1) and
    ``<name>_annotation.json`` (boxes used / skipped and why, seconds) into ``output_dir``; returns the reports.
    """
    output = Path(output_dir)
    reports = []
    for item in tqdm(dataset, desc="annotate", unit="image"):
        image_path = Path(item["image"].meta["filename_or_obj"])
        name = image_path.stem
        start = time.perf_counter()
        image = np.asarray(item["image"]).transpose(1, 2, 0).astype(np.uint8)
        instances, report = segmenter(image, read_boxes_json(item["boxes"]))
        report.update(image=str(image_path), boxes_file=str(item["boxes"]), seconds=round(time.perf_counter() - start, 3))
        write_png_atomic(output / f"{name}_instances.png", instances)
        write_png_atomic(output / f"{name}_mask.png", (instances > 0).astype(np.uint8))
        write_json_atomic(output / f"{name}_annotation.json", report)
        logger.info(f"{name}: {report['boxes_used']}/{report['boxes_total']} boxes -> masks in {report['seconds']} s")
        reports.append(report)
    return reports
