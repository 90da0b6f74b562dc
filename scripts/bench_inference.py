"""Whole-image inference time of the bundle's ``inference.json`` (sliding window, gaussian blending) per image.

    python scripts/bench_inference.py --ckpt_path runs/grid_0.5pct/0.5pct_complete_seed0/models/model.pt \
        --images "data/monuseg/cases/images/TCGA-2Z*.png,data/monuseg/cases/images/TCGA-44*.png" --overlaps 0,0.25

Prints seconds per 1000x1000 image for each sliding-window overlap (the first image is a warm-up when more than
one is given), with reading, inference, post-processing and writing the PNGs included. Run it alone.
"""

import tempfile
import time
from glob import glob
from pathlib import Path

import fire
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "allinsam"
import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)


def main(ckpt_path: str, images: str, overlaps: str | tuple = (0.0, 0.25), sw_batch_size: int = 1) -> dict:
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    paths = sorted(path for pattern in images.split(",") for path in glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no image matches {images}")
    overlaps = [float(value) for value in (str(overlaps).split(",") if isinstance(overlaps, (str, int, float))
                                           else overlaps) if str(value).strip()]
    results = {}
    for overlap in overlaps:
        with tempfile.TemporaryDirectory() as output:
            workflow = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "inference.json"), workflow_type="infer",
                                      ckpt_path=ckpt_path, output_dir=output, sw_overlap=overlap,
                                      sw_batch_size=sw_batch_size, input_glob=None, data=[{"image": p} for p in paths])
            workflow.initialize()
            evaluator = workflow.parser.get_parsed_content("evaluator")
            stamps = []
            evaluator.add_event_handler(Events.GET_BATCH_STARTED, lambda _: stamps.append(time.perf_counter()))
            evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
            workflow.run()
            seconds = [end - start for start, end in zip(stamps[0::2], stamps[1::2])]
            measured = seconds[1:] if len(seconds) > 1 else seconds
            results[overlap] = sum(measured) / len(measured)
            print(f"overlap {overlap:g}: {results[overlap]:.1f} s per image "
                  f"({len(measured)} measured, threads {torch.get_num_threads()})")
    return results


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
