"""The papers' weak-label setting: the labels of a prepared datalist replaced by the masks that the box-prompted
SAM draws from its boxes (``annotate.json``'s ``weak_labels`` workflow)."""

import json
import logging
import os
from pathlib import Path

import numpy as np
from monai.data import Dataset

from ..data import read_instance_map, relabel_sequential, write_json_atomic, write_png_atomic
from ..metrics import dice_iou
from .box_prompted import BoxPromptedSegmenter, annotate_dataset
from .prompts import perturb_boxes, read_prompts

logger = logging.getLogger(__name__)
SEGMENTER_SETTINGS = ("window", "stride", "decoder_context", "threshold", "clip_margin", "multimask", "refine", "flip")


def weak_label_tag(datalist: str | os.PathLike, jitter: float = 0.0, loosen: float = 0.0, seed: int = 0) -> str:
    """``<datalist tag>_weak[_jitter<j>_seed<s>][_loosen<l>]``: the name of the weak labels' folder and datalist."""
    tag = Path(datalist).stem.removeprefix("datalist_") + "_weak"
    tag += f"_jitter{jitter:g}_seed{seed}" if jitter else ""
    return tag + (f"_loosen{loosen:g}" if loosen else "")


def make_weak_labels(datalist: str | os.PathLike, segmenter: BoxPromptedSegmenter, preprocessing,
                     splits: tuple[str, ...] = ("training", "validation"), jitter: float = 0.0, loosen: float = 0.0,
                     seed: int = 0, notes: dict | None = None) -> str:
    """Replace the labels of ``splits`` in a prepared datalist by SAM pseudo masks made from its boxes.

    Writes ``weak/<tag>/`` beside the datalist (``prompts/`` used, ``sam_output/``, ``labels/``, ``instances/``) and
    ``datalist_<tag>.json`` (``weak_label_tag``); other splits (the test split) keep their ground truth. Boxes are
    moved by up to ``jitter`` pixels and grown by ``loosen`` pixels (seeded), as a lay annotator's would be. Pseudo
    masks are cut to the labelled patches of a label-fraction datalist. ``preprocessing`` reads an item's image
    (annotate.json's); ``notes`` are stored with the options. Returns the weak datalist's path.
    """
    datalist = Path(datalist)
    base, content = datalist.parent, json.loads(datalist.read_text())
    missing = [split for split in splits if split not in content]
    if missing:
        raise ValueError(f"{datalist}: no {missing} list to make weak labels for (it has {sorted(content)}; one "
                         "datalist per command)")
    tag = weak_label_tag(datalist, jitter, loosen, seed)
    output = base / "weak" / tag
    data, truths = [], {}
    for split in splits:
        for entry in content[split]:
            name = Path(entry["image"]).stem
            boxes = perturb_boxes(read_prompts(base / entry["boxes"]).boxes, jitter=jitter, loosen=loosen, seed=seed)
            prompts = output / "prompts" / f"{name}.json"
            write_json_atomic(prompts, {"image": Path(entry["image"]).name, "boxes": boxes.tolist()})
            data.append({"image": str(base / entry["image"]), "boxes": str(prompts)})
            truths[name] = base / entry["label"]
    annotate_dataset(Dataset(data, preprocessing), segmenter, str(output / "sam_output"))

    patches = {patch["image"]: patch["box"] for patch in content.get("patches", [])}
    settings = {key: getattr(segmenter, key) for key in SEGMENTER_SETTINGS}
    weak = dict(content, labels="weak", weak_options={"source_datalist": datalist.name, "jitter": jitter,
                                                      "loosen": loosen, "seed": seed, **settings, **(notes or {})})
    dices = []
    for split in splits:
        weak[split] = []
        for entry in content[split]:
            new, instances = _weak_entry(entry, base, output, patches)
            weak[split].append(new)
            dices.append(dice_iou(instances, read_instance_map(truths[Path(entry["image"]).stem]))[0])
    weak_path = base / f"datalist_{tag}.json"
    write_json_atomic(weak_path, weak)
    logger.info(f"{weak_path}: {len(dices)} images with pseudo masks, Dice against the labels they replace "
                f"{np.mean(dices):.4f} (min {np.min(dices):.4f})")
    return str(weak_path)


def _weak_entry(entry: dict, base: Path, output: Path, patches: dict) -> tuple[dict, np.ndarray]:
    """Write one image's pseudo label and instance map (cut to its labelled patch, if any); its new entry and the
    instance map (H, W)."""
    name = Path(entry["image"]).stem
    instances = read_instance_map(output / "sam_output" / f"{name}_instances.png")
    if name in patches:
        x0, y0, x1, y1 = patches[name]
        inside = np.zeros(instances.shape, dtype=bool)
        inside[y0:y1, x0:x1] = True
        instances = np.where(inside, instances, 0)
    instances = relabel_sequential(instances)
    paths = {key: output / key / f"{name}.png" for key in ("labels", "instances")}
    write_png_atomic(paths["labels"], (instances > 0).astype(np.uint8))
    write_png_atomic(paths["instances"], instances)
    return dict(entry, label=str(paths["labels"].relative_to(base)),
                instances=str(paths["instances"].relative_to(base)),
                boxes=str((output / "prompts" / f"{name}.json").relative_to(base))), instances
