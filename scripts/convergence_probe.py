"""Where the prompt-free model's learning is limited: train heads of different depth on cached LiteMedSAM features of
augmented views of the labelled patches, score on the validation images (never the test split).

    python scripts/convergence_probe.py cache --datalist data/monuseg/datalist_0.5pct_seed0.json --views 96
    python scripts/convergence_probe.py train --datalist data/monuseg/datalist_0.5pct_seed0.json --head decoder
    python scripts/convergence_probe.py train --datalist ... --head tail      # last TinyViT stage + neck + decoder
    python scripts/convergence_probe.py cache --datalist ... --tail_stages 2 [--strong]   # then train with the same
    python scripts/convergence_probe.py refine --datalist ... --predictions <inference output of the validation split>

``cache`` runs the frozen encoder once per view up to the input of its last stage (stage 3) and stores it under
``work_dirs/probe/<datalist stem>/``: ``views`` augmented views of the training patches (dihedral turn, the
bundle's H&E jitter, scale 0.8-1.25, reflect padding to 256) and the 256-px windows of the validation images
(reflect-padded to a multiple of 256, no overlap). ``train`` fits the chosen head on the cached views for
``steps`` steps and prints the validation Dice at threshold 0.5 and at the best threshold, every ``eval_every``.
``refine`` asks whether SAM's box decoder can sharpen a prompt-free prediction: the boxes of its instances prompt the
pretrained LiteMedSAM (the bundle's annotation workflow), and both masks are scored on the validation images.
"""

import json
import math
import time
from pathlib import Path

import fire
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)

from scripts.data import RandHEDJitterd, read_rgb_image  # noqa: E402
from scripts.losses import dice_bce  # noqa: E402
from scripts.networks import AllInSamNet, encoder_tail  # noqa: E402

WINDOW = 256
THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def _label(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as image:
        return (np.array(image) > 0).astype(np.float32)


def _patches(datalist: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The labelled training patches (image (h, w, 3) uint8, label (h, w) float), cut out of the zeroed images."""
    content = json.loads(datalist.read_text())
    boxes = {patch["image"]: patch["box"] for patch in content.get("patches", [])}
    out = []
    for entry in content["training"]:
        image, label = read_rgb_image(datalist.parent / entry["image"]), _label(datalist.parent / entry["label"])
        x0, y0, x1, y1 = boxes.get(Path(entry["image"]).stem, (0, 0, image.shape[1], image.shape[0]))
        out.append((image[y0:y1, x0:x1], label[y0:y1, x0:x1]))
    return out


def strong_augmentation(seed: int):
    """nnU-Net's kinds of augmentation on a view (any-angle turn, blur, noise, contrast, brightness), from MONAI."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandRotated,
        RandScaleIntensityd,
    )
    return Compose([
        RandRotated(["image", "label"], range_x=math.pi, prob=0.7, padding_mode="reflection",
                    mode=["bilinear", "nearest"]),
        RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), prob=0.2),
        RandGaussianNoised("image", std=0.03, prob=0.2),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
        RandScaleIntensityd("image", factors=0.15, prob=0.3),
    ]).set_random_state(seed=seed)


def augmented_view(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, scale: bool = True,
                   stain: bool = True, zoom: float = 1.0, strong=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One training view: (3, 256, 256) in [0, 1] and (1, 256, 256) label, the patch resized by ``zoom`` (times a
    random 0.8-1.25 with ``scale``); ``strong``: a ``strong_augmentation`` applied last."""
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    if stain:
        jitter = RandHEDJitterd("image")
        jitter.set_random_state(seed=int(rng.integers(2 ** 31)))
        x = jitter({"image": x})["image"]
    x = x[None]
    y = torch.from_numpy(label)[None, None]
    factor = zoom * (float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))) if scale else 1.0)
    if factor != 1.0:
        size = [max(8, round(s * factor)) for s in x.shape[-2:]]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=size, mode="nearest")
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))
    x, y = torch.rot90(x, turns, (2, 3)), torch.rot90(y, turns, (2, 3))
    if flip:
        x, y = x.flip(3), y.flip(3)
    h, w = x.shape[-2:]
    if h > WINDOW or w > WINDOW:  # random crop to the window
        top, left = int(rng.integers(max(h - WINDOW, 0) + 1)), int(rng.integers(max(w - WINDOW, 0) + 1))
        x, y = x[..., top:top + WINDOW, left:left + WINDOW], y[..., top:top + WINDOW, left:left + WINDOW]
        h, w = x.shape[-2:]
    top, left = int(rng.integers(WINDOW - h + 1)), int(rng.integers(WINDOW - w + 1))
    pad = (left, WINDOW - w - left, top, WINDOW - h - top)
    x = _reflect_pad(x, pad)
    y = _reflect_pad(y, pad)
    if strong is not None:
        view = strong({"image": x[0], "label": y[0]})
        image, label = (torch.as_tensor(view[key]).as_tensor() for key in ("image", "label"))  # plain tensors
        return image.float().clamp(0, 1), (label > 0.5).float()
    return x[0], y[0]


def _reflect_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Reflect padding that also works when the pad exceeds the size (repeated reflections)."""
    while any(pad):
        h, w = x.shape[-2:]
        step = (min(pad[0], w - 1), min(pad[1], w - 1), min(pad[2], h - 1), min(pad[3], h - 1))
        x = F.pad(x, step, mode="reflect")
        pad = tuple(p - s for p, s in zip(pad, step))
    return x


def _windows(image: np.ndarray, zoom: float = 1.0) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 -> (N, 3, 256, 256) non-overlapping windows of the image resized by ``zoom`` and
    reflect-padded, row-major."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    if zoom != 1.0:
        x = F.interpolate(x, scale_factor=zoom, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    rows, cols = math.ceil(h / WINDOW), math.ceil(w / WINDOW)
    x = _reflect_pad(x, (0, cols * WINDOW - w, 0, rows * WINDOW - h))[0]
    tiles = [x[:, r * WINDOW:(r + 1) * WINDOW, c * WINDOW:(c + 1) * WINDOW] for r in range(rows) for c in range(cols)]
    return torch.stack(tiles), (rows, cols)


def _cache_dir(datalist: Path, zoom: float, tail_stages: int) -> Path:
    return REPO / "work_dirs" / "probe" / (datalist.stem + (f"_zoom{zoom:g}" if zoom != 1 else "")
                                           + (f"_stages{tail_stages}" if tail_stages != 1 else ""))


def cache(datalist: str, views: int = 96, seed: int = 0, output: str | None = None, scale: bool = True,
          stain: bool = True, validation: bool = True, zoom: float = 1.0, strong: bool = False,
          tail_stages: int = 1) -> str:
    """Encoder features (stage-3 input) of ``views`` augmented training views and of the validation windows;
    ``zoom``: encoder pixels per image pixel (a cache folder of its own, ``<datalist stem>_zoom<zoom>``);
    ``strong``: add ``strong_augmentation``; ``tail_stages``: the number of last encoder stages trained."""
    datalist = Path(datalist)
    out = Path(output or _cache_dir(datalist, zoom, tail_stages))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = AllInSamNet(trainable="tail", tail_stages=tail_stages).eval()  # frozen_features: tokens entering the tail
    rng = np.random.default_rng(seed)
    patches = _patches(datalist)
    start = time.perf_counter()
    features, labels = [], []
    with torch.no_grad():
        for index in range(views):
            image, label = augmented_view(*patches[index % len(patches)], rng, scale=scale, stain=stain, zoom=zoom,
                                          strong=strong_augmentation(seed + index) if strong else None)
            features.append(net.frozen_features(image[None]).to(torch.bfloat16))
            labels.append(label)
    tag = (f"train_v{views}_s{seed}" + ("" if scale else "_noscale") + ("" if stain else "_nostain")
           + ("_strong" if strong else ""))
    torch.save({"features": torch.cat(features), "labels": torch.stack(labels)}, out / f"{tag}.pt")
    print(f"{views} training views cached in {time.perf_counter() - start:.0f} s -> {out / tag}.pt")
    if validation and not (out / "validation.pt").is_file():
        content = json.loads(datalist.read_text())
        start, items = time.perf_counter(), []
        with torch.no_grad():
            for entry in content["validation"]:
                image = read_rgb_image(datalist.parent / entry["image"])
                windows, grid = _windows(image, zoom)
                feats = torch.cat([net.frozen_features(w[None]) for w in windows]).to(torch.bfloat16)
                truth = _label(datalist.parent / entry["label"])  # the weak setting scores against its pseudo masks
                items.append({"name": Path(entry["image"]).stem, "features": feats, "grid": grid, "zoom": zoom,
                              "shape": image.shape[:2], "truth": torch.from_numpy(truth)})
        torch.save(items, out / "validation.pt")
        print(f"validation windows cached in {time.perf_counter() - start:.0f} s")
    return str(out)


def validation_dice(net: AllInSamNet, items: list[dict], embed) -> tuple[float, float, float]:
    """Mean Dice over the validation images at 0.5, and at the best threshold (with that threshold)."""
    scores = np.zeros((len(items), len(THRESHOLDS)))
    net.eval()
    with torch.no_grad():
        for row, item in enumerate(items):
            feats = item["features"]
            logits = torch.cat([net.decode(embed(feats[i:i + 8].float())) for i in range(0, len(feats), 8)])[:, 0]
            rows, cols = item["grid"]
            zoom, (height, width) = item.get("zoom", 1.0), item["shape"]
            prob = torch.sigmoid(logits).view(rows, cols, WINDOW, WINDOW).permute(0, 2, 1, 3).reshape(
                rows * WINDOW, cols * WINDOW)[:round(height * zoom), :round(width * zoom)]
            if zoom != 1.0:
                prob = F.interpolate(prob[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
            truth = item["truth"] > 0
            for col, t in enumerate(THRESHOLDS):
                mask = prob > t
                scores[row, col] = 2 * (mask & truth).sum().item() / max(mask.sum().item() + truth.sum().item(), 1)
    mean = scores.mean(0)
    at_half = mean[list(THRESHOLDS).index(0.5)]
    return float(at_half), float(mean.max()), float(THRESHOLDS[mean.argmax()])


def train(datalist: str, head: str = "decoder", views: int = 96, seed: int = 0, steps: int = 600, batch: int = 4,
          lr: float = 5e-4, eval_every: int = 150, cache_dir: str | None = None, train_file: str | None = None,
          zoom: float = 1.0, tail_stages: int = 1, foreground_prior: float | None = None) -> None:
    """Fit ``head`` (``decoder``: mask decoder + no-mask embedding on frozen embeddings; ``tail``: also TinyViT's
    last stage and neck) on the cached views; print validation Dice. ``train_file``: cached view files,
    comma-separated (default ``train_v<views>_s0.pt``); ``zoom``: the cache made with that zoom;
    ``foreground_prior``: the network's option of that name (the output bias set on the first batch)."""
    datalist = Path(datalist)
    out = Path(cache_dir or _cache_dir(datalist, zoom, tail_stages))
    files = (train_file.split(",") if isinstance(train_file, str) else list(train_file)) if train_file else [
        f"train_v{views}_s0.pt"]
    parts = [torch.load(out / name) for name in files]
    cached = {key: torch.cat([part[key] for part in parts]) for key in ("features", "labels")}
    items = torch.load(out / "validation.pt")
    torch.manual_seed(seed)
    net = AllInSamNet(trainable=head, tail_stages=tail_stages, foreground_prior=foreground_prior)
    params = [p for p in net.parameters() if p.requires_grad]
    tail = lambda x: encoder_tail(net.sam.image_encoder, x, tail_stages)  # noqa: E731
    features, labels = cached["features"], cached["labels"]
    if head == "decoder":  # the frozen tail once per view
        with torch.no_grad():
            net.eval()
            features = torch.cat([tail(features[i:i + 8].float()) for i in range(0, len(features), 8)])
            items = [dict(item, features=torch.cat([tail(item["features"][i:i + 8].float())
                                                    for i in range(0, len(item["features"]), 8)])) for item in items]
    embed = (lambda x: x) if head == "decoder" else tail
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    start, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        net.train()  # the (partly) frozen encoder stays in eval mode
        index = torch.from_numpy(rng.choice(len(features), batch, replace=False))
        f = features[index].float()
        embeddings = embed(f)
        loss = dice_bce(net.decode(embeddings), labels[index])
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            dice = validation_dice(net, items, embed)
            print(f"{head} step {step}: loss {loss.item():.3f} (mean of the last {min(step, eval_every)}: "
                  f"{np.mean(losses[-eval_every:]):.3f}), val Dice@0.5 {dice[0]:.4f}, best {dice[1]:.4f} "
                  f"@{dice[2]}, {time.perf_counter() - start:.0f} s", flush=True)


def refine(datalist: str, predictions: str, margins: tuple[int, ...] = (0, 2)) -> None:
    """Validation Dice / AJI of the bundle's masks ``<predictions>/<image>_mask.png``, and of the masks that
    LiteMedSAM's box decoder draws from the boxes of its instances (components or watershed), each box grown by
    ``margins`` pixels."""
    from scripts.annotation import BoxPromptedSegmenter
    from scripts.data import boxes_from_instances, instances_from_mask, read_instance_map, relabel_sequential
    from scripts.metrics import aggregated_jaccard_index, dice_iou
    from scripts.networks import load_sam

    datalist = Path(datalist)
    segmenter = BoxPromptedSegmenter(load_sam("litemedsam"))
    rows = []
    for entry in json.loads(datalist.read_text())["validation"]:
        name = Path(entry["image"]).stem
        mask = _label(Path(predictions) / f"{name}_mask.png") > 0
        truth = read_instance_map(datalist.parent / entry["instances"])
        scores = {"prompt-free": (dice_iou(mask, truth)[0],
                                  aggregated_jaccard_index(instances_from_mask(mask, "watershed"), truth))}
        for method in ("components", "watershed"):
            boxes = boxes_from_instances(relabel_sequential(instances_from_mask(mask, method))).astype(np.float64)
            for margin in margins:
                refined, _ = segmenter(read_rgb_image(datalist.parent / entry["image"]),
                                       boxes + [-margin, -margin, margin, margin])
                scores[f"boxes of {method}, +{margin} px"] = (dice_iou(refined, truth)[0],
                                                              aggregated_jaccard_index(refined, truth))
        print(name, {key: tuple(round(v, 4) for v in value) for key, value in scores.items()}, flush=True)
        rows.append(scores)
    for key in rows[0]:
        dice, aji = np.mean([row[key] for row in rows], axis=0)
        print(f"{key}: Dice {dice:.4f}, AJI {aji:.4f}")


if __name__ == "__main__":
    fire.Fire({"cache": cache, "train": train, "refine": refine}, serialize=lambda result: None)
