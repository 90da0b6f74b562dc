"""SAM-empowered annotation: one box (or point) per nucleus -> an instance label map.

The image is covered by a regular grid of windows (the encoder's input size times ``1 / zoom``, in image pixels);
each prompt is decoded in the window where its centre is farthest from the window border, so a prompt that
crosses window borders is still decoded exactly once. One encoder pass per window that has prompts. The decoder
sees a crop of the image embedding around each prompt (``decoder_context`` pixels beyond the box; the positional
encoding is cropped alike), and prompts whose crops have the same size go through the decoder in one batched call,
each with its own crop.
"""

import functools
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from tqdm import tqdm

from ..data import check_entries, write_json_atomic, write_png_atomic
from ..networks import SamBackbone, check_runtime, exported_forward
from .prompts import read_prompts

logger = logging.getLogger(__name__)
NO_MASK_LOGIT = -20.0  # a mask prompt's value where nothing is known
CROP_GRID = 4  # decoder crop sides and starts are multiples of this many tokens (few sizes: few decoder calls)
DECODER_BATCH = 64  # prompts per decoder call at most: memory stays bounded however many prompts a window has
MAX_PROMPTS = 65535  # instance ids are uint16 (the PNG instance maps); prompt i keeps id i + 1


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``; the last tile ends at ``length``."""
    return [int(start) for (start, _), in dense_patch_slices((length,), (tile,), (stride,), return_slice=False)]


def check_prompt_count(count: int) -> None:
    """ValueError when an image has more prompts than instance ids (``MAX_PROMPTS``)."""
    if count > MAX_PROMPTS:
        raise ValueError(f"{count} prompts for one image: at most {MAX_PROMPTS} (instance ids are 16-bit); "
                         "split the image into tiles")


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


def decode_crops(decoder: torch.nn.Module, embeddings: torch.Tensor, image_pe: torch.Tensor,
                 sparse: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``MaskDecoder`` on n prompts, each with its own embedding crop: mask logits (n, M, 4k, 4k) and IoU
    predictions (n, M) for embeddings, positional encodings and dense prompt embeddings (n, 256, k, k) and sparse
    prompt embeddings (n, T, 256). The decoder's own ``predict_masks`` repeats one image and one positional encoding
    for every prompt, which crops at different places cannot share; the steps are its own."""
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]).expand(sparse.shape[0], -1, -1)
    hidden, image = decoder.transformer(embeddings + dense, image_pe, torch.cat([tokens, sparse], dim=1))
    upscaled = decoder.output_upscaling(image.transpose(1, 2).reshape(embeddings.shape))
    mask_tokens = hidden[:, 1 : 1 + decoder.num_mask_tokens]
    hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    masks = (hyper @ upscaled.flatten(2)).view(upscaled.shape[0], -1, upscaled.shape[2], upscaled.shape[3])
    return masks, decoder.iou_prediction_head(hidden[:, 0])


class PromptRegions(NamedTuple):
    """One image's prompts, checked (``BoxPromptedSegmenter._prompt_regions``); K = boxes + points."""

    regions: np.ndarray  # (K, 4) [x0, y0, x1, y1] image pixels, NaN for a skipped prompt
    clip_regions: np.ndarray  # (K, 4) where each mask may be pasted
    decode_as_point: np.ndarray  # (K,) bool: decoded with a point prompt
    valid: np.ndarray  # indices of the prompts that are decoded
    skipped: list[dict]  # the prompts left out, and why
    boxes_total: int
    points_total: int


class BoxPromptedSegmenter:
    """Prompts -> instance map with a SAM backbone.

    Args:
        sam: the backbone (``scripts.networks.load_sam``).
        zoom: encoder pixels per image pixel; 1 = native resolution (a 256 window for LiteMedSAM).
        stride: window stride in image pixels; default three quarters of the window.
        decoder_context: pixels of context around a box in the decoder's embedding crop; None = whole embedding.
        threshold: mask logit above which a pixel belongs to the nucleus.
        clip_margin: a box's mask is cut to the box grown by this many pixels; None = not cut.
        multimask: decode three masks and keep the one with the highest predicted IoU.
        refine: decode again with the first mask as a mask prompt.
        flip: average the logits with those of the horizontally flipped window (two encoder passes).
        point_box: side in pixels of the square around a point prompt that its mask is cut to; a backbone trained
            with boxes only gets that square as its prompt instead of the point.
        device: where the network runs.
        encoder_runtime: ``torch``, ``onnxruntime`` or ``openvino``: on the CPU the image encoder runs through the
            graph exported here once (``OnnxRuntimeForward``, ``OpenVinoForward``). Elsewhere torch.
        encoder_precision: ``float32``; ``int8`` with onnxruntime (dynamic quantisation of the encoder's MatMul
            nodes); ``bfloat16`` with openvino (native bfloat16 where the CPU has it, else float32).
        decoder_runtime, decoder_precision: the same for the mask decoder (``decode_crops``, exported once with the
            number of prompts and the crop side free); the prompt encoder stays on torch.
        cached_windows: how many windows' embeddings to keep, keyed by the window's pixels (least recently used
            dropped first; 4 MiB each for LiteMedSAM), so that new prompts on a tile seen before skip the encoder
            (the MONAI Label app); 0 keeps none.
    """

    def __init__(self, sam: SamBackbone, zoom: float = 0.75, stride: int | None = None,
                 decoder_context: float | None = 32, threshold: float = -3.0, clip_margin: float | None = 0,
                 multimask: bool = False, refine: bool = False, flip: bool = False, point_box: float = 32,
                 device: str | torch.device = "cpu", encoder_runtime: str = "torch",
                 encoder_precision: str = "float32", decoder_runtime: str = "torch", decoder_precision: str = "float32",
                 cached_windows: int = 0):
        for part, runtime, precision in (("encoder", encoder_runtime, encoder_precision),
                                         ("decoder", decoder_runtime, decoder_precision)):
            check_runtime(part, runtime, precision)
        self.sam = sam.to(device).eval()
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        self.encoder = self._encoder(encoder_runtime if on_cpu else "torch", encoder_precision)
        self.decoder = self._decoder(decoder_runtime if on_cpu else "torch", decoder_precision)
        self.window = round(sam.image_size / zoom)
        self.stride = stride or round(0.75 * self.window)
        self.scale = sam.image_size / self.window  # encoder pixels per image pixel
        self.pixels_per_token = sam.image_size / sam.embedding_size  # encoder pixels
        self.decoder_context, self.threshold, self.clip_margin = decoder_context, threshold, clip_margin
        self.multimask, self.refine, self.flip, self.point_box = multimask, refine, flip, point_box
        with torch.no_grad():
            self.image_pe = sam.prompt_encoder.get_dense_pe().to(self.device)
        self.cached_windows = cached_windows
        self._embeddings: OrderedDict[bytes, list[torch.Tensor]] = OrderedDict()
        self.windows_reused = 0  # encoder passes saved by the cache so far

    def _encoder(self, runtime: str, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """(B, 3, S, S) float32 RGB in [0, 255] -> image embeddings (B, 256, E, E): torch, or an exported session
        (ONNX Runtime's does not spin between calls: torch runs the decoder side in between)."""
        sam = self.sam

        def encode(image: torch.Tensor) -> torch.Tensor:
            return sam.image_encoder(sam.preprocess(image))

        if runtime == "torch":
            return encode
        example = torch.zeros(1, 3, sam.image_size, sam.image_size)
        return exported_forward(runtime, encode, sam, (example,), precision, spinning=False)

    def _decoder(self, runtime: str, precision: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """``decode_crops`` with SAM's mask decoder: torch, or an exported session with the number of prompts n, the
        prompt tokens T and the crop side k free."""
        decoder = self.sam.mask_decoder
        decode = functools.partial(decode_crops, decoder)
        if runtime == "torch":
            return decode
        crop = torch.zeros(2, decoder.transformer_dim, 4 * CROP_GRID, 4 * CROP_GRID)
        examples = (crop, crop, torch.zeros(2, 2, decoder.transformer_dim), crop)
        crop_axes = {0: "prompts", 2: "side", 3: "side"}
        axes = {"input0": crop_axes, "input1": crop_axes, "input2": {0: "prompts", 1: "tokens"}, "input3": crop_axes,
                "output0": {0: "prompts", 2: "mask_side", 3: "mask_side"}, "output1": {0: "prompts"}}
        return exported_forward(runtime, decode, decoder, examples, precision, spinning=False, dynamic_axes=axes,
                                outputs=2)

    # --- encoder ---------------------------------------------------------------------------------------------------

    def _encode(self, window: np.ndarray) -> list[torch.Tensor]:
        """(h, w, 3) uint8 window -> its embedding (1, 256, E, E), and the flipped window's when ``flip``; from the
        cache when the same pixels were encoded before."""
        window = np.ascontiguousarray(window)
        if self.cached_windows == 0:
            return self._encode_pass(window)
        digest = hashlib.blake2b(repr(window.shape).encode(), digest_size=16)
        digest.update(window.tobytes())
        key = digest.digest()
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            self.windows_reused += 1
            return self._embeddings[key]
        self._embeddings[key] = self._encode_pass(window)
        while len(self._embeddings) > self.cached_windows:
            self._embeddings.popitem(last=False)
        return self._embeddings[key]

    def _encode_pass(self, window: np.ndarray) -> list[torch.Tensor]:
        """One encoder pass (two with ``flip``) over a (h, w, 3) uint8 window."""
        image = torch.from_numpy(window).to(self.device, torch.float32).permute(2, 0, 1)[None]
        image = F.pad(image, (0, self.window - window.shape[1], 0, self.window - window.shape[0]))
        if self.window != self.sam.image_size:
            image = F.interpolate(image, size=(self.sam.image_size,) * 2, mode="bilinear", antialias=True)
        images = torch.cat([image, image.flip(-1)]) if self.flip else image
        embeddings = self.encoder(images)
        return list(embeddings.split(1))

    # --- decoder ---------------------------------------------------------------------------------------------------

    def _crop_of(self, prompt_box: np.ndarray) -> tuple[int, int, int]:
        """Embedding crop ``(k, ty, tx)`` in tokens around a prompt box given in encoder pixels: side k, start."""
        size = self.sam.embedding_size
        if self.decoder_context is None:
            return size, 0, 0
        extent = (max(prompt_box[2] - prompt_box[0], prompt_box[3] - prompt_box[1])
                  + 2 * self.decoder_context * self.scale)
        k = min(size, CROP_GRID * math.ceil(extent / self.pixels_per_token / CROP_GRID))
        centre_y = (prompt_box[1] + prompt_box[3]) / 2 / self.pixels_per_token
        centre_x = (prompt_box[0] + prompt_box[2]) / 2 / self.pixels_per_token
        ty, tx = (int(np.clip(CROP_GRID * round((c - k / 2) / CROP_GRID), 0, size - k)) for c in (centre_y, centre_x))
        return k, ty, tx

    def _decode_crops(self, embedding: torch.Tensor, k: int, starts: np.ndarray, boxes: torch.Tensor | None,
                      points: torch.Tensor | None, mask_prompt: torch.Tensor | None, multimask: bool) -> torch.Tensor:
        """Mask logits (n, 1, 4k, 4k) of n prompts (encoder pixels), prompt i on the embedding crop of side k
        starting at token ``starts[i]`` (ty, tx)."""
        point_prompt = None if points is None else (points[:, None, :], torch.ones(len(points), 1, device=self.device))
        sparse, dense = self.sam.prompt_encoder(points=point_prompt, boxes=boxes, masks=mask_prompt)  # dense: (n, ...)

        def cropped(maps: torch.Tensor) -> torch.Tensor:  # (1 or n, C, E, E) -> (n, C, k, k), row i at starts[i]
            return torch.stack([maps[i % len(maps), :, ty : ty + k, tx : tx + k] for i, (ty, tx) in enumerate(starts)])

        masks, iou = self.decoder(cropped(embedding), cropped(self.image_pe), sparse, cropped(dense))
        if not multimask:
            return masks[:, :1]
        masks, iou = masks[:, 1:], iou[:, 1:]
        return masks.gather(1, iou.argmax(1).view(-1, 1, 1, 1).expand(-1, 1, *masks.shape[2:]))

    def _decode(self, embedding: torch.Tensor, k: int, starts: np.ndarray, boxes: torch.Tensor | None,
                points: torch.Tensor | None) -> torch.Tensor:
        logits = self._decode_crops(embedding, k, starts, boxes, points, None, self.multimask)
        if self.refine:
            side = 4 * self.sam.embedding_size
            mask_prompt = torch.full((len(logits), 1, side, side), NO_MASK_LOGIT, device=self.device)
            for row, (ty, tx) in enumerate(starts):
                mask_prompt[row, :, 4 * ty : 4 * (ty + k), 4 * tx : 4 * (tx + k)] = logits[row]
            logits = self._decode_crops(embedding, k, starts, boxes, points, mask_prompt, multimask=False)
        return logits

    def _decode_flipped(self, embedding: torch.Tensor, k: int, starts: np.ndarray, boxes: torch.Tensor | None,
                        points: torch.Tensor | None) -> torch.Tensor:
        """The same prompts decoded on the flipped window's embedding, flipped back."""
        size = self.sam.image_size
        flipped_boxes = None if boxes is None else torch.stack([size - boxes[:, 2], boxes[:, 1],
                                                                size - boxes[:, 0], boxes[:, 3]], 1)
        flipped_points = None if points is None else torch.stack([size - points[:, 0], points[:, 1]], 1)
        flipped_starts = np.stack([starts[:, 0], self.sam.embedding_size - starts[:, 1] - k], axis=1)
        return self._decode(embedding, k, flipped_starts, flipped_boxes, flipped_points).flip(-1)

    # --- whole image -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, image: np.ndarray, boxes: np.ndarray,
                 points: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """Instance map (H, W) uint16 for an RGB uint8 image (H, W, 3) and prompts in image pixels.

        Box i (N, 4) gets id i + 1, point j (M, 2) gets id N + j + 1. Overlaps go to the prompt with the higher
        mask logit (the lower id on ties). The report lists what was used and what was skipped, and why.
        """
        height, width = image.shape[:2]
        reused_before = self.windows_reused
        prompts = self._prompt_regions(boxes, points, height, width)
        windows, home = self._home_windows(prompts.regions[prompts.valid], height, width)
        instances = np.zeros((height, width), dtype=np.uint16)
        best_logit = np.full((height, width), -np.inf, dtype=np.float32)
        decoder_calls = 0
        progress = tqdm(total=len(prompts.valid), desc="decode", unit="prompt", leave=False,
                        disable=len(prompts.valid) < 1000)
        for window_index, origin in enumerate(windows):
            members = prompts.valid[home == window_index]
            if len(members):
                decoder_calls += self._decode_window(image, origin, members, prompts, instances, best_logit, progress)
        progress.close()

        found = set(np.unique(instances[instances > 0]).astype(int) - 1)
        empty = [int(i) for i in prompts.valid if i not in found]
        report = {
            "boxes_total": prompts.boxes_total,
            "points_total": prompts.points_total,
            "prompts_used": len(found),
            "prompts_skipped": prompts.skipped + [{"index": i, "reason": "SAM returned an empty mask"} for i in empty],
            "windows_encoded": int(len(np.unique(home))) - (self.windows_reused - reused_before),
            "windows_reused": self.windows_reused - reused_before,
            "decoder_calls": decoder_calls,
        }
        return instances, report

    def _prompt_regions(self, boxes: np.ndarray, points: np.ndarray | None, height: int, width: int) -> PromptRegions:
        """Checked prompts as regions in image pixels: boxes as given, points as ``point_box`` squares; NaN rows for
        skipped prompts (reported in ``skipped``)."""
        points = np.empty((0, 2)) if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)
        check_prompt_count(len(np.asarray(boxes).reshape(-1, 4)) + len(points))
        boxes, skipped = validate_boxes(boxes, height, width)
        inside = np.isfinite(points).all(1) & (points >= 0).all(1) & (points[:, 0] < width) & (points[:, 1] < height)
        skipped += [{"index": len(boxes) + int(j), "point": points[j].tolist(), "reason": "outside the image"}
                    for j in np.flatnonzero(~inside)]
        half = self.point_box / 2
        regions = np.concatenate([boxes, np.where(inside[:, None], np.hstack([points - half, points + half]), np.nan)])
        is_point = np.arange(len(regions)) >= len(boxes)
        # where each mask may go: a point's square; a box grown by clip_margin, or the whole image
        clip_regions = regions.copy()
        if self.clip_margin is None:
            clip_regions[~is_point] = [0, 0, width, height]
        else:
            clip_regions[~is_point] += [-self.clip_margin, -self.clip_margin, self.clip_margin, self.clip_margin]
        return PromptRegions(regions, clip_regions, is_point & (not self.sam.box_prompts_only),
                             np.flatnonzero(np.isfinite(regions[:, 0])), skipped, int(len(boxes)), int(len(points)))

    def _home_windows(self, regions: np.ndarray, height: int, width: int) -> tuple[list[tuple[int, int]], np.ndarray]:
        """The windows (top, left) covering the image, and for each region (K, 4) the index of the window where its
        centre is farthest from the border."""
        windows = [(y, x) for y in tile_starts(height, self.window, self.stride)
                   for x in tile_starts(width, self.window, self.stride)]
        if not len(regions):
            return windows, np.zeros(0, int)
        origins = np.array(windows, dtype=np.float64).reshape(-1, 2)
        centres = np.stack([(regions[:, 1] + regions[:, 3]) / 2, (regions[:, 0] + regions[:, 2]) / 2], 1)
        offsets = centres[:, None, :] - origins[None]
        return windows, np.minimum(offsets, self.window - offsets).min(axis=2).argmax(axis=1)

    def _decode_window(self, image: np.ndarray, origin: tuple[int, int], members: np.ndarray,
                       prompts: PromptRegions, instances: np.ndarray, best_logit: np.ndarray, progress) -> int:
        """Encode one window and decode its ``members`` (prompt indices) in batches of at most ``DECODER_BATCH``
        whose crops have one size, pasting their masks; returns the decoder calls made."""
        y0, x0 = origin
        embeddings = self._encode(image[y0 : y0 + self.window, x0 : x0 + self.window])
        encoder_boxes = (prompts.regions[members] - [x0, y0, x0, y0]) * self.scale
        crops = np.array([self._crop_of(box) for box in encoder_boxes], dtype=int).reshape(-1, 3)  # (n, [k, ty, tx])
        groups: dict[tuple, list[int]] = {}
        for row, (member, side) in enumerate(zip(members, crops[:, 0])):
            groups.setdefault((bool(prompts.decode_as_point[member]), int(side)), []).append(row)
        batches = [(key, rows[start : start + DECODER_BATCH]) for key, rows in groups.items()
                   for start in range(0, len(rows), DECODER_BATCH)]
        for (point_group, k), rows in batches:
            prompt = torch.as_tensor(encoder_boxes[rows], dtype=torch.float32, device=self.device)
            box_prompt, point_prompt = (None, (prompt[:, :2] + prompt[:, 2:]) / 2) if point_group else (prompt, None)
            starts = crops[rows, 1:]
            logits = self._decode(embeddings[0], k, starts, box_prompt, point_prompt)
            if self.flip:
                logits = (logits + self._decode_flipped(embeddings[1], k, starts, box_prompt, point_prompt)) / 2
            self._paste(logits, starts, origin, members[rows], prompts.clip_regions, instances, best_logit)
            progress.update(len(rows))
        return len(batches) * (1 + self.flip)

    def _paste(self, logits: torch.Tensor, starts: np.ndarray, window_origin: tuple[int, int],
               prompt_ids: np.ndarray, clip_regions: np.ndarray, instances: np.ndarray, best_logit: np.ndarray) -> None:
        """Write the masks of one decoder call (mask i from the crop starting at token ``starts[i]``) into the
        image-sized instance map, each cut to its clip region ``[x0, y0, x1, y1]`` (image pixels), keeping the higher
        logit where masks overlap."""
        pixels_per_output = self.pixels_per_token / 4 / self.scale  # image pixels per decoder output pixel
        if pixels_per_output != 1:
            logits = F.interpolate(logits, scale_factor=pixels_per_output, mode="bilinear", align_corners=False)
        logits = logits[:, 0].cpu().numpy()
        height, width = instances.shape
        for prompt_id, mask_logits, (ty, tx) in zip(prompt_ids, logits, starts):
            oy = window_origin[0] + round(ty * self.pixels_per_token / self.scale)
            ox = window_origin[1] + round(tx * self.pixels_per_token / self.scale)
            bx0, by0, bx1, by1 = clip_regions[prompt_id]
            y0, x0 = max(oy, math.floor(by0)), max(ox, math.floor(bx0))
            y1 = min(oy + mask_logits.shape[0], height, math.ceil(by1))
            x1 = min(ox + mask_logits.shape[1], width, math.ceil(bx1))
            if y1 <= y0 or x1 <= x0:
                continue
            local = mask_logits[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
            wins = (local > self.threshold) & (local > best_logit[y0:y1, x0:x1])
            instances[y0:y1, x0:x1][wins] = prompt_id + 1
            best_logit[y0:y1, x0:x1][wins] = local[wins]


def annotate_dataset(dataset, segmenter: BoxPromptedSegmenter, output_dir: str,
                     prompt_key: str = "boxes") -> list[dict]:
    """Annotate every item ``{"image": (3, H, W) array, prompt_key: path of a prompt file}`` of ``dataset``.

    Every image and prompt file of ``dataset.data`` is read and checked first: a bad one stops the run with its name
    before any output is written. Writes per image ``<name>_instances.png`` (uint16 ids), ``<name>_mask.png``
    (uint8 0/1) and ``<name>_annotation.json`` (prompts used / skipped and why, seconds) into ``output_dir``; returns
    the reports.
    """
    output = Path(output_dir)
    all_prompts = []
    for entry in dataset.data:
        check_entries([entry], ["image"], str(entry["image"]))
        prompts = read_prompts(entry[prompt_key], image_name=Path(entry["image"]).name)
        try:
            check_prompt_count(len(prompts.boxes) + len(prompts.points))
        except ValueError as error:
            raise ValueError(f"{entry[prompt_key]}: {error}") from None
        all_prompts.append(prompts)
    reports = []
    for item, prompts in zip(tqdm(dataset, desc="annotate", unit="image"), all_prompts):
        image_path = Path(item["image"].meta["filename_or_obj"])
        start = time.perf_counter()
        image = np.asarray(item["image"]).transpose(1, 2, 0).astype(np.uint8)
        instances, report = segmenter(image, prompts.boxes, prompts.points)
        report.update(image=str(image_path), prompts_file=str(item[prompt_key]),
                      seconds=round(time.perf_counter() - start, 3))
        write_png_atomic(output / f"{image_path.stem}_instances.png", instances)
        write_png_atomic(output / f"{image_path.stem}_mask.png", (instances > 0).astype(np.uint8))
        write_json_atomic(output / f"{image_path.stem}_annotation.json", report)
        logger.info(f"{image_path.stem}: {report['prompts_used']} of {len(prompts.boxes) + len(prompts.points)} "
                    f"prompts -> masks in {report['seconds']} s")
        reports.append(report)
    return reports
