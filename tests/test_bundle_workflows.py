"""The bundle's train / evaluate / inference configs run through MONAI's ConfigWorkflow on the real sample crops with
the embedded LiteMedSAM weights; a killed run resumes; the MoNuSeg dataset config swaps in by merging one file."""

import csv
import json
import re

import numpy as np
import pytest
import torch
from conftest import BUNDLE, SAMPLE_CROPS, TRAINED_ALLINSAM_OPTIONS, bundle_workflow
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import Compose
from PIL import Image

from scripts.data import read_rgb_image
from scripts.metrics import METRIC_NAMES
from scripts.training import AugmentedViewd

CONFIGS = BUNDLE / "configs"
TRAIN, INFER, EVALUATE, MONUSEG = (CONFIGS / name for name in ("train.json", "inference.json", "evaluate.json",
                                                                   "datasets/monuseg.json"))


def test_training_writes_best_and_last_checkpoints(trained_allinsam):
    run, models = trained_allinsam
    assert run["epoch"] == 2 and run["iteration"] == 2  # 2 views of 2 crops, batch 4
    assert np.isfinite(run["loss"])
    assert (models / "model.pt").is_file() and (models / "last_checkpoint_epoch=2.pt").is_file()
    assert not list(models.glob("*.tmp"))  # written atomically
    best = torch.load(models / "model.pt", weights_only=True)
    assert "sam.image_encoder.layers.3.blocks.0.attn.qkv.weight" in best  # a flat state dict of AllInSamNet
    assert not any("generators" in name for name in best)  # the default recipe trains the tail, no adapter
    assert run["val_metrics"] == ["val_dice", "val_loss"]
    last = torch.load(models / "last_checkpoint_epoch=2.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 2


def test_killed_run_resumes_from_its_last_checkpoint(trained_allinsam, tmp_path):
    _, models = trained_allinsam
    resumed_models = tmp_path / "models"
    resumed_models.mkdir()
    (resumed_models / "last_checkpoint_epoch=2.pt").write_bytes((models / "last_checkpoint_epoch=2.pt").read_bytes())
    workflow = bundle_workflow([TRAIN], "train", epochs=3, val_interval=5, ckpt_dir=str(resumed_models),
                               output_dir=str(tmp_path / "runs"), **TRAINED_ALLINSAM_OPTIONS)
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 3 and trainer.state.iteration == 3  # one more epoch, not three
    assert (resumed_models / "last_checkpoint_epoch=3.pt").is_file()


def test_evaluate_writes_every_metric_per_image_and_mean(trained_allinsam, tmp_path, sample_datalist):
    _, models = trained_allinsam
    workflow = bundle_workflow([INFER, EVALUATE], ckpt_path=str(models / "model.pt"), output_dir=str(tmp_path))
    workflow.run()
    with open(tmp_path / "metrics.csv") as handle:
        means = {name: float(value) for name, value in csv.reader(handle)}
    assert set(means) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        with open(tmp_path / f"{name}_raw.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == len(sample_datalist["test"])
        values = [float(row["class0"]) for row in rows]
        low = -1 if name == "adj" else 0  # the adjusted Rand index is negative for a worse-than-chance labelling
        assert all(low <= value <= 1 for value in values if not np.isnan(value)), name
        assert means[name] == pytest.approx(np.nanmean(values), abs=1e-4)


def test_inference_writes_probability_and_mask_named_after_the_input(trained_allinsam, tmp_path, sample_datalist):
    _, models = trained_allinsam
    images = sorted(str(SAMPLE_CROPS / entry["image"]) for entry in sample_datalist["test"])
    workflow = bundle_workflow([INFER], "infer", ckpt_path=str(models / "model.pt"), output_dir=str(tmp_path),
                         input_glob=str(SAMPLE_CROPS / "images" / "TCGA-[2A][ZC]-*.png"))  # the two test crops
    assert workflow.check_properties() in (None, [])
    workflow.run()
    assert len(list(tmp_path.glob("*.png"))) == 2 * len(images)
    network = workflow.parser.get_parsed_content("network").eval()
    for path in images:
        name = path.rsplit("/", 1)[1].removesuffix(".png")
        probability = np.asarray(Image.open(tmp_path / f"{name}_prob.png")) / 255
        mask = np.asarray(Image.open(tmp_path / f"{name}_mask.png"))
        image = torch.as_tensor(read_rgb_image(path)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            expected = torch.sigmoid(network(image))[0, 0].numpy()  # one 256 window: the sliding window is exact
        assert probability.shape == expected.shape == mask.shape
        assert np.abs(probability - expected).max() <= 1 / 255 + 1e-6  # same orientation, PNG rounding only
        assert set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(mask == 1, expected >= 0.5)


@pytest.mark.slow
def test_monuseg_dataset_config_swaps_in_by_merging(prepared_monuseg):
    output, _ = prepared_monuseg
    for labels, suffix in (("complete", "datalist_0.5pct_seed0.json"), ("weak", "datalist_0.5pct_seed0_weak.json")):
        workflow = ConfigWorkflow(config_file=[str(TRAIN), str(MONUSEG)], workflow_type="train",
                                  dataset_dir=str(output), labels=labels)
        assert workflow.parser.get_parsed_content("datalist") == str(output / suffix)
    workflow = ConfigWorkflow(config_file=[str(TRAIN), str(MONUSEG)], workflow_type="train", dataset_dir=str(output))
    data = workflow.parser.get_parsed_content("train#dataset#data")
    patches = json.loads((output / "datalist_0.5pct_seed0.json").read_text())["patches"]
    assert len(data) == len(patches) == 3
    load = Compose(workflow.parser.get_parsed_content("load"))
    view = AugmentedViewd(workflow.parser.get_parsed_content("train#view_augmentation"))
    for k in range(4):
        sample = view(dict(load(data[0]), view=f"patch#{k}"))
        assert sample["image"].shape == (3, 256, 256) and sample["label"].shape == (1, 256, 256)
        black = (sample["image"] == 0).all(dim=0).float().mean().item()
        assert black == 0  # the 200x200 labelled patch, zoomed and reflect-padded: none of the black rest
        assert sample["label"].sum() > 0


def test_overlays_name_what_they_change_and_survive_a_new_handler():
    positional = [(path.name, key) for path in CONFIGS.rglob("*.json") for key in json.loads(path.read_text())
                  if re.search(r"#\d+(#|$)", key)]  # an override like "train#handlers#4#_disabled_"
    positional += re.findall(r"@[\w#]+\[-?\d*:", "".join(p.read_text() for p in CONFIGS.rglob("*.json")))  # @load[1:]
    assert positional == []  # no overlay or expression addresses a list element by its position

    # multi_gpu_train.json on a rank other than 0, over a train.json whose handlers a lab has edited: a handler
    # added in front, the rest reordered. The reporting handlers go, whatever their place; the others stay in order.
    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(CONFIGS / "multi_gpu_train.json")])
    parser["is_rank0"] = False
    parser["train#handlers"] = [{"_target_": "ignite.handlers.TerminateOnNan"},
                                {"_target_": "ignite.handlers.ProgressBar"},
                                {"_target_": "StatsHandler", "iteration_log": False},
                                {"_target_": "ignite.handlers.Timer"}]
    kept = parser.get_parsed_content("train#trainer#train_handlers")
    assert [type(h).__name__ for h in kept] == ["TerminateOnNan", "Timer"]
    parser["is_rank0"] = True
    parser.parse()
    kept = parser.get_parsed_content("train#trainer#train_handlers")
    assert [type(h).__name__ for h in kept] == ["TerminateOnNan", "ProgressBar", "StatsHandler", "Timer"]


def test_mirrored_inference_is_the_mean_of_the_mirrored_logits(trained_allinsam, tmp_path):
    """``--mirror_axes [0,1]``: each pixel's logit is the mean over the four mirrored copies of the crop (one 256
    window, so the sliding window adds nothing), written back in the crop's orientation."""
    _, models = trained_allinsam
    crop = sorted((SAMPLE_CROPS / "images").glob("*.png"))[0]
    workflow = bundle_workflow([INFER], "infer", ckpt_path=str(models / "model.pt"), output_dir=str(tmp_path),
                               input_glob=str(crop), mirror_axes=[0, 1], inference_runtime="torch",
                               inference_precision="float32")
    workflow.run()
    (output,) = workflow.parser.get_parsed_content("evaluator").state.output
    network = workflow.parser.get_parsed_content("network").eval()
    image = torch.as_tensor(read_rgb_image(crop)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        logits = [torch.flip(network(torch.flip(image, dims)), dims) for dims in ((), (2,), (3,), (2, 3))]
    expected = torch.sigmoid(torch.stack(logits).mean(0))[0]
    assert torch.allclose(torch.as_tensor(output["pred"]), expected, atol=1e-5)
    plain = torch.sigmoid(logits[0])[0]
    assert (expected - plain).abs().max() > 1e-3  # the network is not mirror-symmetric: the mean differs


def test_mirrored_inferer_refuses_axes_the_input_lacks():
    from monai.inferers import SimpleInferer

    from scripts.inference import MirroredInferer

    with pytest.raises(ValueError, match="distinct"):
        MirroredInferer(SimpleInferer(), spatial_axes=(0, 0))
    with pytest.raises(ValueError, match="2 spatial axes"):
        MirroredInferer(SimpleInferer(), spatial_axes=(2,))(torch.zeros(1, 3, 8, 8), torch.nn.Identity())
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(MirroredInferer(SimpleInferer(), (0, 1))(image, torch.nn.Identity()), image)
