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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from conftest import CONFIGS, REPO, SAMPLE_CROPS, bundle_workflow, copy_bundle
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image

from scripts.data import instance_contours, instances_from_mask, read_instance_map, read_rgb_image

pytestmark = pytest.mark.slow  # a MONAI Label server and a training through it

TEST_CROP = "TCGA-2Z-A9J9-01A-01-TS1_y300_x300"
TOKEN = "a-token-for-the-tests"
TRAINING_CROPS = ["TCGA-21-5784-01Z-00-DX1_y372_x372", "TCGA-38-6178-01Z-00-DX1_y372_x372"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _boxes(name: str) -> list[list[int]]:
    return json.loads((SAMPLE_CROPS / "boxes" / f"{name}.json").read_text())["boxes"]


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


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
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {TOKEN}"
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve_label.py"), "--studies", str(studies),
                                    "--bundle_path", str(bundle), "--app_dir", str(app), "--port", str(port),
                                    "--token", TOKEN, "--max_queue", "1", "--max_wait_s", "60"],
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_serving(process, url, http, root / "server.log")
            yield SimpleNamespace(url=url, port=port, bundle=bundle, studies=studies, root=root, http=http,
                                  log=root / "server.log")
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_until_serving(process: subprocess.Popen, url: str, http: requests.Session, log: Path,
                        timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if http.get(f"{url}/info/", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    state = f"exited with {process.returncode}" if process.poll() is not None else f"not up in {timeout_s} s"
    pytest.fail(f"MONAI Label server {state}:\n{log.read_text()[-3000:]}")


def test_server_binds_loopback_and_lists_the_models(server):
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log.read_text()
    info = server.http.get(f"{server.url}/info/", timeout=10).json()
    assert info["models"]["allinsam"]["type"] == "segmentation"
    assert info["models"]["allinsam_box"]["type"] == "annotation"
    assert info["models"]["allinsam"]["labels"] == {"nucleus": 1}
    assert set(info["trainers"]) == {"allinsam"}
    assert info["version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]
    assert set(server.http.get(f"{server.url}/datastore/?output=all", timeout=10).json()["objects"]) == {
        path.stem for path in (SAMPLE_CROPS / "images").glob("*.png")}


def test_prompt_free_segmentation_is_the_bundle_inference(server, tmp_path):
    crop = SAMPLE_CROPS / "images" / f"{TEST_CROP}.png"

    def bundle_inference(threshold: float) -> tuple[np.ndarray, ConfigWorkflow]:
        output = tmp_path / str(threshold)
        workflow = bundle_workflow([CONFIGS / "inference.json"], "infer",
                                   ckpt_path=str(server.bundle / "models/model.pt"),
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
        answer = server.http.post(f"{server.url}/infer/allinsam", params={"image": TEST_CROP, "output": "image"},
                               data={"params": json.dumps(options)}, timeout=120)
        instances = _png(answer)
        assert instances.shape == mask.shape and instances.dtype == np.uint16
        assert np.array_equal(instances, instances_from_mask(mask))  # the bundle's mask, the metrics' instances
    assert 0.05 < (instances > 0).mean() < 0.15 and instances.max() >= 2

    result = server.http.post(f"{server.url}/infer/allinsam", params={"image": TEST_CROP, "output": "json"},
                           data={"params": json.dumps({"threshold": low})}, timeout=120).json()
    (element,) = result["annotation"]["elements"]
    assert element["label"] == "nucleus"
    assert element["contours"] == list(instance_contours(instances).values())
    assert element["instance_ids"] == list(range(1, instances.max() + 1))


def test_box_annotation_returns_the_sam_mask_of_each_box(server):
    boxes = _boxes(TEST_CROP)
    answer = server.http.post(f"{server.url}/infer/allinsam_box", params={"image": TEST_CROP, "output": "image"},
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

    result = server.http.post(f"{server.url}/infer/allinsam_box", params={"image": TEST_CROP, "output": "json"},
                           data={"params": json.dumps({"boxes": boxes[:3]})}, timeout=120).json()
    assert result["report"]["boxes_total"] == 3
    assert result["annotation"]["elements"][0]["instance_ids"] == [1, 2, 3]
    # the tile's window embedding was kept from the first request: new boxes on it skip the encoder
    assert result["report"]["windows_reused"] == 1 and result["report"]["windows_encoded"] == 0


@pytest.fixture
def app_infers(server, monkeypatch):
    """The app's ``lib.infers`` imported in this process. It imports the bundle copy's ``scripts`` package in place of
    the repository's; the ``scripts`` and ``lib`` modules are put back afterwards, for the tests that follow."""
    def ours(name: str) -> bool:
        return name.split(".")[0] in ("scripts", "lib")

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    monkeypatch.syspath_prepend(str(server.root / "app"))
    from lib import infers

    yield infers
    for name in [name for name in sys.modules if ours(name)]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.mark.parametrize("precision, runtime", [("float32", "onnxruntime"), ("int8", "onnxruntime"),
                                                ("bfloat16", "openvino")])
def test_every_numerics_option_runs_through_the_app(server, app_infers, precision, runtime):
    """App conf ``inference_precision`` and ``encoder_precision`` / ``decoder_precision`` build the bundle's networks
    on the runtime that runs those numerics, and both segment the real test crop."""
    segmentation = app_infers.AllInSamSegmentation(str(server.bundle), {"inference_precision": precision})
    network = segmentation.bundle_config.get_parsed_content("network").eval()
    image = read_rgb_image(SAMPLE_CROPS / "images" / f"{TEST_CROP}.png")
    with torch.no_grad():
        logits = network(torch.as_tensor(image[:256, :256]).permute(2, 0, 1)[None].float() / 255)
    assert logits.shape == (1, 1, 256, 256) and torch.isfinite(logits).all()
    assert (network.inference_runtime, network._exported.precision) == (runtime, precision)
    boxes = _boxes(TEST_CROP)
    annotation = app_infers.AllInSamBoxAnnotation(str(server.bundle), {"encoder_precision": precision,
                                                                       "decoder_precision": precision})
    instances, report = annotation.segmenter(image, np.asarray(boxes, dtype=np.float64))
    assert annotation.segmenter.encoder.precision == annotation.segmenter.decoder.precision == precision
    assert report["prompts_used"] == len(boxes) and len(np.unique(instances[instances > 0])) >= 0.9 * len(boxes)


@pytest.mark.parametrize("image, params, status", [
    ("no_such_tile", {"boxes": [[0, 0, 10, 10]]}, 404),
    (TEST_CROP, {"boxes": [[10, 10, 5]]}, 422),
    (TEST_CROP, {"boxes": [[10, 10, 5, 5]]}, 422),
    (TEST_CROP, {"boxes": "a box"}, 422),
    (TEST_CROP, {}, 422),
])
def test_a_bad_request_gets_4xx_and_the_server_keeps_serving(server, image, params, status):
    answer = server.http.post(f"{server.url}/infer/allinsam_box", params={"image": image},
                           data={"params": json.dumps(params)}, timeout=60)
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"]  # says what is wrong
    again = server.http.post(f"{server.url}/infer/allinsam_box", params={"image": TEST_CROP, "output": "image"},
                          data={"params": json.dumps({"boxes": _boxes(TEST_CROP)[:2]})}, timeout=120)
    assert _png(again).max() == 2


def test_labels_saved_through_the_server_train_the_bundle(server):
    for name in TRAINING_CROPS:  # the annotator's flow: boxes -> SAM masks -> saved as final labels
        answer = server.http.post(f"{server.url}/infer/allinsam_box", params={"image": name, "output": "image"},
                               data={"params": json.dumps({"boxes": _boxes(name)})}, timeout=120)
        saved = server.http.put(f"{server.url}/datastore/label", params={"image": name, "tag": "final"},
                             files={"label": (f"{name}.png", answer.content, "image/png")}, timeout=60)
        assert saved.status_code == 200, saved.text
        assert np.array_equal(np.asarray(Image.open(server.studies / "labels" / "final" / f"{name}.png")),
                              _png(answer))
    model = server.bundle / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    trained = server.http.post(f"{server.url}/train/allinsam", params={"run_sync": "true"}, json={"max_epochs": 1},
                            timeout=600)
    assert trained.status_code == 200, trained.text
    assert (server.bundle / "models" / "last_checkpoint_epoch=1.pt").is_file()
    assert model.stat().st_mtime_ns > before  # validation every epoch: the best model is written
    log = server.log.read_text()
    assert "Total Records for Training: 2" in log and "train_loss" in log
    after = server.http.post(f"{server.url}/infer/allinsam", params={"image": TEST_CROP, "output": "image"},
                             timeout=120)
    assert _png(after).shape == (256, 256)  # the server serves the retrained model


def _files_outside(root: Path, studies: Path) -> set[Path]:
    return {path for path in root.rglob("*") if studies not in path.parents and path != studies}


def test_every_request_needs_the_token(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        answer = requests.get(f"{server.url}/info/", headers=headers, timeout=10)
        assert answer.status_code == 401, answer.text
        answer = requests.post(f"{server.url}/infer/allinsam_box", params={"image": TEST_CROP}, headers=headers,
                               data={"params": json.dumps({"boxes": [[0, 0, 10, 10]]})}, timeout=10)
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("image", [str(SAMPLE_CROPS / "images" / f"{TEST_CROP}.png"),  # exists, outside the studies
                                   f"../images/{TEST_CROP}", "/no/such/file.png", "no_such_tile"])
def test_only_tiles_of_the_studies_folder_are_read(server, image):
    answer = server.http.post(f"{server.url}/infer/allinsam_box", params={"image": image, "output": "image"},
                              data={"params": json.dumps({"boxes": [[0, 0, 10, 10]]})}, timeout=60)
    assert answer.status_code == 404  # the same answer whether the path exists elsewhere or not
    assert answer.json()["detail"] == f"image {image!r} is not a tile of the studies folder"


def test_datastore_writes_stay_inside_the_studies_folder(server):
    before = _files_outside(server.root, server.studies)
    tile = (SAMPLE_CROPS / "images" / f"{TEST_CROP}.png").read_bytes()
    escaped = server.http.put(f"{server.url}/datastore/image", params={"image": "../escaped"},
                              files={"file": ("escaped.png", tile, "image/png")}, timeout=60)
    assert escaped.status_code == 422 and "plain name" in escaped.json()["detail"]
    label = (SAMPLE_CROPS / "instances" / f"{TEST_CROP}.png").read_bytes()
    for tag in ("../../../escaped", "..", "a/b"):
        answer = server.http.put(f"{server.url}/datastore/label", params={"image": TEST_CROP, "tag": tag},
                                 files={"label": (f"{TEST_CROP}.png", label, "image/png")}, timeout=60)
        assert answer.status_code == 422 and "label tag" in answer.json()["detail"], answer.text
    assert _files_outside(server.root, server.studies) == before
    assert not list(server.studies.parent.rglob("escaped*"))


def test_unreadable_uploads_are_refused(server):
    listed = set(server.http.get(f"{server.url}/datastore/?output=all", timeout=10).json()["objects"])
    for content, name in ((b"", "empty.png"), (b"not an image", "text.png"), (b"\x89PNG", "tile.exe")):
        answer = server.http.put(f"{server.url}/datastore/image", params={"image": "uploaded"},
                                 files={"file": (name, content, "image/png")}, timeout=60)
        assert answer.status_code == 422, answer.text
    assert set(server.http.get(f"{server.url}/datastore/?output=all", timeout=10).json()["objects"]) == listed
    assert not list(server.studies.glob("uploaded*"))

    label = read_instance_map(SAMPLE_CROPS / "instances" / f"{TEST_CROP}.png")
    for content in (b"", _png_bytes(label[:100]), _png_bytes(np.stack([label] * 3, -1).astype(np.uint8))):
        answer = server.http.put(f"{server.url}/datastore/label", params={"image": TEST_CROP, "tag": "final"},
                                 files={"label": (f"{TEST_CROP}.png", content, "image/png")}, timeout=60)
        assert answer.status_code == 422, answer.text
        assert not (server.studies / "labels" / "final" / f"{TEST_CROP}.png").exists()

    good = server.http.put(f"{server.url}/datastore/image", params={"image": "uploaded"},
                           files={"file": ("uploaded.png", (SAMPLE_CROPS / "images" / f"{TEST_CROP}.png").read_bytes(),
                                           "image/png")}, timeout=60)
    assert good.status_code == 200, good.text
    answer = server.http.post(f"{server.url}/infer/allinsam_box", params={"image": "uploaded", "output": "image"},
                              data={"params": json.dumps({"boxes": _boxes(TEST_CROP)[:2]})}, timeout=120)
    assert _png(answer).max() == 2


def test_malformed_params_json_is_refused(server):
    for url, files, params in ((f"{server.url}/infer/allinsam_box", None, {"image": TEST_CROP}),
                               (f"{server.url}/datastore/label", {"label": (f"{TEST_CROP}.png", b"", "image/png")},
                                {"image": TEST_CROP, "tag": "final"})):
        method = server.http.post if "infer" in url else server.http.put
        answer = method(url, params=params, data={"params": "{'boxes': [[0, 0, 10, 10]"}, files=files, timeout=60)
        assert answer.status_code == 422 and "not valid JSON" in answer.json()["detail"], answer.text


def test_a_burst_is_served_or_refused_cleanly(server):
    """Eight requests at once with a queue of one: each answer is the right instance map or a 503 saying why."""
    def ask(_):
        return server.http.post(f"{server.url}/infer/allinsam_box", params={"image": TEST_CROP, "output": "image"},
                                data={"params": json.dumps({"boxes": _boxes(TEST_CROP)[:2]})}, timeout=180)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    served = [answer for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code == 503]
    assert len(served) + len(refused) == 8 and served and refused
    first = _png(served[0])
    assert all(np.array_equal(_png(answer), first) for answer in served) and first.max() == 2
    assert all("busy" in answer.json()["detail"] and answer.headers["Retry-After"] for answer in refused)
    assert _png(ask(0)).max() == 2  # still serving


@pytest.mark.parametrize("host, token, needs_token", [("127.0.0.1", None, False), ("localhost", None, False),
                                                      ("::1", None, False), ("0.0.0.0", None, True),
                                                      ("lab-server.local", None, True), ("127.0.0.1", "given", True)])
def test_beyond_loopback_the_server_needs_a_token(monkeypatch, host, token, needs_token):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from serve_label import TOKEN_VARIABLE, server_command
    finally:
        sys.path.remove(str(REPO / "scripts"))
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    command, environment = server_command(str(SAMPLE_CROPS), str(REPO / "bundles" / "allinsam"),
                                          str(REPO / "apps" / "allinsam"), host, 8000, token, 4, 120.0, {})
    assert command[command.index("--host") + 1] == host
    assert command[command.index("--uvicorn_app") + 1] == "guarded_server:app"
    assert (TOKEN_VARIABLE in environment) == needs_token
    if token:
        assert environment[TOKEN_VARIABLE] == token
    elif needs_token:
        assert len(environment[TOKEN_VARIABLE]) >= 32  # a fresh random token
