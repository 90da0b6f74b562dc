"""Bundle zips as the model zoo makes them, loaded back with MONAI's ``download`` (what ``python -m monai.bundle
download`` runs): the unpacked bundle infers like the source tree (in fresh interpreters, so that it imports the zip's
own code), weights checked by SHA-256, byte-identical rebuilds, unsafe zips and bad bundles refused."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLE, REPO, SAMPLE_CROPS, copy_bundle
from monai.apps.utils import HashCheckError
from monai.bundle import download
from monai.bundle.scripts import download_large_files
from package_bundle import PackagingError, bundle_members, check_files, check_weights, package, write_zip
from PIL import Image

pytestmark = pytest.mark.slow  # packaging runs the model-zoo checks in subprocesses

NNUNET = REPO / "bundles" / "nnunet_baseline"
CROP = SAMPLE_CROPS / "images" / "TCGA-2Z-A9J9-01A-01-TS1_y300_x300.png"


def _monai_bundle(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", *arguments], cwd=cwd, capture_output=True, text=True)


def _bundle_copy(root: Path, weights: Path | None = None) -> Path:
    """A copy of the allinsam bundle under ``root`` with a training run's leftovers, and ``weights`` as model.pt."""
    bundle = copy_bundle(root, weights)
    (bundle / "runs" / "train").mkdir(parents=True)
    (bundle / "runs" / "train" / "events.out").write_text("tensorboard")
    (bundle / "scripts" / "__pycache__").mkdir()
    (bundle / "scripts" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    if weights is not None:
        shutil.copy(weights, bundle / "models" / "last_checkpoint_epoch=2.pt")
    return bundle


@pytest.fixture(scope="module")
def packaged(trained_allinsam, tmp_path_factory):
    """The allinsam bundle (two-epoch weights) packaged with every check: (source copy, zip path)."""
    root = tmp_path_factory.mktemp("package")
    bundle = _bundle_copy(root, trained_allinsam[1] / "model.pt")
    (zip_path,) = package(str(bundle), output_dir=str(root / "dist"))
    return bundle, Path(zip_path)


def test_zip_layout_is_the_model_zoos(packaged):
    bundle, zip_path = packaged
    version = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    assert zip_path.name == f"allinsam_v{version}.zip"
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        large_files = archive.read("allinsam/large_files.yml").decode()
        infos = archive.infolist()
    assert all(name.startswith("allinsam/") for name in names)
    assert {"allinsam/LICENSE", "allinsam/configs/metadata.json", "allinsam/configs/inference.json",
            "allinsam/docs/README.md", "allinsam/models/model.pt", "allinsam/scripts/networks/allinsam_net.py",
            "allinsam/large_files.yml"} <= set(names)
    assert not [name for name in names if "/runs/" in name or "__pycache__" in name or "last_checkpoint" in name]
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    digest = hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
    assert f'hash_val: "{digest}"' in large_files and 'hash_type: "sha256"' in large_files


def test_two_builds_are_byte_identical(tmp_path):
    bundle = _bundle_copy(tmp_path)
    write_zip(bundle, tmp_path / "first.zip", {})
    for path in bundle.rglob("*"):  # new timestamps must not change the zip
        os.utime(path, (2_000_000_000, 2_000_000_000))
    write_zip(bundle, tmp_path / "second.zip", {})
    assert (tmp_path / "first.zip").read_bytes() == (tmp_path / "second.zip").read_bytes()
    assert "models/model.pt" not in bundle_members(bundle)  # no weights in this copy: none packaged


def test_downloaded_bundle_infers_like_the_source_tree(packaged, tmp_path):
    bundle, zip_path = packaged
    unpacked = tmp_path / "unpacked"
    download(name="allinsam", url=zip_path.as_uri(), bundle_dir=str(unpacked))
    assert (unpacked / "allinsam" / "models" / "model.pt").read_bytes() == (bundle / "models" / "model.pt").read_bytes()
    download_large_files(bundle_path=str(unpacked / "allinsam"))  # SHA-256 of the weights as in large_files.yml

    outputs = {}
    for name, config, extra in (("unpacked", unpacked / "allinsam" / "configs" / "inference.json", []),
                                ("source", BUNDLE / "configs" / "inference.json",
                                 ["--ckpt_path", str(bundle / "models" / "model.pt")])):
        outputs[name] = tmp_path / f"out_{name}"
        run = _monai_bundle("run", "--config_file", str(config), "--input_glob", str(CROP),
                            "--output_dir", str(outputs[name]), *extra, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
    produced = sorted(path.name for path in outputs["source"].iterdir())
    assert produced == [f"{CROP.stem}_mask.png", f"{CROP.stem}_prob.png"]
    probability = np.asarray(Image.open(outputs["source"] / f"{CROP.stem}_prob.png"))
    assert np.unique(probability).size > 10  # a map with structure, so that equal bytes mean the same weights
    for name in produced:
        assert (outputs["unpacked"] / name).read_bytes() == (outputs["source"] / name).read_bytes(), name


def test_tampered_weights_fail_the_sha256_check(packaged, tmp_path):
    _, zip_path = packaged
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path)
    with open(tmp_path / "allinsam" / "models" / "model.pt", "r+b") as weights:
        weights.seek(1000)
        weights.write(b"\x42")
    with pytest.raises(HashCheckError, match="check of existing file failed"):
        download_large_files(bundle_path=str(tmp_path / "allinsam"))


def test_a_zip_escaping_its_folder_is_refused(tmp_path):
    evil = tmp_path / "evil_v0.1.0.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("evil/configs/metadata.json", "{}")
        archive.writestr("evil/../../escaped.txt", "outside")
    target = tmp_path / "a" / "b"
    with pytest.raises(ValueError, match="Unsafe path"):
        download(name="evil", url=evil.as_uri(), bundle_dir=str(target))
    assert not list(tmp_path.rglob("escaped.txt"))


def test_nnunet_baseline_packages_without_a_network_check(tmp_path):
    (zip_path,) = package("nnunet_baseline", output_dir=str(tmp_path))
    version = json.loads((NNUNET / "configs" / "metadata.json").read_text())["version"]
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    assert Path(zip_path).name == f"nnunet_baseline_v{version}.zip"
    assert {"nnunet_baseline/LICENSE", "nnunet_baseline/configs/train.json", "nnunet_baseline/scripts/experiment.py",
            "nnunet_baseline/docs/README.md"} <= set(names)
    assert "nnunet_baseline/large_files.yml" not in names


def test_a_bundle_failing_a_check_is_not_packaged(tmp_path):
    bundle = _bundle_copy(tmp_path)
    metadata_file = bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    with pytest.raises(PackagingError, match="not in its changelog"):
        check_files(bundle, {**metadata, "version": "9.9.9"})
    (bundle / "LICENSE").unlink()
    with pytest.raises(PackagingError, match=f"{bundle / 'LICENSE'}: missing"):
        package(str(bundle), output_dir=str(tmp_path / "dist"))
    (bundle / "LICENSE").write_text("licence")
    del metadata["task"]
    metadata_file.write_text(json.dumps(metadata))
    with pytest.raises(PackagingError, match="'task' is a required property"):
        package(str(bundle), output_dir=str(tmp_path / "dist"))
    assert not (tmp_path / "dist").exists()


class _Payload:
    """Unpickling it would create ``path``: what a hostile ``model.pt`` does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_weights_that_are_not_this_network_are_refused(tmp_path, trained_allinsam):
    import torch

    from scripts.networks import AllInSamNet

    bundle = _bundle_copy(tmp_path / "bundle")
    weights = bundle / "models" / "model.pt"
    marker = tmp_path / "payload_ran"
    foreign = {
        "pickle payload": ({"model": _Payload(marker)}, "Python objects other than tensors"),
        "random bytes": (os.urandom(4096), "empty, corrupt or not a PyTorch checkpoint"),
        "another network": ({"weight": torch.zeros(3, 3)}, "another backbone or network"),
    }
    for name, (content, reason) in foreign.items():
        if isinstance(content, bytes):
            weights.write_bytes(content)
        else:
            torch.save(content, weights)
        with pytest.raises(PackagingError, match=reason) as refused:
            check_weights(bundle)  # what package() runs on the weights: the first two refused in this process
        assert str(weights) in str(refused.value), name
    with pytest.raises(PackagingError, match="another backbone or network"):
        package(str(bundle), output_dir=str(tmp_path / "dist"))
    assert not marker.exists() and not (tmp_path / "dist").exists()

    # weights of the paper's adapter recipe are this bundle's network: inference.json builds it from the checkpoint
    torch.save(AllInSamNet(trainable="adapter").state_dict(), weights)
    assert check_weights(bundle) == [("weights", "models/model.pt loads (weights_only, into network_def, strict) "
                                                 "+ large_files.yml (SHA-256)")]


def test_the_calibration_of_the_weights_travels_with_them(tmp_path, trained_allinsam):
    bundle = _bundle_copy(tmp_path / "bundle", trained_allinsam[1] / "model.pt")
    calibration = bundle / "models" / "model_calibration.json"
    digest = hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
    calibration.write_text(json.dumps({"threshold": 0.3, "instances": "watershed", "checkpoint_sha256": digest}))
    assert "models/model_calibration.json" in bundle_members(bundle)
    assert check_weights(bundle)[-1] == ("calibration", "models/model_calibration.json measured on these weights "
                                                        "(SHA-256)")
    calibration.write_text(json.dumps({"threshold": 0.3, "instances": "watershed", "checkpoint_sha256": "0" * 64}))
    with pytest.raises(PackagingError, match="model_calibration.json: measured on other weights"):
        check_weights(bundle)
    (bundle / "models" / "model.pt").unlink()
    assert "models/model_calibration.json" not in bundle_members(bundle)  # no weights, nothing it applies to

