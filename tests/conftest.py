"""Shared fixtures. Tests that need the real MoNuSeg folder skip cleanly when it is absent."""

import json
import os
import shutil
import sys
from pathlib import Path

# under pytest-xdist (pytest.ini) the workers share the cores: torch threads per worker (and its subprocesses) =
# cores / workers, set before torch is imported
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402
from monai.bundle import ConfigWorkflow  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "allinsam"
CONFIGS = BUNDLE / "configs"
SAMPLE_CROPS = BUNDLE / "sample_data" / "monuseg_crops"
MONUSEG = Path(os.environ.get("MONUSEG_DIR", REPO.parent / "shared" / "data" / "monuseg"))

# the bundle's ``scripts`` package and the repository's command lines (scripts/ is no package: no name clash)
sys.path.insert(0, str(BUNDLE))
sys.path.insert(0, str(REPO / "scripts"))


# the test files that take longest, longest first: seconds on one of two pytest-xdist workers, measured without MoNuSeg
# on a 2-core Intel Xeon (the files not named here take under 40 s each)
LONGEST_FILES = {"test_nnunet_baseline.py": 172, "test_onnx_runtime.py": 142, "test_monailabel_app.py": 140,
                 "test_feature_cache.py": 137, "test_box_annotation.py": 134, "test_package_bundle.py": 126,
                 "test_training_faults.py": 118, "test_clean_bundle.py": 81, "test_wsi_cohort.py": 63,
                 "test_mocl.py": 55, "test_allinsam_net.py": 50, "test_wsi_inference.py": 41}


def pytest_collection_modifyitems(items):
    """The longest files first, then the rest in collection order; each file's tests kept together and in order (a
    stable sort, the same in every pytest-xdist worker). With ``--dist loadfile --no-loadscope-reorder`` (pytest.ini)
    a worker takes the next file in this order when it is nearly done with its own, so the long files start early
    and the short ones fill the end instead of one worker idling while the other finishes a long file."""
    items.sort(key=lambda item: -LONGEST_FILES.get(item.path.name, 0))


@pytest.fixture(scope="session")
def monuseg_dir() -> Path:
    if not (MONUSEG / "split_lvit.json").is_file():
        pytest.skip(f"real MoNuSeg not found at {MONUSEG} (set MONUSEG_DIR)")
    return MONUSEG


@pytest.fixture(scope="session")
def prepared_monuseg(monuseg_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The whole MoNuSeg set prepared once: (output folder, report)."""
    from prepare_monuseg import prepare

    output = tmp_path_factory.mktemp("monuseg_prepared")
    return output, prepare(source_dir=str(monuseg_dir), output_dir=str(output))


@pytest.fixture(scope="session")
def sample_datalist() -> dict:
    return json.loads((SAMPLE_CROPS / "datalist.json").read_text())


@pytest.fixture(scope="session")
def crops(sample_datalist):
    """The two real training crops as a (2, 3, 256, 256) float batch in [0, 1]."""
    import numpy as np
    import torch

    from scripts.data import read_rgb_image

    images = [read_rgb_image(SAMPLE_CROPS / entry["image"]) for entry in sample_datalist["training"]]
    return torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def copy_bundle(destination: Path, weights: Path | None = None) -> Path:
    """A copy of the allinsam bundle at ``destination / "allinsam"`` without run outputs or checkpoints; with
    ``weights`` copied in as ``models/model.pt``."""
    bundle = Path(shutil.copytree(BUNDLE, destination / "allinsam",
                                  ignore=shutil.ignore_patterns("runs", "eval", "__pycache__", "*.pt")))
    if weights is not None:
        shutil.copy(weights, bundle / "models" / "model.pt")
    return bundle


def bundle_workflow(files, workflow_type: str | None = None, **overrides) -> ConfigWorkflow:
    """An initialised ConfigWorkflow of the allinsam bundle's config ``files`` (merged left to right)."""
    workflow = ConfigWorkflow(config_file=[str(path) for path in files], workflow_type=workflow_type,
                              logging_file=str(CONFIGS / "logging.conf"), **overrides)
    workflow.initialize()
    return workflow


# what ``trained_allinsam`` trains with and a run resuming its checkpoint must repeat (the optimizer state's groups)
TRAINED_ALLINSAM_OPTIONS = {"views": 2, "batch_size": 4, "foreground_prior": None}


@pytest.fixture(scope="session")
def trained_allinsam(tmp_path_factory) -> tuple[dict, Path]:
    """Two short epochs of the real training config on the sample crops (validation every epoch), once per test
    session, whichever pytest-xdist worker asks first (a file lock; the others wait and read): (the run's record,
    checkpoint folder with ``model.pt`` and ``last_checkpoint_epoch=2.pt``). The record holds the trainer's epoch,
    iteration and last loss and the validator's metric names. One cached view per crop. No warm-up and a 10x
    learning rate, so that two steps move the network off its all-background start (probabilities 0.65-0.85 on the
    test crops, a spatially varying map for the tests that compare outputs). Without the default output bias: with
    it, two such steps saturate every pixel near 1 (0.9995-1.0 measured)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    root = (shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared) / "trained_allinsam"
    record_file = root / "run.json"
    with FileLock(f"{root}.lock"):
        if not record_file.is_file():
            workflow = bundle_workflow([CONFIGS / "train.json"], "train", epochs=2, val_interval=1, warmup_steps=0,
                                       learning_rate=0.002, ckpt_dir=str(root / "models"),
                                       output_dir=str(root / "runs"), **TRAINED_ALLINSAM_OPTIONS)
            assert workflow.check_properties() in (None, [])
            workflow.run()
            trainer = workflow.parser.get_parsed_content("train#trainer")
            validator = workflow.parser.get_parsed_content("validate#evaluator")
            record = {"epoch": trainer.state.epoch, "iteration": trainer.state.iteration,
                      "loss": float(trainer.state.output[0]["loss"]), "val_metrics": sorted(validator.state.metrics)}
            record_file.write_text(json.dumps(record))
    return json.loads(record_file.read_text()), root / "models"
