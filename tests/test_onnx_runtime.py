"""The exported paths (ONNX Runtime and OpenVINO, inference.json's and annotate.json's defaults on the CPU): the same
logits and masks as eager torch on real crops with real LiteMedSAM weights in float32, within the measured tolerance in
int8 and bfloat16, exported again when the weights change, torch where it cannot export; the box annotator's encoder
likewise."""

import numpy as np
import pytest
import torch
from conftest import CONFIGS, SAMPLE_CROPS, bundle_workflow
from PIL import Image

from scripts.annotation import BoxPromptedSegmenter, read_prompts
from scripts.data import read_instance_map, read_rgb_image
from scripts.metrics import dice_iou
from scripts.networks import (
    AllInSamNet,
    fuse_conv_bn_for_inference,
    load_litemedsam,
    native_bfloat16,
    read_network_weights,
)

# measured on the trained test model and on MoNuSeg test windows: max |logit difference| 3-4e-5
LOGIT_TOLERANCE = 1e-3
# int8 against float32: box annotation on the first test crop Dice -0.0015 (int8 encoder), -0.0018 (int8 encoder and
# decoder); on MoNuSeg (docs/results/inference_runtime.md) |logit difference| up to 0.5 on nine windows of a test
# image, mask Dice 0.987-0.994 on whole images, box annotation Dice -0.0008 (training) and -0.0019 (test images) with
# an int8 encoder, -0.0010 and -0.0021 with the decoder int8 too. OpenVINO bfloat16 on MoNuSeg validation images:
# mask Dice 0.992 against float32
INT8_LOGIT_TOLERANCE = 1.0
# the session's two-step model leaves many pixels near 0.5, the worst case for a threshold: on the crops its int8 mask
# measured Dice 0.977 (bundle 0.19.0, whole crop) and 0.976 (two crops, 0.21.0; the two steps differ with the thread
# count) against float32; bfloat16 above 0.98 in the same run
INT8_MASK_DICE_NEAR_THRESHOLD = 0.96
INT8_BOX_DICE_CHANGE = 0.005


@pytest.fixture(scope="module")
def box_case(sample_datalist) -> tuple:
    """The first test crop's RGB image, true boxes and instance map, and the fused pretrained LiteMedSAM."""
    entry = sample_datalist["test"][0]
    return (read_rgb_image(SAMPLE_CROPS / entry["image"]), read_prompts(SAMPLE_CROPS / entry["boxes"]).boxes,
            read_instance_map(SAMPLE_CROPS / entry["instances"]), fuse_conv_bn_for_inference(load_litemedsam()))


def _logits(network: AllInSamNet, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network.eval()(images)


def test_onnxruntime_gives_torchs_logits_and_follows_new_weights(trained_allinsam, crops):
    trained = read_network_weights(trained_allinsam[1] / "model.pt")
    pretrained = AllInSamNet(trainable="tail").state_dict()  # the decoder's own prompt-free start: logits near -20
    reference = AllInSamNet(trainable="tail")
    network = AllInSamNet(trainable="tail", inference_runtime="onnxruntime")
    for weights in (trained, pretrained):
        reference.load_state_dict(weights)
        network.load_state_dict(weights)
        expected, logits = _logits(reference, crops), _logits(network, crops)
        assert network._exported is not None  # it ran ONNX Runtime, exported from these weights
        assert logits.shape == expected.shape == (2, 1, 256, 256) and logits.dtype == torch.float32
        assert (logits - expected).abs().max() < LOGIT_TOLERANCE
        decided = (expected.abs() > LOGIT_TOLERANCE)  # pixels the tolerance cannot move across 0
        assert torch.equal((logits > 0)[decided], (expected > 0)[decided])
    assert (expected > 0).float().mean() < 0.01  # the second pass used the new weights: the pretrained start
    session = network._exported
    assert torch.equal(_logits(network, crops), logits) and network._exported is session  # weights unchanged
    with torch.no_grad():
        network.logit_bias.add_(5.0)  # an in-place change, as an optimizer step makes
    assert (_logits(network, crops) - (logits + 5.0)).abs().max() < LOGIT_TOLERANCE
    assert network._exported is not session
    with torch.no_grad():
        reference.logit_bias.add_(5.0)
        assert torch.equal(network.train()(crops), reference.train()(crops))  # training always runs torch


def test_a_vit_exports_and_the_adapter_recipe_warns_once_and_stays_on_torch(caplog):
    """A SAM ViT (random weights, 64 px) runs through ONNX Runtime too; the SAM-Adapter's FFT has no ONNX operator,
    so that recipe infers on torch, with one warning."""
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 64)
    vit = AllInSamNet("vit_b", pretrained=False, image_size=64, trainable="decoder", inference_runtime="onnxruntime")
    reference = AllInSamNet("vit_b", pretrained=False, image_size=64, trainable="decoder")
    reference.load_state_dict(vit.state_dict())
    assert (_logits(vit, image) - _logits(reference, image)).abs().max() < LOGIT_TOLERANCE
    assert vit._exported is not None
    adapter = AllInSamNet("vit_b", pretrained=False, image_size=64, trainable="adapter",
                          inference_runtime="onnxruntime")
    with caplog.at_level("WARNING"):
        first, second = _logits(adapter, image), _logits(adapter, image)
    assert torch.equal(first, second) and adapter._exported is None
    warnings = [record.getMessage() for record in caplog.records if "inference_runtime" in record.getMessage()]
    assert len(warnings) == 1 and "FFT" in warnings[0] and "torch" in warnings[0]


@pytest.mark.parametrize("options", [{}, {"multimask": True, "refine": True}])
def test_box_annotation_on_onnxruntime_gives_torchs_instances(box_case, options):
    """annotate.json's segmenter (fused LiteMedSAM) on a real test crop with its true boxes, the encoder and then also
    the decoder (prompts and crop sides of every size in one exported graph) on ONNX Runtime in float32."""
    image, boxes, truth, sam = box_case
    eager, _ = BoxPromptedSegmenter(sam, **options)(image, boxes)
    for runtimes in ({"encoder_runtime": "onnxruntime"},
                     {"encoder_runtime": "onnxruntime", "decoder_runtime": "onnxruntime"}):
        fast, report = BoxPromptedSegmenter(sam, **options, **runtimes)(image, boxes)
        assert report["prompts_used"] == len(boxes) and report["decoder_calls"] > 1
        assert (fast == eager).mean() > 0.999  # the same ids on (nearly) every pixel: logits within 4e-5 of torch's
        assert abs(dice_iou(fast, truth)[0] - dice_iou(eager, truth)[0]) < 0.001
    for part in ("encoder", "decoder"):
        with pytest.raises(ValueError, match=f"{part}_runtime must be one of"):
            BoxPromptedSegmenter(sam, **{f"{part}_runtime": "int8"})


def test_int8_stays_within_the_measured_tolerance_of_float32(trained_allinsam, crops):
    """``inference_precision int8`` (ONNX Runtime's dynamic quantisation) against float32 on the real crops with the
    trained weights: quantised (the logits move) but the masks keep to float32's (eager torch's: ONNX Runtime's
    float32 gives those within LOGIT_TOLERANCE, above)."""
    weights = read_network_weights(trained_allinsam[1] / "model.pt")
    float32 = AllInSamNet(trainable="tail")
    int8 = AllInSamNet(trainable="tail", inference_runtime="onnxruntime", inference_precision="int8")
    for network in (float32, int8):
        network.load_state_dict(weights)
    expected, logits = _logits(float32, crops), _logits(int8, crops)
    assert int8._exported.precision == "int8" and logits.dtype == torch.float32
    error = (logits - expected).abs().max()
    assert LOGIT_TOLERANCE < error < INT8_LOGIT_TOLERANCE
    assert dice_iou((logits > 0).numpy(), (expected > 0).numpy())[0] > INT8_MASK_DICE_NEAR_THRESHOLD


def test_box_annotation_in_int8_keeps_the_float32_dice(box_case):
    image, boxes, truth, sam = box_case
    float32, _ = BoxPromptedSegmenter(sam)(image, boxes)  # eager torch: ONNX Runtime's float32 masks are the same
    for int8_parts in (["encoder"], ["encoder", "decoder"]):  # annotate.json's default: both
        options = {f"{part}_{option}": value for part in int8_parts
                   for option, value in (("runtime", "onnxruntime"), ("precision", "int8"))}
        segmenter = BoxPromptedSegmenter(sam, **options)
        int8, report = segmenter(image, boxes)
        assert report["prompts_used"] == len(boxes)
        assert all(getattr(segmenter, part).precision == "int8" for part in int8_parts)
        assert abs(dice_iou(int8, truth)[0] - dice_iou(float32, truth)[0]) < INT8_BOX_DICE_CHANGE
    for part in ("encoder", "decoder"):  # int8 is ONNX Runtime's, the runtime here is torch
        with pytest.raises(ValueError, match=f"{part}_runtime torch runs {part}_precision float32, not 'int8'"):
            BoxPromptedSegmenter(sam, **{f"{part}_precision": "int8"})


def test_openvino_gives_torchs_logits_in_float32_and_keeps_the_masks_in_bfloat16(trained_allinsam, crops):
    """``inference_runtime openvino``: float32 is torch's forward pass; bfloat16 (native on a CPU with AVX-512 BF16,
    float32 on one without) moves the logits but keeps the masks, as int8 does."""
    weights = read_network_weights(trained_allinsam[1] / "model.pt")
    logits = {}
    for runtime, precision in (("torch", "float32"), ("openvino", "float32"), ("openvino", "bfloat16")):
        network = AllInSamNet(trainable="tail", inference_runtime=runtime, inference_precision=precision)
        network.load_state_dict(weights)
        logits[runtime, precision] = _logits(network, crops)
        assert (network._exported is not None) == (runtime == "openvino")
    expected = logits["torch", "float32"]
    assert (logits["openvino", "float32"] - expected).abs().max() < LOGIT_TOLERANCE
    bfloat16 = logits["openvino", "bfloat16"]
    assert bfloat16.dtype == torch.float32 and bfloat16.shape == expected.shape
    assert (bfloat16 - expected).abs().max() < INT8_LOGIT_TOLERANCE
    assert dice_iou((bfloat16 > 0).numpy(), (expected > 0).numpy())[0] > INT8_MASK_DICE_NEAR_THRESHOLD


def test_box_annotation_with_an_openvino_encoder_keeps_the_float32_dice(box_case):
    image, boxes, truth, sam = box_case
    eager, _ = BoxPromptedSegmenter(sam)(image, boxes)
    float32, _ = BoxPromptedSegmenter(sam, encoder_runtime="openvino")(image, boxes)
    assert (float32 == eager).mean() > 0.999
    segmenter = BoxPromptedSegmenter(sam, encoder_runtime="openvino", encoder_precision="bfloat16")
    bfloat16, report = segmenter(image, boxes)
    assert report["prompts_used"] == len(boxes) and segmenter.encoder.precision == "bfloat16"
    assert abs(dice_iou(bfloat16, truth)[0] - dice_iou(eager, truth)[0]) < INT8_BOX_DICE_CHANGE


@pytest.mark.parametrize("runtime, precision, message", [
    ("tensorrt", "float32", "inference_runtime must be one of"),
    ("onnxruntime", "bfloat16", "onnxruntime runs inference_precision float32 or int8, not 'bfloat16'"),
    ("openvino", "int8", "openvino runs inference_precision float32 or bfloat16, not 'int8'"),
    ("torch", "int8", "torch runs inference_precision float32 or bfloat16, not 'int8'"),
])
def test_bad_runtime_options_are_refused(runtime, precision, message):
    with pytest.raises(ValueError, match=message):
        AllInSamNet("vit_b", pretrained=False, image_size=64, inference_runtime=runtime, inference_precision=precision)


@pytest.mark.slow
def test_inference_json_runs_the_fastest_numerics_by_default_and_every_numerics_option(trained_allinsam, tmp_path):
    """The default: OpenVINO bfloat16 on a CPU with native bfloat16, else ONNX Runtime int8; each option runs."""
    crop = SAMPLE_CROPS / "images" / "TCGA-2Z-A9J9-01A-01-TS1_y300_x300.png"
    checkpoint = str(trained_allinsam[1] / "model.pt")
    outputs = {}
    for name, overrides in (("default", {}), ("float32", {"inference_precision": "float32"}),
                            ("torch", {"inference_precision": "float32", "inference_runtime": "torch"})):
        workflow = bundle_workflow([CONFIGS / "inference.json"], "infer", ckpt_path=checkpoint,
                                   output_dir=str(tmp_path / name), input_glob=str(crop), **overrides)
        network = workflow.parser.get_parsed_content("network")
        workflow.run()
        outputs[name] = {kind: np.asarray(Image.open(tmp_path / name / f"{crop.stem}_{kind}.png"), dtype=int)
                         for kind in ("prob", "mask")}
        if name == "default":
            fastest = ("openvino", "bfloat16") if native_bfloat16(torch.device("cpu")) else ("onnxruntime", "int8")
            assert (network.inference_runtime, network.inference_precision) == fastest
            assert network._exported.precision == fastest[1]
        else:
            assert (network._exported is not None) == (name == "float32")
    eager = outputs["torch"]
    assert np.abs(outputs["float32"]["prob"] - eager["prob"]).max() <= 1  # one grey level of the probability map
    assert (outputs["float32"]["mask"] == eager["mask"]).mean() > 0.9999
    assert dice_iou(outputs["default"]["mask"], eager["mask"])[0] > INT8_MASK_DICE_NEAR_THRESHOLD
    for precision, runtime in (("bfloat16", "openvino"), ("int8", "onnxruntime")):  # the runtime follows the numerics
        workflow = bundle_workflow([CONFIGS / "inference.json"], "infer", ckpt_path=checkpoint,
                                   output_dir=str(tmp_path / precision), input_glob=str(crop),
                                   inference_precision=precision)
        assert workflow.parser.get_parsed_content("network").inference_runtime == runtime
