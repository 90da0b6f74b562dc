"""Bad input to the training and inference workflows: each case stops with an error naming the file and the problem
before anything is written, or (odd but usable images) is converted with a logged note. Built from the real sample
crops. Prompt files and boxes: tests/test_prompts.py; NaN loss: tests/test_training_faults.py."""

import json
import logging
import re
import shutil

import numpy as np
import pytest
from conftest import BUNDLE, SAMPLE_CROPS, bundle_workflow
from PIL import Image

from scripts import flag
from scripts.data import checked_datalist, checked_image_glob, read_rgb_image, to_rgb8

TRAIN, INFER = BUNDLE / "configs" / "train.json", BUNDLE / "configs" / "inference.json"
CROP = "TCGA-2Z-A9J9-01A-01-TS1_y300_x300"


def _error_chain(error: BaseException) -> str:
    """The messages of an exception and its causes (MONAI wraps a config expression's error in RuntimeError)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return "\n".join(messages)


@pytest.fixture
def dataset(tmp_path, sample_datalist):
    """A copy of the sample crops and their datalist, to be damaged by each test."""
    root = tmp_path / "dataset"
    shutil.copytree(SAMPLE_CROPS, root)
    return root


def _write_datalist(root, training, validation=None):
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": training,
                                "validation": validation if validation is not None else training}))
    return path


def _entry(name):
    return {"image": f"images/{name}.png", "label": f"labels/{name}.png"}


@pytest.mark.parametrize("damage, problem", [
    ("truncate_png", "truncated, corrupt or not an image"),
    ("garbage_png", "truncated, corrupt or not an image"),
    ("truncate_tiff", "truncated, corrupt or not an image"),
    ("missing_label", "file not found"),
    ("smaller_label", "is 256x200 pixels but its 'image'"),
    ("label_0_255", "holds values [0, 255]; expected 0 (background) and 1 (nucleus) (a 0/255 mask"),
    ("instance_map_label", "expected 0 (background) and 1 (nucleus)"),
])
def test_a_damaged_file_stops_training_naming_it_before_anything_is_written(dataset, tmp_path, damage, problem):
    entry = _entry(CROP)
    image, label = dataset / entry["image"], dataset / entry["label"]
    if damage == "truncate_png":
        image.write_bytes(image.read_bytes()[:5000])
        named = image
    elif damage == "garbage_png":
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
        named = image
    elif damage == "truncate_tiff":
        tiff = image.with_suffix(".tif")
        Image.open(image).save(tiff)
        tiff.write_bytes(tiff.read_bytes()[:20000])
        entry["image"] = f"images/{CROP}.tif"
        named = tiff
    elif damage == "missing_label":
        label.unlink()
        named = label
    elif damage == "label_0_255":
        Image.fromarray((np.asarray(Image.open(label)) > 0).astype(np.uint8) * 255).save(label)
        named = label
    elif damage == "instance_map_label":
        shutil.copy(dataset / "instances" / f"{CROP}.png", label)
        named = label
    else:
        Image.fromarray(np.asarray(Image.open(label))[:200]).save(label)
        named = label
    datalist = _write_datalist(dataset, [entry, _entry("TCGA-21-5784-01Z-00-DX1_y372_x372")])
    models = tmp_path / "models"
    with pytest.raises(Exception) as caught:
        bundle_workflow([TRAIN], "train", datalist=str(datalist), epochs=1, ckpt_dir=str(models),
                        output_dir=str(tmp_path / "runs")).run()
    message = _error_chain(caught.value)
    assert re.search(re.escape(str(named)) + ": .*" + re.escape(problem), message), message
    assert not models.exists() or not any(models.iterdir())  # nothing written, not even a first checkpoint


def test_an_empty_or_malformed_datalist_is_named(dataset):
    empty = _write_datalist(dataset, [])
    with pytest.raises(ValueError, match=re.escape(f"{empty}: the 'training' list is empty")):
        checked_datalist(empty, "training", ["image", "label"])
    empty.write_text('{"training": [')
    with pytest.raises(ValueError, match=re.escape(f"{empty}: malformed datalist JSON")):
        checked_datalist(empty, "training", ["image", "label"])
    empty.write_text('{"testing": []}')
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no usable 'training' list")):
        checked_datalist(empty, "training", ["image", "label"])
    with pytest.raises(FileNotFoundError, match="nowhere.json: datalist not found"):
        checked_datalist(dataset / "nowhere.json", "training", ["image"])
    with pytest.raises(FileNotFoundError, match=r"\*.tiff: no file matches"):
        checked_image_glob(str(dataset / "images" / "*.tiff"))


@pytest.mark.parametrize("mode, note", [
    ("RGBA", "RGBA image converted to 8-bit RGB (alpha channel dropped)"),
    ("L", "L image converted to 8-bit RGB (greyscale, repeated to RGB)"),
    ("I;16", "16-bit greyscale image (I;16) scaled to 8 bits (value / 257)"),
])
def test_rgba_grey_and_16_bit_images_are_converted_with_a_logged_note(tmp_path, caplog, mode, note):
    rgb = read_rgb_image(SAMPLE_CROPS / "images" / f"{CROP}.png")
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    array = {"RGBA": np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)]), "L": grey,
             "I;16": grey.astype(np.uint16) * 257}[mode]
    path = tmp_path / f"{mode.replace(';', '')}.png"
    Image.fromarray(array).save(path)
    with caplog.at_level(logging.WARNING), Image.open(path) as opened:
        converted = np.asarray(to_rgb8(opened))
    assert f"{path}: {note}" in caplog.text
    assert converted.dtype == np.uint8 and converted.shape == rgb.shape
    expected = rgb if mode == "RGBA" else np.repeat(grey[..., None], 3, axis=2)
    assert np.array_equal(converted, expected)
    assert np.array_equal(np.asarray(Image.open(path)), array)  # the user's file is untouched


def test_float_images_are_refused_by_name(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((8, 8), np.float32)).save(path)
    with Image.open(path) as opened, pytest.raises(ValueError, match=re.escape(f"{path}: unsupported image mode 'F'")):
        to_rgb8(opened)


def test_inference_predicts_the_same_nuclei_on_an_rgba_copy(trained_allinsam, tmp_path, capsys):
    _, models = trained_allinsam
    images = tmp_path / "images"
    images.mkdir()
    rgb = read_rgb_image(SAMPLE_CROPS / "images" / f"{CROP}.png")
    Image.fromarray(rgb).save(images / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(images / "rgba.png")
    bundle_workflow([INFER], "infer", ckpt_path=str(models / "model.pt"), output_dir=str(tmp_path / "out"),
                    input_glob=str(images / "*.png")).run()
    assert "rgba.png: RGBA image converted to 8-bit RGB" in capsys.readouterr().out  # the bundle logs to stdout
    masks = [np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png")) for name in ("rgb", "rgba")]
    assert masks[0].any() and np.array_equal(masks[0], masks[1])


def test_a_sam_checkpoint_with_another_sha256_is_refused_before_loading(tmp_path):
    from scripts.networks import AllInSamNet

    checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    checkpoint.write_bytes(b"not the checkpoint the user meant")
    with pytest.raises(ValueError, match=re.escape(str(checkpoint)) + ": SHA-256 [0-9a-f]{64} does not match"):
        AllInSamNet("vit_b", checkpoint, image_size=64, checkpoint_sha256="0" * 64)


@pytest.mark.parametrize("given, expected", [(True, True), (False, False), ("false", False), ("True", True),
                                             (" FALSE ", False), (0, False), (1, True)])
def test_yes_no_options_read_what_the_command_line_hands_over(given, expected):
    """``monai.bundle run ... --resume false`` hands over the string "false", which Python takes as true."""
    assert flag(given, "resume") is expected


@pytest.mark.parametrize("given", ["no", "", 2, None, "flase"])
def test_a_yes_no_option_that_is_neither_is_refused_by_name(given):
    with pytest.raises(ValueError, match="--write_nifti must be true or false"):
        flag(given, "write_nifti")
