"""A cohort of slides: sharded across torchrun ranks with the same outputs as one process, finished slides skipped by a
rerun (also after a killed job), outputs of other settings refused, and a summary of every slide."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch
from bench_wsi import write_pyramid
from conftest import BUNDLE, REPO, SAMPLE_CROPS, bundle_workflow
from test_wsi_inference import DarkNuclei, _bundle_predictor

from scripts.data import read_rgb_image
from scripts.inference import load_checkpoint
from scripts.wsi import SlideOptions, run_cohort, run_wsi_inference

CONFIGS = BUNDLE / "configs"
SLIDES = 4


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Four 2-level pyramidal TIFFs of 256x256 real MoNuSeg pixels (the sample crops, turned): one window each."""
    folder = tmp_path_factory.mktemp("cohort")
    crops = [read_rgb_image(path) for path in sorted((SAMPLE_CROPS / "images").glob("*.png"))]
    for index in range(SLIDES):
        pixels = np.ascontiguousarray(np.rot90(crops[index % len(crops)], index))
        write_pyramid(folder / f"slide{index}.tif", lambda y, x, h, w, p=pixels: p[y:y + h, x:x + w],
                      pixels.shape[:2], levels=2)
    return folder


def _rows(output_dir) -> list[dict]:
    with open(output_dir / "cohort.csv") as handle:
        return list(csv.DictReader(handle))


def _outputs(output_dir) -> dict[str, tuple]:
    """Per slide: its instance map and its GeoJSON features."""
    return {path.name.removesuffix("_instances.tif"): (
        tifffile.imread(path), json.loads((output_dir / path.name.replace("_instances.tif", ".geojson")).read_text()))
        for path in sorted(output_dir.glob("*_instances.tif"))}


def test_a_rerun_runs_only_the_slides_without_outputs(slides, tmp_path):
    weights = tmp_path / "dark_nuclei.pt"
    torch.save({}, weights)  # DarkNuclei has no parameters
    options = SlideOptions(tile_size=256, tile_halo=32, progress=False)
    first = run_wsi_inference(str(slides / "*.tif"), _bundle_predictor(DarkNuclei()), weights, tmp_path / "out",
                              options)
    assert [row["status"] for row in first] == ["run"] * SLIDES and {row["rank"] for row in first} == {0}
    assert [row["slide"] for row in _rows(tmp_path / "out")] == sorted(str(path) for path in slides.glob("*.tif"))
    assert all(int(row["instances"]) > 5 for row in _rows(tmp_path / "out"))
    before = _outputs(tmp_path / "out")

    # a job killed on slide 2: its summary (written last) never came, a staged file was left behind
    (tmp_path / "out" / "slide2_summary.json").unlink()
    (tmp_path / "out" / ".slide2.geojson.abc.tmp.geojson").write_text("{")
    again = run_cohort(sorted(str(path) for path in slides.glob("*.tif")), _bundle_predictor(DarkNuclei()), weights,
                       tmp_path / "out", options)
    assert [row["status"] for row in again] == ["done before", "done before", "run", "done before"]
    after = _outputs(tmp_path / "out")
    for name in before:
        assert np.array_equal(before[name][0], after[name][0]) and before[name][1] == after[name][1]

    with pytest.raises(ValueError, match="slide0_summary.json: .* other weights or slide options"):
        run_cohort([str(slides / "slide0.tif")], _bundle_predictor(DarkNuclei()), weights, tmp_path / "out",
                   SlideOptions(tile_size=256, tile_halo=64, progress=False))
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "slide0.tif").write_bytes((slides / "slide0.tif").read_bytes())
    with pytest.raises(ValueError, match="slide0 appear twice"):
        run_cohort([str(slides / "slide0.tif"), str(tmp_path / "copy" / "slide0.tif")],
                   _bundle_predictor(DarkNuclei()), weights, tmp_path / "other", options)
    assert not (tmp_path / "other").exists()


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc: torchrun's workers)."""
    children = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:  # the process ended while we looked
                continue
            if int(fields[1]) == pid:
                children.append(int(stat))
    return children


def _bundle_options(weights, slides, output_dir, threshold: float) -> dict:
    """wsi_inference.json's options of these tests; eager torch: each rank process would export the network to ONNX
    for one or two windows."""
    return {"ckpt_path": str(weights), "slide_glob": str(slides / "*.tif"), "output_dir": str(output_dir),
            "tile_size": 256, "tile_halo": 32, "sw_overlap": 0.0, "threshold": threshold, "min_area": 1,
            "wsi_progress": False, "inference_precision": "float32", "inference_runtime": "torch"}


def _torchrun_command(weights, slides, output_dir, threshold: float) -> list[str]:
    """The same bundle run under torchrun, two ranks."""
    configs = f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'wsi_inference.json'}']"
    options = [item for name, value in _bundle_options(weights, slides, output_dir, threshold).items()
               for item in (f"--{name}", str(value).lower() if isinstance(value, bool) else str(value))]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
            "run", "--config_file", configs, *options]


@pytest.mark.slow
def test_torchrun_ranks_share_the_slides_and_a_killed_job_resumes(trained_allinsam, slides, tmp_path):
    """The trained bundle network through wsi_inference.json: in this process with one thread, then 2 gloo ranks (one
    thread each, as torchrun sets) of which one is killed (SIGKILL) after the first finished slide, so that torchrun
    stops the job, and the same command again: the two runs' slides, each by its rank, equal the one process's."""
    weights = trained_allinsam[1] / "model.pt"
    # the two-step network's probabilities span about 0.4-0.7 with no clear nuclei: at their 80th percentile over
    # the slides (a slide is one window) the masks are thousands of specks of 1-3 px, kept (--min_area 1): a strict
    # comparison, since any change in the probabilities moves specks
    network = bundle_workflow([CONFIGS / "inference.json"], ckpt_path=str(weights)).parser.get_parsed_content("network")
    load_checkpoint(network, weights, "cpu")
    with torch.no_grad():
        pixels = torch.stack([torch.as_tensor(tifffile.imread(path)) for path in sorted(slides.glob("*.tif"))])
        probability = torch.sigmoid(network.eval()(pixels.permute(0, 3, 1, 2) / 255.0))
    threshold = round(float(np.quantile(probability.numpy(), 0.8)), 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        bundle_workflow([CONFIGS / "inference.json", CONFIGS / "wsi_inference.json"],
                        **_bundle_options(weights, slides, tmp_path / "one", threshold)).run()
    finally:
        torch.set_num_threads(threads)
    one = _outputs(tmp_path / "one")
    assert len(one) == SLIDES and all(int(row["instances"]) > 100 for row in _rows(tmp_path / "one"))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(_torchrun_command(weights, slides, tmp_path / "killed", threshold), cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list((tmp_path / "killed").glob("*_summary.json")) and job.poll() is None:
        assert time.monotonic() < deadline, "no slide finished in 10 minutes"
        time.sleep(0.05)
    os.kill(max(_children(job.pid)), signal.SIGKILL)  # one worker
    assert job.wait(timeout=300) != 0
    finished = {path.name.removesuffix("_summary.json") for path in (tmp_path / "killed").glob("*_summary.json")}
    assert 1 <= len(finished) < SLIDES and not (tmp_path / "killed" / "cohort.csv").exists()

    subprocess.run(_torchrun_command(weights, slides, tmp_path / "killed", threshold), cwd=REPO, env=env, check=True,
                   capture_output=True)
    rows = _rows(tmp_path / "killed")
    statuses = {row["slide"].rsplit("/", 1)[1][:-4]: row["status"] for row in rows}
    assert statuses == {name: "done before" if name in finished else "run" for name in statuses}
    assert [int(row["rank"]) for row in rows] == [0, 1, 0, 1]  # each slide by the rank whose share it is, in both runs
    resumed = _outputs(tmp_path / "killed")
    assert resumed.keys() == one.keys()
    for name in one:
        assert np.array_equal(one[name][0], resumed[name][0]) and one[name][1] == resumed[name][1], name
