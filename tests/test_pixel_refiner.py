"""The pixel refiner: a full-resolution correction of the prompt-free logits from the image. It starts as the identity,
gives the same logits from cached features plus the view's pixels as from the image, is found in a checkpoint by
inference without an option, and survives the ONNX Runtime export."""

import pytest
import torch
from conftest import CONFIGS, SAMPLE_CROPS, bundle_workflow
from monai.engines import PrepareBatchExtraInput, default_prepare_batch

from scripts.networks import AllInSamNet, FeatureHead, refiner_of_checkpoint
from scripts.training import feature_cache_dataset, trainer_batch


def _refined_network(seed: int = 0, **options) -> AllInSamNet:
    """LiteMedSAM tail recipe with a pixel refiner whose correction is not zero (as after some training)."""
    torch.manual_seed(seed)
    network = AllInSamNet(trainable="tail", tail_stages=2, pixel_refinement=True, **options)
    with torch.no_grad():
        network.pixel_refiner.correction.weight.normal_(0.0, 0.5)
    return network


def test_an_untrained_refiner_returns_the_decoders_logits(crops):
    torch.manual_seed(0)
    plain = AllInSamNet(trainable="tail", tail_stages=2).eval()
    refined = AllInSamNet(trainable="tail", tail_stages=2, pixel_refinement=True).eval()
    refined.load_state_dict({**plain.state_dict(), **{f"pixel_refiner.{k}": v for k, v in
                                                      refined.pixel_refiner.state_dict().items()}})
    with torch.no_grad():
        assert torch.equal(plain(crops), refined(crops))


def test_cached_features_with_the_views_pixels_give_the_image_paths_logits(crops):
    network = _refined_network().train()
    with torch.no_grad():
        whole = network(crops)
        features = network.frozen_features(crops)
        cached = FeatureHead(network)(features, crops)
        decoded = network.decode(network._embed_features(features))  # (2, 1, 256, 256): LiteMedSAM decodes at S
    torch.testing.assert_close(cached, whole)
    assert (cached - decoded).abs().mean() > 1e-3  # the refiner changed the decoder's logits
    with pytest.raises(ValueError, match="needs the image's pixels too"):
        FeatureHead(network)(features)


def test_cached_views_keep_their_pixels_only_for_a_refiner(tmp_path):
    workflow = bundle_workflow([CONFIGS / "train.json"], "train", views=2, pixel_refinement=True,
                               ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))
    parser = workflow.parser
    network = parser.get_parsed_content("network")
    assert isinstance(trainer_batch(network), PrepareBatchExtraInput)
    item = parser.get_parsed_content("train#dataset")[0]
    assert item["pixels"].shape == (3, 256, 256) and item["pixels"].dtype == torch.float16
    assert 0.0 <= float(item["pixels"].min()) and float(item["pixels"].max()) <= 1.0
    assert float(item["pixels"].float().std()) > 0.05  # a tissue view, not a blank

    plain = AllInSamNet(trainable="tail", tail_stages=2)
    assert trainer_batch(plain) is default_prepare_batch
    dataset = feature_cache_dataset(parser.get_parsed_content("train#dataset#data"), 2, plain,
                                    parser.get_parsed_content("load"),
                                    parser.get_parsed_content("train#view_augmentation"), tmp_path / "plain_cache")
    assert "pixels" not in dataset[0]


def test_inference_builds_the_refiner_the_checkpoint_has(tmp_path):
    network = _refined_network()
    torch.save({"model": network.state_dict(), "optimizer": {}}, tmp_path / "last.pt")
    assert refiner_of_checkpoint(tmp_path / "last.pt")
    assert not refiner_of_checkpoint(tmp_path / "not_trained_yet.pt")
    with pytest.raises(ValueError, match="hold pixel refiner: build the network with --pixel_refinement True"):
        AllInSamNet(trainable="tail", tail_stages=2).load_state_dict(network.state_dict())

    crop = SAMPLE_CROPS / "images" / "TCGA-2Z-A9J9-01A-01-TS1_y300_x300.png"
    workflow = bundle_workflow([CONFIGS / "inference.json"], "infer", ckpt_path=str(tmp_path / "last.pt"),
                               output_dir=str(tmp_path / "out"), input_glob=str(crop))
    assert workflow.parser.get_parsed_content("network").pixel_refiner is not None
    workflow.run()
    assert (tmp_path / "out" / "TCGA-2Z-A9J9-01A-01-TS1_y300_x300_mask.png").is_file()


def test_onnx_runtime_keeps_the_refined_logits(crops):
    network = _refined_network(inference_runtime="onnxruntime").eval()
    with torch.no_grad():
        eager = network._forward(crops[:1], False)
        exported = network(crops[:1])
    assert network._onnx_forward is not None  # it ran on ONNX Runtime, not a silent fall-back to torch
    torch.testing.assert_close(exported, eager, atol=1e-3, rtol=1e-3)
