"""Whole-image inference time of the bundle's ``inference.json`` (sliding window, gaussian blending) per image, for
each runtime, numerics option and sliding-window overlap, against float32 eager torch and against this CPU's
matrix-multiply rate.

    python scripts/bench_inference.py --ckpt_path runs/grid_0.5pct/0.5pct_complete_seed0/models/model.pt \
        --images "data/monuseg/cases/images/TCGA-2Z*.png,data/monuseg/cases/images/TCGA-44*.png" \
        --overlaps 0,0.25 --settings torch/float32,onnxruntime/float32,onnxruntime/int8,torch/bfloat16 \
        --labels "data/monuseg/cases/labels/{stem}.png"

Prints, per (overlap, runtime/precision): seconds per image (reading, inference, post-processing and writing the PNGs
included; the first image is a warm-up when more than one is given, and takes ONNX Runtime's export; Dice counts
every image), the speed-up
over the reference setting (``--reference``, torch/float32 unless told) at the same overlap, the Dice of its masks
against the reference's on the same images, with ``--labels`` their mean Dice against the truth, and the network's
GFLOP/s (its counted floating-point operations per window x windows / seconds) beside the 2048x2048
``torch.matmul`` rate measured in the same run. Run it alone on the machine.
"""

import tempfile
import time
from glob import glob
from pathlib import Path

import fire
import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "allinsam"
import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)

from scripts.metrics import dice_iou  # noqa: E402  (the bundle's package)


def matmul_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of a ``size`` x ``size`` ``torch.matmul`` in ``dtype`` on this machine: calls for at least a second
    as warm-up (the first one measured 44 against 102-104 GFLOP/s later on a 2-core AVX2 CPU), then for at least
    ``seconds`` (one call each where the type is emulated: about a minute for bfloat16 on that CPU)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    rate = 0.0
    for duration in (1.0, seconds):
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < duration:
            a @ b
            calls += 1
        rate = 2 * size**3 * calls / (time.perf_counter() - start) / 1e9
    return rate


def window_gflop(network: torch.nn.Module) -> float:
    """Floating-point operations (GFLOP) of one float32 forward pass of ``network`` on one window, as torch counts them
    (matrix multiplies and convolutions), on torch: ONNX Runtime's work is invisible to the counter."""
    window = torch.rand(1, 3, network.image_size, network.image_size)
    options = network.inference_runtime, network.inference_precision
    network.inference_runtime, network.inference_precision = "torch", "float32"
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network(window)
    finally:
        network.inference_runtime, network.inference_precision = options
    return counter.get_total_flops() / 1e9


def _read_mask(folder: Path, image_path: str) -> np.ndarray:
    """The ``<name>_mask.png`` that inference.json wrote into ``folder`` for ``image_path``."""
    return np.asarray(Image.open(folder / f"{Path(image_path).stem}_mask.png"))


def _run(ckpt_path: str, paths: list[str], output: str, overlap: float, runtime: str, precision: str,
         sw_batch_size: int | None) -> tuple[list[float], int, torch.nn.Module]:
    """One inference workflow over ``paths``: (seconds per image, windows predicted, the network it loaded)."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "inference.json"), workflow_type="infer",
                              ckpt_path=ckpt_path, output_dir=output, sw_overlap=overlap,
                              inference_precision=precision, inference_runtime=runtime, input_glob=None,
                              data=[{"image": path} for path in paths],
                              **({} if sw_batch_size is None else {"sw_batch_size": sw_batch_size}))
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network")
    calls = []
    network.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))  # either runtime
    evaluator = workflow.parser.get_parsed_content("evaluator")
    stamps = []
    evaluator.add_event_handler(Events.GET_BATCH_STARTED, lambda _: stamps.append(time.perf_counter()))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
    workflow.run()
    return [end - start for start, end in zip(stamps[0::2], stamps[1::2])], sum(calls), network


def _listed(values: str | float | tuple) -> list[str]:
    """A comma-separated string (or fire's tuple or single number) -> its items as stripped strings."""
    items = str(values).split(",") if isinstance(values, (str, int, float)) else values
    return [str(value).strip() for value in items if str(value).strip()]


REFERENCE = "torch/float32"


def main(ckpt_path: str, images: str, overlaps: str | tuple = (0.0, 0.25),
         settings: str | tuple = (REFERENCE, "onnxruntime/float32"), sw_batch_size: int | None = None,
         reference: str = REFERENCE, labels: str | None = None) -> list[dict]:
    """``settings``: ``runtime/precision`` pairs of inference.json's ``inference_runtime`` and
    ``inference_precision``; ``reference`` is one of them and always runs first. ``labels``: the binary truth of
    each image, a path with ``{stem}`` for the image's file stem. ``sw_batch_size``: None = inference.json's."""
    paths = sorted(path for pattern in images.split(",") for path in glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no image matches {images}")
    truths = {path: labels.format(stem=Path(path).stem) for path in paths} if labels else {}
    missing = [truth for truth in truths.values() if not Path(truth).is_file()]
    if missing:
        raise FileNotFoundError(f"--labels: no truth file {missing[0]} ({len(missing)} missing)")
    settings = [reference] + [name for name in _listed(settings) if name != reference]
    for setting in settings:
        if setting.count("/") != 1:
            raise ValueError(f"a setting is runtime/precision (e.g. onnxruntime/float32), got {setting!r}")
    precisions = {setting.split("/")[1] for setting in settings}
    rates = {name: matmul_gflops(getattr(torch, name)) for name in ("float32", "bfloat16") if name in precisions}
    rates.setdefault("float32", matmul_gflops(torch.float32))
    print("matmul 2048x2048: " + ", ".join(f"{name} {rate:.1f} GFLOP/s" for name, rate in rates.items())
          + f" (threads {torch.get_num_threads()})")
    measured = slice(1, None) if len(paths) > 1 else slice(None)
    rows, gflop = [], 0.0
    with tempfile.TemporaryDirectory() as root:
        for overlap in map(float, _listed(overlaps)):
            baseline = None
            for setting in settings:
                runtime, precision = setting.split("/")
                output = Path(root) / f"{overlap:g}_{runtime}_{precision}"
                seconds, windows, network = _run(ckpt_path, paths, str(output), overlap, runtime, precision,
                                                 sw_batch_size)
                gflop = gflop or window_gflop(network.eval())  # the same for every run: counted once, in float32
                per_image = float(np.mean(seconds[measured]))
                baseline = baseline or (output, per_image)
                dice = np.mean([dice_iou(_read_mask(baseline[0], path), _read_mask(output, path))[0] for path in paths])
                truth_dice = np.mean([dice_iou(_read_mask(output, path), np.asarray(Image.open(truths[path])))[0]
                                      for path in paths]) if truths else float("nan")
                rate = gflop * windows / len(paths) / per_image
                rows.append({"overlap": overlap, "runtime": runtime, "precision": precision,
                             "seconds_per_image": per_image, "reference": reference,
                             "speedup_vs_reference": baseline[1] / per_image, "dice_vs_reference": float(dice),
                             "dice_vs_truth": float(truth_dice),
                             "windows_per_image": windows / len(paths), "gflop_per_window": gflop,
                             "gflops": rate})
                print(f"overlap {overlap:g} {setting:>19}: {per_image:.1f} s per image, "
                      f"{baseline[1] / per_image:.2f}x {reference}, mask Dice vs {reference} {dice:.5f}, "
                      + (f"Dice vs truth {truth_dice:.4f}, " if truths else "") +
                      f"{windows / len(paths):.0f} windows of {gflop:.1f} GFLOP -> {rate:.0f} GFLOP/s "
                      f"({rate / rates['float32']:.0%} of the float32 matmul rate)")
    return rows


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
