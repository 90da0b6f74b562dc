"""A cohort of slides, in one process or sharded across torchrun's ranks (CPU processes, GPUs, several nodes with a
shared ``output_dir``).

Rank r of WORLD_SIZE runs slides r, r + WORLD_SIZE, ... of the sorted list; each slide's outputs are committed
atomically by the rank that ran it (``infer_slide``: the ``<name>_summary.json`` comes last). A rerun skips every slide
whose summary and outputs are on disk and were made with the same weights and slide options, so a killed job
resumes where it stopped; outputs made with other settings are refused rather than mixed. When every rank is done,
rank 0 writes ``cohort.csv`` and ``cohort.json``: each slide with its rank, status, seconds and nuclei.
"""

import csv
import json
import logging
import os
from dataclasses import asdict
from glob import glob
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import staged, write_json_atomic
from ..inference import TilePredictor, load_checkpoint
from ..networks.sam_backbones import sha256_of_file
from .slide_inference import SlideOptions, infer_slide, slide_name

logger = logging.getLogger(__name__)
COHORT_COLUMNS = ("slide", "rank", "status", "seconds", "tissue_tiles", "instances", "cut")


def join_torchrun(predictor: TilePredictor) -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torchrun. Under torchrun (``WORLD_SIZE`` > 1) it joins the
    process group (gloo: only a barrier and the summaries travel) and, when the predictor runs on a GPU, moves it to
    ``cuda:LOCAL_RANK``."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    if torch.device(predictor.device).type == "cuda":
        predictor.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        predictor.network.to(predictor.device)
    return dist.get_rank(), dist.get_world_size()


def finished(output_dir: Path, path: str, settings: dict) -> dict | None:
    """The summary of ``path`` when a run with ``settings`` finished it (summary and outputs on disk), else None.
    ValueError when its outputs were made with other settings."""
    summary_file = output_dir / f"{slide_name(path)}_summary.json"
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    if summary.get("settings") != settings:
        raise ValueError(f"{summary_file}: {path} was segmented with other weights or slide options "
                         f"({summary.get('settings')}); choose a new output_dir or delete that slide's outputs")
    if not all(Path(output).is_file() for output in summary["outputs"].values()):
        return None
    return summary


def run_wsi_inference(slide_glob: str | None, predictor: TilePredictor, ckpt_path: str | os.PathLike,
                      output_dir: str | os.PathLike, options: SlideOptions | None = None) -> list[dict]:
    """Every slide matching ``slide_glob`` through ``run_cohort`` (``wsi_inference.json``'s ``wsi_inference``)."""
    if not slide_glob:
        raise ValueError("no slides given: set --slide_glob, e.g. \"slides/*.svs\"")
    paths = sorted(glob(str(slide_glob)))
    if not paths:
        raise FileNotFoundError(f"{slide_glob}: no slide matches slide_glob")
    return run_cohort(paths, predictor, ckpt_path, output_dir, options or SlideOptions())


def run_cohort(paths: list[str], predictor: TilePredictor, ckpt_path: str | os.PathLike,
               output_dir: str | os.PathLike, options: SlideOptions) -> list[dict]:
    """Load ``ckpt_path`` and segment this rank's share of ``paths`` into ``output_dir``, skipping finished slides;
    returns every slide's row of ``cohort.csv`` (all ranks' after the barrier)."""
    names = [slide_name(path) for path in paths]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(f"slides {', '.join(clashes)} appear twice under different folders or suffixes: their outputs "
                         f"would overwrite each other in {output_dir}; run them into separate output_dir")
    rank, world_size = join_torchrun(predictor)
    load_checkpoint(predictor.network, ckpt_path, predictor.device)
    output_dir = Path(output_dir)
    settings = {"checkpoint_sha256": sha256_of_file(ckpt_path),
                **{key: value for key, value in asdict(options).items() if key != "progress"}}
    settings["classes"] = list(settings["classes"])  # as JSON reads it back
    mine = paths[rank::world_size]
    earlier = {path: finished(output_dir, path, settings) for path in mine}  # refuses mixed settings before any work
    rows = []
    for path in mine:
        summary, status = earlier[path], "done before"
        if summary is None:
            summary = infer_slide(path, predictor, output_dir, options, provenance={"rank": rank, "settings": settings})
            status = "run"
        rows.append({"slide": path, "rank": summary["rank"], "status": status, "seconds": summary["seconds"],
                     "tissue_tiles": summary["tissue_tiles"], "instances": summary["instances"],
                     "cut": summary["cut"], "instances_per_class": summary["instances_per_class"]})
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = [row for rank_rows in gathered for row in rank_rows]
        dist.destroy_process_group()
    rows.sort(key=lambda row: row["slide"])
    if rank == 0:
        write_json_atomic(output_dir / "cohort.json", rows)
        with staged(output_dir / "cohort.csv") as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COHORT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        skipped = sum(row["status"] == "done before" for row in rows)
        logger.info(f"{len(rows)} slides in {output_dir / 'cohort.csv'} ({skipped} finished by an earlier run)")
    return rows
