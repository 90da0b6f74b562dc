"""Box / point prompts -> instance masks with a pretrained SAM: the bundle's ``annotate`` workflow from the shell.

    # any images + prompts (boxes JSON, CSV, COCO, QuPath GeoJSON; one file for all images or a folder of files)
    python scripts/annotate.py images --images "tiles/*.png" --prompts boxes.csv --output_dir pseudo_masks

    # weak labels for a prepared datalist (P1's weak setting), optionally with careless boxes (P2's "random")
    python scripts/annotate.py weak_labels --datalist data/monuseg/datalist_0.5pct_seed0.json --jitter 3

Both run ``bundles/allinsam/configs/annotate.json`` through MONAI's ``ConfigWorkflow``; segmenter options
(``--threshold``, ``--zoom``, ``--flip``, ...) override ``segmenter#<option>`` there.
"""

import json
import sys
from glob import glob
from pathlib import Path

import fire
import numpy as np

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "allinsam"
import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)

from scripts.annotation import perturb_boxes, read_prompts  # noqa: E402  (the bundle's package)
from scripts.data import (  # noqa: E402
    read_instance_map,
    relabel_sequential,
    write_json_atomic,
    write_png_atomic,
)
from scripts.metrics import dice_iou  # noqa: E402

PROMPT_SUFFIXES = (".json", ".geojson", ".csv")


def run_annotate_workflow(data: list[dict], output_dir: str | Path, backbone: str = "litemedsam",
                          checkpoint: str | None = None, **segmenter_options) -> list[dict]:
    """Run the bundle's annotate workflow on ``data`` (items ``{"image": path, "boxes": prompt file}``)."""
    from monai.bundle import ConfigWorkflow

    overrides = {f"segmenter#{key}": value for key, value in segmenter_options.items()}
    workflow = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "annotate.json"), run_id="annotate",
                              data=data, output_dir=str(output_dir), backbone=backbone, sam_checkpoint=checkpoint,
                              **overrides)
    workflow.initialize()
    reports = workflow.run()[0]  # the run list holds one expression
    workflow.finalize()
    return reports


def _prompt_file_for(image: Path, prompts: Path) -> Path:
    if prompts.is_file():
        return prompts
    candidates = [prompts / f"{image.stem}{suffix}" for suffix in PROMPT_SUFFIXES]
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise FileNotFoundError(f"{prompts}: no prompt file for {image.name} "
                                f"(looked for {[p.name for p in candidates]})")
    return found[0]


def images(images: str, prompts: str, output_dir: str, backbone: str = "litemedsam", checkpoint: str | None = None,
           **segmenter_options) -> None:
    """Annotate the images matching the glob ``images`` with the prompts of ``prompts`` (a file or a folder)."""
    paths = sorted(Path(p) for p in glob(images))
    if not paths:
        raise FileNotFoundError(f"{images}: no image matches")
    data = [{"image": str(path), "boxes": str(_prompt_file_for(path, Path(prompts)))} for path in paths]
    reports = run_annotate_workflow(data, output_dir, backbone, checkpoint, **segmenter_options)
    print(f"{len(reports)} images annotated into {output_dir}: "
          f"{sum(r['prompts_used'] for r in reports)} masks, "
          f"{sum(len(r['prompts_skipped']) for r in reports)} prompts skipped")


def weak_labels(datalist: str, splits: tuple[str, ...] = ("training", "validation"), jitter: float = 0.0,
                loosen: float = 0.0, seed: int = 0, backbone: str = "litemedsam", checkpoint: str | None = None,
                **segmenter_options) -> str:
    """Replace the labels of ``splits`` in a prepared datalist by SAM pseudo masks made from its boxes.

    Writes ``weak/<tag>/`` beside the datalist (prompts used, SAM outputs, labels, instance maps) and
    ``datalist_<tag>.json``; the test split keeps its ground truth. Pseudo masks are cut to the labelled patches
    of a label-fraction datalist. In weak datalists ``boxes`` points to the prompts that were used.
    """
    datalist_path = Path(datalist)
    base, content = datalist_path.parent, json.loads(datalist_path.read_text())
    tag = datalist_path.stem.removeprefix("datalist_") + "_weak"
    tag += f"_jitter{jitter:g}_seed{seed}" if jitter else ""
    tag += f"_loosen{loosen:g}" if loosen else ""
    output = base / "weak" / tag
    patches = {patch["image"]: patch["box"] for patch in content.get("patches", [])}

    data, truths = [], {}
    for split in splits:
        for entry in content[split]:
            name = Path(entry["image"]).stem
            boxes = read_prompts(base / entry["boxes"]).boxes
            boxes = perturb_boxes(boxes, jitter=jitter, loosen=loosen, seed=seed)
            write_json_atomic(output / "prompts" / f"{name}.json",
                              {"image": Path(entry["image"]).name, "boxes": boxes.tolist()})
            data.append({"image": str(base / entry["image"]), "boxes": str(output / "prompts" / f"{name}.json")})
            truths[name] = base / entry["label"]
    run_annotate_workflow(data, output / "sam_output", backbone, checkpoint, **segmenter_options)

    weak = dict(content, labels="weak", weak_options={"source_datalist": datalist_path.name, "jitter": jitter,
                                                      "loosen": loosen, "seed": seed, "backbone": backbone,
                                                      **segmenter_options})
    dices = []
    for split in splits:
        weak[split] = []
        for entry in content[split]:
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
            weak[split].append(dict(entry, label=str(paths["labels"].relative_to(base)),
                                    instances=str(paths["instances"].relative_to(base)),
                                    boxes=str((output / "prompts" / f"{name}.json").relative_to(base))))
            dices.append(dice_iou(instances, read_instance_map(truths[name]))[0])
    weak_path = base / f"datalist_{tag}.json"
    write_json_atomic(weak_path, weak)
    print(f"{weak_path}: {len(dices)} images with pseudo masks, Dice against the ground truth "
          f"{np.mean(dices):.4f} (min {np.min(dices):.4f})")
    return str(weak_path)


def user_error(error: BaseException) -> BaseException | None:
    """The bad-input error (FileNotFoundError / ValueError) behind ``error``: MONAI wraps an error raised inside a
    config expression in a RuntimeError."""
    while error is not None and not isinstance(error, (FileNotFoundError, ValueError)):
        error = error.__cause__
    return error


if __name__ == "__main__":
    try:
        fire.Fire({"images": images, "weak_labels": weak_labels}, serialize=lambda result: None)
    except Exception as error:
        if user_error(error) is None:
            raise
        sys.exit(f"annotate: error: {user_error(error)}")
