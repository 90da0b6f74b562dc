"""The MONAI Label app (apps/allinsam) served for real by ``monailabel start_server`` on a free loopback port, with
real MoNuSeg crops in the studies folder: /info/, prompt-free segmentation, box annotation, bad requests, and
training from the labels saved through the server."""

import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from conftest import CONFIGS, REPO, SAMPLE_CROPS, bundle_workflow, copy_bundle
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image
from scripts.data import instance_contours, read_instance_map, read_rgb_image
from scripts.metrics import instances_from_mask

TEST_CROP = "TCGA-2Z-A9J9-01A-01-TS1_y300_x300"
TRAINING_CROPS = ["TCGA-21-5784-01Z-00-DX1_y372_x372", "TCGA-38-6178-01Z-00-DX1_y372_x372"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _boxes(name: str) -> list[list[int]]:
    return json.loads((SAMPLE_CROPS / "boxes" / f"{name}.json").read_text())["boxes"]


def _png(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


@pytest.fixture(scope="module")
def server(trained_allinsam, tmp_path_factory):
    """The app with a copy of the bundle (its ``models/model.pt`` from two training epochs) and the five crops."""
    root = tmp_path_factory.mktemp("monailabel")
    bundle = copy_bundle(root, trained_allinsam[1] / "model.pt")
    app = shutil.copytree(REPO / "apps" / "allinsam", root / "app",
                          ignore=shutil.ignore_patterns("__pycache__", "model", "logs", "bin"))
    studies = root / "studies"
    studies.mkdir()
    for image in (SAMPLE_CROPS / "images").glob("*.png"):
        shutil.copy(image, studies)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve_label.py"), "--studies", str(studies),
                                    "--bundle_path", str(bundle), "--app_dir", str(app), "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_serving(process, url, root / "server.log")
            yield SimpleNamespace(url=url, port=port, bundle=bundle, studies=studies, log=root / "server.log")
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_until_serving(process: subprocess.Popen, url: str, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    state = f"exited with {process.returncode}" if process.poll() is not None else f"not up in {timeout_s} s"
    pytest.fail(f"MONAI Label server {state}:\n{log.read_text()[-3000:]}")


def test_server_binds_loopback_and_lists_the_models(server):
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log.read_text()
    info = requests.get(f"{server.url}/info/", timeout=10).json()
    assert info["models"]["allinsam"]["type"] == "segmentation"
    assert info["models"]["allinsam_box"]["type"] == "annotation"
    assert info["models"]["allinsam"]["labels"] == {"nucleus": 1}
    assert set(info["trainers"]) == {"allinsam"}
    assert info["version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]
    assert set(requests.get(f"{server.url}/datastore/?output=all", timeout=10).json()["objects"]) == {
        path.stem for path in (SAMPLE_CROPS / "images").glob("*.png")}


def test_prompt_free_segmentation_is_the_bundle_inference(server, tmp_path):
    crop = SAMPLE_CROPS / "images" / f"{TEST_CROP}.png"

    def bundle_inference(threshold: float) -> tuple[np.ndarray, ConfigWorkflow]:
        output = tmp_path / str(threshold)
        workflow = bundle_workflow([CONFIGS / "inference.json"], "infer", ckpt_path=str(server.bundle / "models/model.pt"),
                                   output_dir=str(output), threshold=threshold, input_glob=str(crop))
        workflow.run()
        return np.asarray(Image.open(output / f"{TEST_CROP}_mask.png")), workflow

    default_mask, workflow = bundle_inference(0.5)
    # after two training steps every probability is above 0.5 (one all-covering mask): a threshold at their 90th
    # percentile gives a mask with structure, so that the comparison says something
    network = workflow.parser.get_parsed_content("network").eval()
    with torch.no_grad():
        probability = torch.sigmoid(network(torch.as_tensor(read_rgb_image(crop)).permute(2, 0, 1)[None] / 255.0))
    low = float(np.quantile(probability.numpy(), 0.9))
    for threshold, mask in ((None, default_mask), (low, bundle_inference(low)[0])):
        options = {} if threshold is None else {"threshold": threshold}
        answer = requests.post(f"{server.url}/infer/allinsam", params={"image": TEST_CROP, "output": "image"},
                               data={"params": json.dumps(options)}, timeout=120)
        instances = _png(answer)
        assert instances.shape == mask.shape and instances.dtype == np.uint16
        assert np.array_equal(instances, instances_from_mask(mask))  # the bundle's mask, the metrics' instances
    assert 0.05 < (instances > 0).mean() < 0.15 and instances.max() >= 2

    result = requests.post(f"{server.url}/infer/allinsam", params={"image": TEST_CROP, "output": "json"},
                           data={"params": json.dumps({"threshold": low})}, timeout=120).json()
    (element,) = result["annotation"]["elements"]
    assert element["label"] == "nucleus"
    assert element["contours"] == list(instance_contours(instances).values())
    assert element["instance_ids"] == list(range(1, instances.max() + 1))


def test_box_annotation_returns_the_sam_mask_of_each_box(server):
    boxes = _boxes(TEST_CROP)
    answer = requests.post(f"{server.url}/infer/allinsam_box", params={"image": TEST_CROP, "output": "image"},
                           data={"params": json.dumps({"boxes": boxes})}, timeout=120)
    instances = _png(answer)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "annotate.json"))
    expected, _ = parser.get_parsed_content("segmenter")(read_rgb_image(SAMPLE_CROPS / "images" / f"{TEST_CROP}.png"),
                                                         np.asarray(boxes, dtype=np.float64))
    assert np.array_equal(instances, expected)  # the bundle's annotation workflow, not a second one

    truth = read_instance_map(SAMPLE_CROPS / "instances" / f"{TEST_CROP}.png") > 0
    dice = 2 * (truth & (instances > 0)).sum() / (truth.sum() + (instances > 0).sum())
    assert dice > 0.8, dice  # tight boxes: 0.887 on the 14 MoNuSeg test images (README)
    ids = np.unique(instances[instances > 0])
    assert len(ids) >= 0.9 * len(boxes)
    for nucleus in ids:  # each mask stays inside its own box (clip_margin 0)
        x0, y0, x1, y1 = boxes[nucleus - 1]
        rows, cols = np.nonzero(instances == nucleus)
        assert rows.min() >= y0 and rows.max() < y1 and cols.min() >= x0 and cols.max() < x1

    result = requests.post(f"{server.url}/infer/allinsam_box", params={"image": TEST_CROP, "output": "json"},
                           data={"params": json.dumps({"boxes": boxes[:3]})}, timeout=120).json()
    assert result["report"]["boxes_total"] == 3
    assert result["annotation"]["elements"][0]["instance_ids"] == [1, 2, 3]


@pytest.mark.parametrize("image, params, status", [
    ("no_such_tile", {"boxes": [[0, 0, 10, 10]]}, 404),
    (TEST_CROP, {"boxes": [[10, 10, 5]]}, 422),
    (TEST_CROP, {"boxes": [[10, 10, 5, 5]]}, 422),
    (TEST_CROP, {"boxes": "a box"}, 422),
    (TEST_CROP, {}, 422),
])
def test_a_bad_request_gets_4xx_and_the_server_keeps_serving(server, image, params, status):
    answer = requests.post(f"{server.url}/infer/allinsam_box", params={"image": image},
                           data={"params": json.dumps(params)}, timeout=60)
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"]  # says what is wrong
    again = requests.post(f"{server.url}/infer/allinsam_box", params={"image": TEST_CROP, "output": "image"},
                          data={"params": json.dumps({"boxes": _boxes(TEST_CROP)[:2]})}, timeout=120)
    assert _png(again).max() == 2


def test_labels_saved_through_the_server_train_the_bundle(server):
    for name in TRAINING_CROPS:  # the annotator's flow: boxes -> SAM masks -> saved as final labels
        answer = requests.post(f"{server.url}/infer/allinsam_box", params={"image": name, "output": "image"},
                               data={"params": json.dumps({"boxes": _boxes(name)})}, timeout=120)
        saved = requests.put(f"{server.url}/datastore/label", params={"image": name, "tag": "final"},
                             files={"label": (f"{name}.png", answer.content, "image/png")}, timeout=60)
        assert saved.status_code == 200, saved.text
        assert np.array_equal(np.asarray(Image.open(server.studies / "labels" / "final" / f"{name}.png")),
                              _png(answer))
    model = server.bundle / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    trained = requests.post(f"{server.url}/train/allinsam", params={"run_sync": "true"}, json={"max_epochs": 1},
                            timeout=600)
    assert trained.status_code == 200, trained.text
    assert (server.bundle / "models" / "last_checkpoint_epoch=1.pt").is_file()
    assert model.stat().st_mtime_ns > before  # validation every epoch: the best model is written
    log = server.log.read_text()
    assert "Total Records for Training: 2" in log and "train_loss" in log
    after = requests.post(f"{server.url}/infer/allinsam", params={"image": TEST_CROP, "output": "image"}, timeout=120)
    assert _png(after).shape == (256, 256)  # the server serves the retrained model
