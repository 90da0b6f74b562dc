"""Whole-slide inference throughput and peak memory of the bundle's ``wsi_inference.json`` on a large pyramidal TIFF
built from real MoNuSeg tiles (or on a slide you give).

    python scripts/bench_wsi.py --ckpt_path runs/.../models/model.pt --size 4096 --tile_size 1024 --tile_halo 64
    python scripts/bench_wsi.py --network stand_in --size 32768 --output docs/results/wsi_memory_32k.json
    python scripts/bench_wsi.py --ckpt_path ... --slide my_slide.svs --wsi_backend openslide

Prints and writes to ``docs/results/wsi_throughput.json``: WSI tiles / s, 256x256 network windows / s, the slide
size, tile settings and the process's peak RSS (resource.getrusage: the slide is streamed, never held whole). The
network's start-up (ONNX Runtime's export and quantisation, once per process) runs on one blank window before the
clock starts and is reported apart (``startup_seconds``).
``--network stand_in`` swaps the network for a near-free one, to measure the rest (and memory) on a large slide.
The built slide is a mosaic of the MoNuSeg test images with a white quarter, so the tissue mask skips tiles.
Run it alone.
"""

import json
import math
import multiprocessing
import resource
import tempfile
import time
from collections.abc import Callable
from glob import glob
from pathlib import Path

import fire
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "allinsam"
import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)


def write_pyramid(path: str | Path, pixels: Callable[[int, int, int, int], np.ndarray], shape: tuple[int, int],
                  levels: int = 3, tile: int = 256) -> None:
    """Write a tiled, zlib-compressed pyramidal RGB TIFF of level-0 ``shape`` (H, W): level l halves level l - 1
    (every 2**l-th pixel) and is a top-level page with ``subfiletype=1``, as MONAI's WSIReader reads levels.
    ``pixels(y, x, h, w)`` gives level-0 RGB uint8 (h, w, 3); tiles are streamed, the slide is never held whole."""
    import tifffile

    def tiles(level: int):
        step = 2 ** level
        height, width = math.ceil(shape[0] / step), math.ceil(shape[1] / step)
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                h, w = min(tile, height - y), min(tile, width - x)
                block = pixels(y * step, x * step, min(h * step, shape[0] - y * step),
                               min(w * step, shape[1] - x * step))[::step, ::step]
                padded = np.zeros((tile, tile, 3), dtype=np.uint8)
                padded[:h, :w] = block
                yield padded

    with tifffile.TiffWriter(path, bigtiff=shape[0] * shape[1] * 3 > 2 ** 31) as writer:
        for level in range(levels):
            size = (math.ceil(shape[0] / 2 ** level), math.ceil(shape[1] / 2 ** level), 3)
            writer.write(tiles(level), shape=size, dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                         compression="zlib", subfiletype=1 if level else 0)


def monuseg_mosaic(images: list[np.ndarray], shape: tuple[int, int]) -> Callable[[int, int, int, int], np.ndarray]:
    """``pixels(y, x, h, w)`` of a mosaic (H, W) tiling the equal-sized RGB ``images`` (a different one in each
    cell), white in its bottom-right quarter (no tissue)."""
    side = images[0].shape[0]

    def pixels(y: int, x: int, h: int, w: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        for top in range(y - y % side, y + h, side):
            for left in range(x - x % side, x + w, side):
                if top >= shape[0] // 2 and left >= shape[1] // 2:
                    continue
                image = images[(top // side * 7 + left // side) % len(images)]
                y0, y1, x0, x1 = max(y, top), min(y + h, top + side), max(x, left), min(x + w, left + side)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = image[y0 - top:y1 - top, x0 - left:x1 - left]
        return out

    return pixels


class DarkStandIn(torch.nn.Module):
    """A near-free segmenter (B, 3, h, w) -> logits (B, 1, h, w), red channel darker than 0.4 after 3x3 smoothing:
    ``--network stand_in`` measures the pipeline without the network (reading, stitching, writing, memory)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return 50 * (0.4 - torch.nn.functional.avg_pool2d(image[:, :1], 3, stride=1, padding=1))


def build_slide(path: str, size: int, monuseg: str) -> None:
    """The benchmark slide: a ``size`` x ``size`` mosaic of the MoNuSeg test images, smallest level about 1000 px."""
    import tifffile

    paths = sorted(glob(f"{monuseg}/test/*.tif"))
    if not paths:
        raise FileNotFoundError(f"{monuseg}/test/*.tif: no MoNuSeg test image to build the slide from")
    images = [tifffile.imread(image)[..., :3] for image in paths]
    levels = max(2, math.ceil(math.log2(size / 1024)) + 1)
    write_pyramid(path, monuseg_mosaic(images, (size, size)), (size, size), levels=levels)


def main(ckpt_path: str | None = None, slide: str | None = None, size: int = 4096,
         monuseg: str = str(REPO.parent / "shared" / "data" / "monuseg"), network: str = "bundle",
         tile_size: int = 1024, tile_halo: int = 64, sw_batch_size: int = 4, sw_overlap: float = 0.25,
         wsi_backend: str = "tifffile", inference_runtime: str | None = None, inference_precision: str | None = None,
         output: str = str(REPO / "docs" / "results" / "wsi_throughput.json")) -> dict:
    """``network``: ``bundle`` (AllInSamNet with ``ckpt_path``, run by ``inference_runtime`` and
    ``inference_precision``, inference.json's defaults unless given) or ``stand_in`` (``DarkStandIn``)."""
    from monai.bundle import ConfigWorkflow

    from scripts.inference import TilePredictor, load_checkpoint
    from scripts.wsi import infer_slide

    if network not in ("bundle", "stand_in"):
        raise ValueError(f"network must be bundle or stand_in, got {network!r}")
    with tempfile.TemporaryDirectory() as folder:
        if slide is None:  # built in a child process, so that the peak RSS below is the inference's alone
            slide = f"{folder}/monuseg_mosaic_{size}.tif"
            builder = multiprocessing.get_context("spawn").Process(target=build_slide, args=(slide, size, monuseg))
            builder.start()
            builder.join()
            if builder.exitcode:
                raise RuntimeError(f"building the benchmark slide failed (exit code {builder.exitcode})")
        workflow = ConfigWorkflow(config_file=[str(BUNDLE / "configs" / name) for name in
                                               ("inference.json", "wsi_inference.json")],
                                  workflow_type="infer", sw_batch_size=sw_batch_size, sw_overlap=sw_overlap,
                                  **{key: value for key, value in (("inference_runtime", inference_runtime),
                                                                   ("inference_precision", inference_precision))
                                     if value is not None})
        workflow.initialize()
        device = workflow.parser.get_parsed_content("device")
        if network == "bundle":
            model = workflow.parser.get_parsed_content("network")
            load_checkpoint(model, ckpt_path, device)
        else:
            model = DarkStandIn().to(device)
        windows = []  # the batch size of every network call: the 256x256 windows run
        model.register_forward_pre_hook(lambda module, args: windows.append(args[0].shape[0]))
        predictor = TilePredictor(model, *(workflow.parser.get_parsed_content(key)
                                           for key in ("inferer", "load", "activation")), device=device)
        side = workflow.parser.get_parsed_content("patch_size")
        warm_up = time.perf_counter()  # start-up, not throughput: ONNX Runtime's export (and int8 quantisation)
        predictor(np.zeros((side, side, 3), dtype=np.uint8))
        startup_seconds = time.perf_counter() - warm_up
        windows.clear()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        summary = infer_slide(slide, predictor, f"{folder}/out", tile_size=tile_size, tile_halo=tile_halo,
                              backend=wsi_backend)
        seconds = time.perf_counter() - started
    result = {
        "network": network, "inference_runtime": workflow.parser.get_parsed_content("inference_runtime"),
        "inference_precision": workflow.parser.get_parsed_content("inference_precision"), "slide": summary["slide"],
        "shape": summary["shape"], "tile_size": tile_size,
        "tile_halo": tile_halo, "sw_batch_size": sw_batch_size, "sw_overlap": sw_overlap,
        "tiles_in_grid": summary["tiles_in_grid"], "tiles_run": len(summary["tiles_run"]),
        "nuclei": summary["instances"], "duplicates": summary["duplicates"], "cut": summary["cut"],
        "startup_seconds": round(startup_seconds, 1), "seconds": round(seconds, 1),
        "wsi_tiles_per_s": round(len(summary["tiles_run"]) / seconds, 3),
        "windows": sum(windows), "windows_per_s": round(sum(windows) / seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_before_inference_mib": round(rss_before), "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=1))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
