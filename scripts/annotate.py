"""Box / point prompts -> instance masks with a pretrained SAM: the bundle's ``annotate`` workflow from the shell.

    # any images + prompts (boxes JSON, CSV, COCO, QuPath GeoJSON; one file for all images or a folder of files)
    python scripts/annotate.py images --images "tiles/*.png" --prompts boxes.csv --output_dir pseudo_masks

    # weak labels for a prepared datalist (P1's weak setting), optionally with careless boxes (P2's "random")
    python scripts/annotate.py weak_labels --datalist data/monuseg/datalist_0.5pct_seed0.json --jitter 3

    # how the weak labels differ from the ground truth they replace (training and validation splits only)
    python scripts/annotate.py score data/monuseg/datalist_0.5pct_seed0_weak.json \
        data/monuseg/datalist_0.5pct_seed0.json --output docs/results/weak_labels_0.5pct

Both run ``bundles/allinsam/configs/annotate.json`` through MONAI's ``ConfigWorkflow`` (workflows ``annotate`` and
``weak_labels``, which the bundle also runs by itself); segmenter options (``--threshold``, ``--zoom``, ``--flip``,
...) override ``segmenter#<option>`` there.
"""

import csv
import sys
from glob import glob
from pathlib import Path

import fire
import numpy as np
from bundle_path import BUNDLE  # also puts the bundle's scripts package on sys.path, for annotate.json

PROMPT_SUFFIXES = (".json", ".geojson", ".csv")


def run_annotate_workflow(data: list[dict] | None, output_dir: str | Path | None, backbone: str = "litemedsam",
                          checkpoint: str | None = None, run_id: str = "annotate", **overrides):
    """Run a workflow of the bundle's annotate.json: ``annotate`` on ``data`` (items ``{"image": path, "boxes":
    prompt file}``) into ``output_dir``, or ``weak_labels``; other options override config ids (``zoom`` ->
    ``segmenter#zoom``, ``datalist``, ``box_jitter``, ...)."""
    from monai.bundle import ConfigWorkflow

    workflow_ids = ("datalist", "weak_splits", "box_jitter", "box_loosen", "box_seed")
    overrides = {key if key in workflow_ids else f"segmenter#{key}": value for key, value in overrides.items()}
    overrides.update({key: value for key, value in (("data", data), ("output_dir", output_dir)) if value is not None})
    workflow = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "annotate.json"), run_id=run_id,
                              backbone=backbone, sam_checkpoint=checkpoint, **overrides)
    workflow.initialize()
    result = workflow.run()[0]  # the run list holds one expression
    workflow.finalize()
    return result


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
    """Replace the labels of ``splits`` in a prepared datalist by SAM pseudo masks made from its boxes: the bundle's
    ``weak_labels`` workflow (``scripts.annotation.make_weak_labels``). Returns the weak datalist's path."""
    splits = splits.split(",") if isinstance(splits, str) else list(splits)  # fire: --splits training,validation
    weak_path = run_annotate_workflow(None, None, backbone, checkpoint, run_id="weak_labels", datalist=str(datalist),
                                      weak_splits=splits, box_jitter=jitter, box_loosen=loosen, box_seed=seed,
                                      **segmenter_options)
    print(f"{weak_path}: weak labels for {', '.join(splits)}")
    return weak_path


def score(weak_datalist: str, truth_datalist: str, output: str | None = None,
          splits: tuple[str, ...] = ("training", "validation")) -> list[dict]:
    """Weak labels against the ground truth they replace, per image of ``splits``: pixel Dice, recall, precision,
    area ratio (weak / truth pixels) and AJI of the instance maps. Prints the means per split; ``output``: also
    ``<output>.csv`` (per image) and ``<output>.md`` (means)."""
    from monai.data import load_decathlon_datalist

    from scripts.data import read_instance_map, staged
    from scripts.metrics.segmentation import aggregated_jaccard_index, recall_precision

    rows = []
    for split in splits:
        weak = load_decathlon_datalist(weak_datalist, data_list_key=split)
        truth = {Path(entry["image"]).name: entry
                 for entry in load_decathlon_datalist(truth_datalist, data_list_key=split)}
        for entry in weak:
            name = Path(entry["image"]).name
            if name not in truth:
                raise ValueError(f"{truth_datalist}: no {split} entry for {name} of {weak_datalist}")
            weak_instances = read_instance_map(entry["instances"])
            true_instances = read_instance_map(truth[name]["instances"])
            recall, precision = recall_precision(weak_instances, true_instances)
            dice = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
            rows.append({"split": split, "image": Path(name).stem, "dice": dice, "recall": recall,
                         "precision": precision,
                         "area_ratio": np.count_nonzero(weak_instances) / max(np.count_nonzero(true_instances), 1),
                         "aji": aggregated_jaccard_index(weak_instances, true_instances),
                         "weak_nuclei": len(np.unique(weak_instances)) - 1,
                         "true_nuclei": len(np.unique(true_instances)) - 1})
    columns = ("dice", "recall", "precision", "area_ratio", "aji")
    lines = [f"Weak labels ({weak_datalist}) against the ground truth ({truth_datalist}), mean over images", "",
             "| split | images | " + " | ".join(columns) + " | weak / true nuclei |",
             "|---|---|" + "---|" * (len(columns) + 1)]
    for split in splits:
        chosen = [row for row in rows if row["split"] == split]
        means = " | ".join(f"{np.mean([row[c] for row in chosen]):.3f}" for c in columns)
        counts = f"{sum(r['weak_nuclei'] for r in chosen)} / {sum(r['true_nuclei'] for r in chosen)}"
        lines.append(f"| {split} | {len(chosen)} | {means} | {counts} |")
    print("\n".join(lines))
    if output:
        with staged(f"{output}.csv") as table, open(table, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
        with staged(f"{output}.md") as summary:
            summary.write_text("\n".join(lines) + "\n")
    return rows


def user_error(error: BaseException) -> BaseException | None:
    """The bad-input error (FileNotFoundError / ValueError) behind ``error``: MONAI wraps an error raised inside a
    config expression in a RuntimeError."""
    while error is not None and not isinstance(error, (FileNotFoundError, ValueError)):
        error = error.__cause__
    return error


if __name__ == "__main__":
    try:
        fire.Fire({"images": images, "weak_labels": weak_labels, "score": score}, serialize=lambda result: None)
    except Exception as error:
        if user_error(error) is None:
            raise
        sys.exit(f"annotate: error: {user_error(error)}")
