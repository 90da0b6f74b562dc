"""MOCL (both variants) against a direct NumPy computation; the per-class Dice + BCE against MONAI; the lay-label
simulation and the two-class split on real MoNuSeg crops; the two-class train -> MOCL refinement -> evaluation
workflow with the embedded LiteMedSAM."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import BUNDLE, SAMPLE_CROPS
from monai.bundle import ConfigWorkflow
from monai.losses import DiceCELoss, DiceLoss
from PIL import Image

from scripts.data import SplitClassesd, read_instance_map
from scripts.losses import MOCLLoss, dice_bce, mocl_weights

CONFIGS = BUNDLE / "configs"


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _numpy_similarity(confidence, target, features, k):
    """S by a direct loop: top-k annotated pixels by confidence -> mean feature -> cosine with every pixel."""
    batch, classes, height, width = target.shape
    flat = features.reshape(batch, features.shape[1], -1)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    similarity = np.zeros_like(confidence)
    for b in range(batch):
        for c in range(classes):
            annotated = np.flatnonzero(target[b, c].ravel() > 0)
            if not annotated.size:
                continue
            top = annotated[np.argsort(-confidence[b, c].ravel()[annotated])][:k]
            prototype = flat[b][:, top].mean(axis=1)
            similarity[b, c] = (prototype / np.linalg.norm(prototype) @ unit[b]).reshape(height, width)
    return similarity


def _numpy_dice_bce(logits, target, weight, numerator_only=False):
    probability = _sigmoid(logits)
    intersection = (weight * probability * target).sum(axis=(2, 3))
    denominator = (probability + target).sum(axis=(2, 3)) if numerator_only else \
        (weight * probability).sum(axis=(2, 3)) + (weight * target).sum(axis=(2, 3))
    dice = 1 - (2 * intersection + 1e-5) / (denominator + 1e-5)
    bce = np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits)))
    return dice.mean() + (weight * bce).mean()


def _numpy_mocl(logits, target, features, k, variant):
    confidence = _sigmoid(logits)
    similarity = _numpy_similarity(confidence, target, features, k)
    if variant == "paper":
        weight = np.where(target > 0, np.exp(confidence) * np.maximum(similarity, 0), 1.0)
        return _numpy_dice_bce(logits, target, weight)
    normalised = (similarity - similarity.min()) / (similarity.max() - similarity.min())
    return (_numpy_dice_bce(logits, target, 1.5 ** (confidence * target), True)
            + _numpy_dice_bce(logits, target, normalised * target, True)) / 2


@pytest.fixture
def small_batch():
    """(logits (2, 2, 12, 12), annotation, features (2, 8, 12, 12)) in float64, random, one class unannotated."""
    generator = np.random.default_rng(7)
    logits = generator.normal(0, 2, (2, 2, 12, 12))
    target = (generator.random((2, 2, 12, 12)) < 0.4).astype(np.float64)
    target[1, 1] = 0  # no annotation of class 2 in image 2: S = 0 there, weights 1
    features = generator.normal(0, 1, (2, 8, 12, 12))
    return logits, target, features


@pytest.mark.parametrize("variant", ["paper", "authors"])
@pytest.mark.parametrize("k", [1, 5, 100])
def test_mocl_equals_a_direct_numpy_computation(small_batch, variant, k):
    logits, target, features = small_batch
    loss = MOCLLoss(variant, k)(torch.tensor(logits), torch.tensor(target), torch.tensor(features))
    assert float(loss) == pytest.approx(_numpy_mocl(logits, target, features, k, variant), rel=1e-9)


@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_mocl_gradients_are_finite(small_batch, variant):
    logits, target, features = (torch.tensor(array, requires_grad=array is not small_batch[1])
                                for array in small_batch)
    MOCLLoss(variant, 5)((logits, features), target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    if variant == "paper":  # weights detached: the features get no gradient from the loss
        assert features.grad is None
    else:  # weights not detached: the gradient flows through S (the prototype itself is detached)
        assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_mocl_weights_are_one_where_the_formulas_say(small_batch):
    logits, target, features = (torch.tensor(array) for array in small_batch)
    (paper,) = mocl_weights(logits, target, features, 5, "paper")
    confidence_weight, similarity_weight = mocl_weights(logits, target, features, 5, "authors")
    outside = target == 0
    assert torch.all(paper[outside] == 1) and torch.all(confidence_weight[outside] == 1)
    assert torch.all(similarity_weight[outside] == 0) and similarity_weight.max() <= 1
    assert torch.all(paper[~outside] <= np.e) and torch.all(paper[~outside] >= 0)
    # no annotation at all: the paper variant is the plain loss, the 'none' variant always is
    empty = torch.zeros_like(target)
    plain = dice_bce(logits, empty)
    assert float(MOCLLoss("paper")(logits, empty, features)) == pytest.approx(float(plain), rel=1e-12)
    assert float(MOCLLoss("none")(logits, target)) == pytest.approx(float(dice_bce(logits, target)), rel=1e-12)


def test_prototype_comes_from_the_most_confident_annotated_pixels():
    logits = torch.full((1, 1, 4, 4), -3.0)
    logits[0, 0, 0, :2] = 5.0  # two confident pixels, annotated
    logits[0, 0, 3, 3] = 9.0  # the most confident pixel, not annotated: must not enter the prototype
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, :2] = 1
    features = torch.zeros(1, 2, 4, 4)
    features[0, 0] = 1.0  # every pixel points along axis 0 ...
    features[0, :, 0, :2] = torch.tensor([0.0, 1.0])[:, None]  # ... except the two confident ones (axis 1)
    (weight,) = mocl_weights(logits, target, features, k=2, variant="paper")
    confident = torch.sigmoid(torch.tensor(5.0))
    assert torch.allclose(weight[0, 0, 0, :2], torch.exp(confident).expand(2))  # S = 1 there
    assert torch.all(weight[0, 0, 1] == 0)  # annotated but orthogonal to the prototype: S = 0
    assert weight[0, 0, 3, 3] == 1  # outside the annotation


def test_dice_bce_matches_monai_for_one_class_and_per_class_bce_for_several():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=generator)
    target = (torch.rand(3, 1, 16, 16, generator=generator) > 0.5).float()
    for jaccard in (False, True):
        expected = DiceCELoss(sigmoid=True, jaccard=jaccard)(logits, target)
        assert float(dice_bce(logits, target, jaccard=jaccard)) == pytest.approx(float(expected), rel=1e-6)
    logits, target = logits.reshape(1, 3, 16, 16), target.reshape(1, 3, 16, 16)
    expected = DiceLoss(sigmoid=True)(logits, target) + torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target)
    assert float(dice_bce(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        dice_bce(logits, target[:, :1])


def test_mocl_loss_refuses_unknown_variant_and_missing_features(small_batch):
    logits, target, _ = (torch.tensor(array) for array in small_batch)
    with pytest.raises(ValueError, match="variant"):
        MOCLLoss("exp")
    with pytest.raises(ValueError, match="return_features"):
        MOCLLoss("paper")(logits, target)


def test_lay_annotation_noise_rates_on_a_real_crop():
    from simulate_lay_labels import LayNoise, lay_annotation, size_classes

    instances = read_instance_map(SAMPLE_CROPS / "instances" / "TCGA-21-5784-01Z-00-DX1_y372_x372.png")
    count = len(np.unique(instances)) - 1
    classes = size_classes(instances, threshold=float(np.median(np.bincount(instances.ravel())[1:])))
    assert set(np.unique(classes[1:])) == {1, 2}
    clean = lay_annotation(instances, classes, np.random.default_rng(0), LayNoise(0, 0, 2, 0, 0))
    assert np.array_equal(clean[0] > 0, instances > 0) and np.array_equal(clean[1], classes[instances])
    noisy, noisy_classes = lay_annotation(instances, classes, np.random.default_rng(0), LayNoise(0.5, 0.5, 2, 0.5, 0.2))
    again = lay_annotation(instances, classes, np.random.default_rng(0), LayNoise(0.5, 0.5, 2, 0.5, 0.2))
    assert np.array_equal(noisy, again[0]) and np.array_equal(noisy_classes, again[1])  # seeded
    kept = {int(i) for i in np.unique(instances[noisy > 0])} - {0}
    assert 0.25 * count < len(kept) < 0.75 * count  # about half missed
    assert np.array_equal(noisy > 0, noisy_classes > 0)
    false = [i for i in np.unique(noisy)[1:] if not (instances[noisy == i] > 0).any()]
    assert len(false) >= 1  # false nuclei lie on background
    flipped = [i for i in np.unique(noisy)[1:] if i not in false
               and np.bincount(classes[instances[noisy == i]]).argmax() != noisy_classes[noisy == i][0]]
    assert 0.2 * len(kept) < len(flipped) < 0.8 * len(kept)  # about half flipped
    with pytest.raises(ValueError, match="flip_rate must be in"):
        LayNoise(flip_rate=1.5)


def test_split_classes_gives_one_map_per_class():
    instances = torch.tensor([[[0, 1, 1], [2, 2, 0], [3, 0, 0]]])
    classes = torch.tensor([[[0, 1, 1], [2, 2, 0], [1, 0, 0]]])
    out = SplitClassesd("label", num_classes=2)({"label": instances, "classes": classes})
    assert set(out) == {"label"}
    assert out["label"].tolist() == [[[0, 1, 1], [0, 0, 0], [3, 0, 0]], [[0, 0, 0], [2, 2, 0], [0, 0, 0]]]
    with pytest.raises(ValueError, match="class 3 in the class map"):
        SplitClassesd("label", num_classes=2)({"label": instances, "classes": classes + 1})
    assert SplitClassesd("label")({"image": instances}) == {"image": instances}  # inference: no label


@pytest.fixture(scope="module")
def two_class_crops(tmp_path_factory):
    """The sample crops as a prepared dataset, with the two-class task and lay labels (seed 0) simulated."""
    from simulate_lay_labels import simulate

    root = tmp_path_factory.mktemp("two_class")
    datalist = json.loads((SAMPLE_CROPS / "datalist.json").read_text())
    absolute = {split: [{key: str(SAMPLE_CROPS / value) for key, value in entry.items()} for entry in entries]
                for split, entries in datalist.items()}
    (root / "datalist_all.json").write_text(json.dumps(absolute))
    simulate(dataset_dir=str(root), seeds=0, miss_rate=0.3, flip_rate=0.3)
    return root


def test_simulation_writes_clean_and_lay_datalists(two_class_crops):
    two_class = two_class_crops / "two_class"
    lay = json.loads((two_class / "datalist_lay_seed0.json").read_text())
    clean = json.loads((two_class / "datalist_clean.json").read_text())
    assert lay["classes"] == ["small", "large"] and lay["test"] == clean["test"]
    for entry_lay, entry_clean in zip(lay["training"], clean["training"]):
        assert entry_lay["image"] == entry_clean["image"]
        noisy = read_instance_map(two_class / entry_lay["instances"])
        truth = read_instance_map(two_class / entry_clean["instances"])
        found = set(np.unique(truth[noisy > 0])) - {0}
        assert 0 < len(found) < len(np.unique(truth)) - 1  # some nuclei were missed
    report = json.loads((two_class / "simulation.json").read_text())
    assert report["miss_rate"] == 0.3 and report["median_training_area_px"] > 20


@pytest.mark.slow
def test_two_class_training_mocl_refinement_and_per_class_evaluation(two_class_crops, tmp_path):
    dataset = [str(CONFIGS / "datasets" / "monuseg_two_class.json")]
    common = dict(dataset_dir=str(two_class_crops), logging_file=str(CONFIGS / "logging.conf"))
    plain = ConfigWorkflow(config_file=[str(CONFIGS / "train.json")] + dataset, workflow_type="train", epochs=1,
                           views=4, val_interval=1, ckpt_dir=str(tmp_path / "plain"), output_dir=str(tmp_path / "tb"),
                           **common)
    plain.initialize()
    assert plain.parser.get_parsed_content("network").out_channels == 2
    plain.run()
    mocl = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "mocl_train.json")] + dataset,
                          workflow_type="train", epochs=2, views=4, val_interval=2, start_ckpt=str(tmp_path / "plain" /
                                                                                          "model.pt"),
                          ckpt_dir=str(tmp_path / "mocl"), output_dir=str(tmp_path / "tb"), **common)
    mocl.initialize()
    network = mocl.parser.get_parsed_content("network")
    start = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    mocl.run()
    trainer = mocl.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and np.isfinite(float(trainer.state.output[0]["loss"]))
    assert isinstance(mocl.parser.get_parsed_content("loss"), MOCLLoss)
    changed = [name for name, value in network.state_dict().items() if not torch.equal(value.cpu(), start[name])]
    assert changed and all("image_encoder.blocks" not in name for name in changed)  # fine-tuned, encoder frozen
    evaluate = ConfigWorkflow(config_file=[str(CONFIGS / name) for name in ("inference.json", "evaluate.json")]
                              + dataset, ckpt_path=str(tmp_path / "mocl" / "last_checkpoint_epoch=2.pt"),
                              output_dir=str(tmp_path / "eval"), **common)
    evaluate.initialize()
    evaluate.run()
    test_names = [entry["image"].rsplit("/", 1)[1][:-4]
                  for entry in json.loads((two_class_crops / "two_class" / "datalist_clean.json").read_text())["test"]]
    for name in test_names:
        for class_name in ("small", "large"):
            mask = np.asarray(Image.open(tmp_path / "eval" / f"{name}_{class_name}_mask.png"))
            assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1}
    with open(tmp_path / "eval" / "detection_f1_raw.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(test_names) and {"class0", "class1"} <= set(rows[0])


def test_network_exposes_the_decoder_features_for_mocl():
    from scripts.networks import AllInSamNet

    network = AllInSamNet(out_channels=2).eval()
    image = torch.as_tensor(np.asarray(Image.open(SAMPLE_CROPS / "images" / "TCGA-2Z-A9J9-01A-01-TS1_y300_x300.png"))
                            ).permute(2, 0, 1)[None, :, :256, :256].float() / 255
    with torch.no_grad():
        logits = network(image)
        pair = network(image, return_features=True)
    assert logits.shape == (1, 2, 256, 256) and torch.equal(pair[0], logits)
    assert pair[1].shape == (1, 32, 256, 256) and pair[1].std() > 0


def test_experiment_table_pairs_images_per_class(tmp_path):
    """``mocl_experiment.table`` on MetricsSaver-style CSVs: means over seeds per class, Wilcoxon as scipy's."""
    from mocl_experiment import ARMS, TABLE_METRICS, table
    from scipy.stats import wilcoxon

    generator = np.random.default_rng(0)
    images = [f"case{i}" for i in range(8)]
    truth = {}
    for arm in ARMS:
        seeds = ["before"] if arm == "before" else ["seed0", "seed1"]
        for seed in seeds:
            folder = tmp_path / ("" if arm == "before" else seed) / arm / "test"
            folder.mkdir(parents=True)
            values = generator.random((len(images), 2)) + (0.3 if arm == "mocl" else 0)
            truth[arm, seed] = values
            for metric in TABLE_METRICS:
                rows = [f"/data/{name}.png,{v[0]:.4f},{v[1]:.4f},{v.mean():.4f}" for name, v in zip(images, values)]
                (folder / f"{metric}_raw.csv").write_text("filename,class0,class1,mean\n" + "\n".join(rows) + "\n")
    markdown = table(runs_dir=str(tmp_path), output=str(tmp_path / "out" / "mocl"))
    text = (tmp_path / "out" / "mocl.md").read_text()
    mocl_small = [line for line in text.splitlines() if line.startswith("| small | mocl |")][0].split(" | ")
    mocl, plain = ((np.round(truth[arm, "seed0"], 4) + np.round(truth[arm, "seed1"], 4)) / 2
                   for arm in ("mocl", "plain"))
    assert float(mocl_small[-4]) == pytest.approx(wilcoxon(mocl[:, 0], plain[:, 0]).pvalue, rel=1e-3)
    means = [np.round(truth["mocl", s], 4)[:, 0].mean() for s in ("seed0", "seed1")]
    assert mocl_small[2] == f"{np.mean(means):.4f} ± {np.std(means, ddof=1):.4f}"
    assert markdown.endswith("mocl.md") and (tmp_path / "out" / "mocl.png").is_file()
