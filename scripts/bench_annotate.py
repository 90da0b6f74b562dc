"""Benchmark the SAM-empowered annotation options on MoNuSeg with tight boxes from the ground truth.

    python scripts/prepare_monuseg.py --output_dir data/monuseg
    python scripts/bench_annotate.py table --split training --images 4            # tune on training images
    python scripts/bench_annotate.py table --split test --configs reference,default
    python scripts/bench_annotate.py prompts --counts 1000,4000,16000     # many prompts: time and peak memory

Per option: pixel Dice and IoU of the pseudo masks against the ground truth, mean per-nucleus IoU (box i is
made from nucleus i), seconds per image, and the speed ratio against ``reference``, the naive loop (one encoder
pass per 256 px tile at stride 192, the decoder on the whole tile embedding, logits > 0, masks not cut to the
box). ``ellipse`` is no SAM at all: the ellipse inscribed in each box, the yardstick any box-prompted model must
beat. Writes the table as Markdown and CSV next to ``--output``.
"""

import csv
import inspect
import json
import time
from pathlib import Path

import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)
import fire
import numpy as np
import torch
from skimage.draw import ellipse
from tqdm import tqdm

from scripts.annotation import BoxPromptedSegmenter, perturb_boxes, read_prompts  # noqa: E402  (the bundle's package)
from scripts.data import read_instance_map, read_rgb_image  # noqa: E402
from scripts.metrics import dice_iou, paired_instance_iou  # noqa: E402
from scripts.networks import fuse_conv_bn_for_inference, load_sam  # noqa: E402

REFERENCE = dict(zoom=1.0, decoder_context=None, threshold=0.0, clip_margin=None)
DEFAULT = {}  # BoxPromptedSegmenter's defaults
SHOWN_DEFAULTS = {name: parameter.default
                  for name, parameter in inspect.signature(BoxPromptedSegmenter).parameters.items()
                  if name in ("zoom", "decoder_context", "threshold", "clip_margin")}
CONFIGS = {
    "ellipse": None,  # no network: the ellipse inscribed in each box
    "reference": REFERENCE,
    "crop_context32": dict(zoom=1.0, threshold=0.0, clip_margin=None),
    "crop+clip": dict(zoom=1.0, threshold=0.0),
    "crop+clip+t-1": dict(zoom=1.0, threshold=-1.0),
    "default": DEFAULT,
    "default+onnxruntime": dict(encoder_runtime="onnxruntime"),  # annotate.json's default: the encoder on ONNX Runtime
    "default+int8": dict(encoder_runtime="onnxruntime", encoder_precision="int8"),  # its MatMul nodes int8
    "default+int8+decoder": dict(encoder_runtime="onnxruntime", encoder_precision="int8",  # the decoder there too
                                 decoder_runtime="onnxruntime"),
    "default+int8+decoder_int8": dict(encoder_runtime="onnxruntime", encoder_precision="int8",
                                      decoder_runtime="onnxruntime", decoder_precision="int8"),
    "default+bf16+decoder_int8": dict(encoder_runtime="openvino", encoder_precision="bfloat16",  # OpenVINO encoder
                                      decoder_runtime="onnxruntime", decoder_precision="int8"),
    "default+bf16+decoder_bf16": dict(encoder_runtime="openvino", encoder_precision="bfloat16",
                                      decoder_runtime="openvino", decoder_precision="bfloat16"),
    "zoom1+t-2": dict(zoom=1.0, threshold=-2.0),  # the defaults before tuning
    "t-3": dict(zoom=1.0, threshold=-3.0),
    "clip_margin2": dict(zoom=1.0, threshold=-2.0, clip_margin=2),
    "clip_margin4": dict(zoom=1.0, threshold=-2.0, clip_margin=4),
    "no_clip": dict(zoom=1.0, threshold=-2.0, clip_margin=None),
    "multimask": dict(zoom=1.0, threshold=-2.0, multimask=True),
    "refine": dict(zoom=1.0, threshold=-2.0, refine=True),
    "flip": dict(zoom=1.0, threshold=-2.0, flip=True),
    "zoom0.75": dict(zoom=0.75, threshold=-2.0),
    "zoom0.5": dict(zoom=0.5, threshold=-2.0),
    "zoom1.5": dict(zoom=1.5, threshold=-2.0),
    "zoom0.75+t-3": dict(zoom=0.75, threshold=-3.0),
    "zoom0.5+t-3": dict(zoom=0.5, threshold=-3.0),
    "zoom0.5+t-3+no_clip": dict(zoom=0.5, threshold=-3.0, clip_margin=None),
    "zoom0.5+t-3+clip_margin2": dict(zoom=0.5, threshold=-3.0, clip_margin=2),
    "stride248": dict(zoom=1.0, threshold=-2.0, stride=248),
}


def ellipse_instances(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Instance map (H, W): box i filled with its inscribed ellipse as id i + 1 (later boxes overwrite)."""
    instances = np.zeros(shape, dtype=np.uint16)
    for index, (x0, y0, x1, y1) in enumerate(np.asarray(boxes)):
        rows, cols = ellipse((y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2, (y1 - y0) / 2, (x1 - x0) / 2, shape=shape)
        instances[rows, cols] = index + 1
    return instances


def bench_annotate(
    prepared_dir: str = "data/monuseg",
    split: str = "training",
    images: int | None = None,
    first: int = 0,
    configs: tuple[str, ...] = tuple(CONFIGS),
    jitter: float = 0.0,
    seed: int = 0,
    backbone: str = "litemedsam",
    checkpoint: str | None = None,
    output: str | None = None,
) -> None:
    """Run each named option set on ``images`` images of ``split`` from index ``first`` and print the table."""
    entries = json.loads((Path(prepared_dir) / "datalist_all.json").read_text())[split][first:][:images]
    if isinstance(configs, str):  # fire passes "a,b" (or an unquoted "[a,b]") as one string
        configs = [name.strip() for name in configs.strip("[]").split(",")]
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    plain = load_sam(backbone, checkpoint)
    fused = fuse_conv_bn_for_inference(load_sam(backbone, checkpoint))
    cases = []
    for entry in entries:
        paths = {key: Path(prepared_dir) / value for key, value in entry.items()}
        boxes = perturb_boxes(read_prompts(paths["boxes"]).boxes, jitter=jitter, seed=seed)
        cases.append((paths["image"].stem, read_rgb_image(paths["image"]), boxes,
                      read_instance_map(paths["instances"])))

    rows = []
    for name in configs:
        if CONFIGS[name] is None:
            segmenter = lambda image, boxes: (ellipse_instances(boxes, image.shape[:2]), {})  # noqa: E731
        else:
            segmenter = BoxPromptedSegmenter(plain if name == "reference" else fused, **CONFIGS[name])
        scores = []
        for case_name, image, boxes, truth in tqdm(cases, desc=name, unit="image"):
            start = time.perf_counter()
            instances, _ = segmenter(image, boxes)
            seconds = time.perf_counter() - start
            scores.append((*dice_iou(instances, truth), paired_instance_iou(instances, truth).mean(), seconds))
        dice, iou, nucleus_iou, seconds = np.mean(scores, axis=0)
        rows.append({"config": name, "dice": dice, "iou": iou, "nucleus_iou": nucleus_iou,
                     "seconds_per_image": seconds})
        print(f"{name:<16} Dice {dice:.4f}  IoU {iou:.4f}  nucleus IoU {nucleus_iou:.4f}  {seconds:6.1f} s/image",
              flush=True)

    reference_seconds = next((r["seconds_per_image"] for r in rows if r["config"] == "reference"), None)
    header = (f"MoNuSeg {split}, {len(cases)} images ({', '.join(c[0] for c in cases)}), "
              f"boxes: ground-truth tight, jitter {jitter} px (seed {seed}), "
              f"backbone {backbone}, {torch.get_num_threads()} CPU threads")
    table = [f"{header}\n", "| config | options | Dice | IoU | nucleus IoU | s / image | speed vs reference |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        has_network = CONFIGS[row["config"]] is not None
        ratio = f"{reference_seconds / row['seconds_per_image']:.2f}x" if reference_seconds and has_network else "-"
        options = CONFIGS[row["config"]]
        options = ("no network" if options is None
                   else ", ".join(f"{k}={v}" for k, v in {**SHOWN_DEFAULTS, **options}.items()))
        table.append(f"| {row['config']} | {options} | {row['dice']:.4f} | {row['iou']:.4f} | {row['nucleus_iou']:.4f} "
                     f"| {row['seconds_per_image']:.1f} | {ratio} |")
    print("\n" + "\n".join(table))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).with_suffix(".md").write_text("\n".join(table) + "\n")
        with Path(output).with_suffix(".csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows)


def prompts(counts: tuple[int, ...] = (1000, 4000, 16000), crop: str = "TCGA-2Z-A9J9-01A-01-TS1_y300_x300",
            jitter: float = 3.0) -> list[dict]:
    """Throughput and peak memory of the default annotation on one shipped 256x256 crop with many boxes (its real
    boxes repeated with seeded jitter): one encoder pass, decoder calls of at most ``DECODER_BATCH`` prompts.
    Counts run in increasing order in one process, so the peak resident memory after each is that run's peak."""
    import resource

    from scripts.annotation.box_prompted import DECODER_BATCH

    crops = Path(__file__).resolve().parents[1] / "bundles" / "allinsam" / "sample_data" / "monuseg_crops"
    image = read_rgb_image(crops / "images" / f"{crop}.png")
    real = read_prompts(crops / "boxes" / f"{crop}.json").boxes
    segmenter = BoxPromptedSegmenter(fuse_conv_bn_for_inference(load_sam("litemedsam")))
    rows = []
    for count in sorted(int(c) for c in (counts if isinstance(counts, (tuple, list)) else [counts])):
        boxes = perturb_boxes(np.resize(real, (count, 4)), jitter=jitter, seed=count)
        start = time.perf_counter()
        instances, report = segmenter(image, boxes)
        seconds = time.perf_counter() - start
        rows.append({"prompts": count, "seconds": round(seconds, 1), "prompts_per_s": round(count / seconds, 1),
                     "decoder_calls": report["decoder_calls"], "decoder_batch": DECODER_BATCH,
                     "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    fire.Fire({"table": bench_annotate, "prompts": prompts}, serialize=lambda result: None)
