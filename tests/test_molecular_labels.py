"""Molecular-empowered annotation: ITK registration of a synthetic IF image (made from real MoNuSeg nuclei and warped
by a known affine + smooth deformation) back onto the H&E image, and marker-guided cell classes."""

import csv
import json

import itk
import numpy as np
import pytest
import tifffile
from conftest import CONFIGS, SAMPLE_CROPS, bundle_workflow
from molecular_labels import THRESHOLD, KnownWarp, evaluate_pair, synthetic
from PIL import Image

from scripts.annotation import assign_marker_classes, class_map, write_marker_labels
from scripts.data import read_instance_map, read_rgb_image
from scripts.registration import molecular_labels

CROP = "TCGA-21-5784-01Z-00-DX1_y372_x372"


def _crop(name: str = CROP) -> tuple[np.ndarray, np.ndarray]:
    return (read_rgb_image(SAMPLE_CROPS / "images" / f"{name}.png"),
            read_instance_map(SAMPLE_CROPS / "instances" / f"{name}.png"))


def test_registration_recovers_the_known_warp_on_a_crop():
    result = evaluate_pair(*_crop(), bspline_mesh=4)
    assert result["error_before_px"] > 10  # the warp moves nuclei by 18 px here
    assert result["error_after_px"] < 2 and result["error_after_p95_px"] < 4
    assert result["accuracy"] > 0.95 and result["nuclei_scored"] >= 30


def test_rigid_registration_recovers_a_rigid_warp():
    rgb, nuclei = _crop()
    rigid = KnownWarp(nuclei.shape, scales=(1.0, 1.0), shear=0.0, amplitude=0.0)  # rotation 3 deg + (14, -9) px
    result = evaluate_pair(rgb, nuclei, transform="rigid", bspline_mesh=None, known=rigid)
    assert result["error_before_px"] > 10 and result["error_after_px"] < 1.5


@pytest.mark.parametrize("max_size", [1024, 512])  # 512: registered on a half-size copy, as a large image would be
def test_registration_recovers_the_known_warp_on_a_whole_monuseg_image(prepared_monuseg, max_size):
    output, _ = prepared_monuseg
    entry = json.loads((output / "datalist_all.json").read_text())["test"][0]
    result = evaluate_pair(read_rgb_image(output / entry["image"]), read_instance_map(output / entry["instances"]),
                           max_size=max_size)
    assert result["error_before_px"] > 15
    assert result["error_after_px"] < 2
    assert result["accuracy"] > 0.95 and result["nuclei_scored"] > 300


def test_marker_classes_take_the_strongest_marker_above_its_threshold():
    instances = np.zeros((6, 12), dtype=np.uint16)
    instances[1:3, 1:3], instances[1:3, 5:7], instances[1:3, 9:11], instances[4:6, 4:6] = 1, 2, 3, 5
    wt1, gata3 = np.zeros(instances.shape), np.zeros(instances.shape)
    wt1[instances == 1], gata3[instances == 1] = 300, 100  # WT1 only
    wt1[instances == 2], gata3[instances == 2] = 150, 150  # both: GATA3 is further above its threshold
    wt1[instances == 3], gata3[instances == 3] = 90, 40  # neither
    rows = assign_marker_classes(instances, {"podocyte": wt1, "mesangial": gata3},
                                 {"podocyte": 100.0, "mesangial": 50.0})
    assert [row["id"] for row in rows] == [1, 2, 3, 5]  # id 4 has no pixels
    assert [row["class"] for row in rows] == ["podocyte", "mesangial", "", ""]
    assert rows[0]["box"] == [1, 1, 3, 3] and rows[0]["mean_podocyte"] == 300
    classes = class_map(instances, rows, ["podocyte", "mesangial"])
    assert set(np.unique(classes[instances == 1])) == {1} and set(np.unique(classes[instances == 2])) == {2}
    assert not classes[instances == 3].any() and not classes[instances == 0].any()
    with pytest.raises(ValueError, match="a threshold per marker"):
        assign_marker_classes(instances, {"podocyte": wt1}, {"mesangial": 50.0})


def test_an_interrupted_write_leaves_the_previous_labels_whole(tmp_path, monkeypatch):
    rgb, nuclei = _crop()
    marker = {"podocyte": (nuclei % 2).astype(np.float64) * 200}
    rows = write_marker_labels(tmp_path, CROP, rgb, nuclei, marker, {"podocyte": 100.0})
    before = (tmp_path / f"{CROP}_nuclei.csv").read_bytes()
    assert len(before.splitlines()) == len(rows) + 1

    class DiskFull:  # the writer fails after the header: a killed run or a full disk
        def __init__(self, handle):
            self.rows = 0

        def writerow(self, row):
            self.rows += 1
            if self.rows > 1:
                raise OSError("No space left on device")

    monkeypatch.setattr("scripts.annotation.marker_classes.csv.writer", DiskFull)
    with pytest.raises(OSError, match="No space"):
        write_marker_labels(tmp_path, CROP, rgb, nuclei, {"podocyte": marker["podocyte"] * 0}, {"podocyte": 100.0})
    assert (tmp_path / f"{CROP}_nuclei.csv").read_bytes() == before  # the previous file, untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_bundle_workflow_writes_transform_registered_if_and_reviewable_labels(tmp_path):
    image, instances = SAMPLE_CROPS / "images" / f"{CROP}.png", SAMPLE_CROPS / "instances" / f"{CROP}.png"
    truth = synthetic(str(image), str(instances), str(tmp_path / "if"))
    output = tmp_path / "labels"
    workflow = bundle_workflow([CONFIGS / "molecular_labels.json"], run_id="molecular_labels", pas_image=str(image),
                               instances=str(instances), if_image=str(tmp_path / "if" / f"{CROP}_if.tif"),
                               output_dir=str(output),
                               bspline_mesh=4)
    workflow.run()
    report = json.loads((output / f"{CROP}_molecular_labels.json").read_text())
    assert report["mutual_information_after"] < report["mutual_information_before"]  # Mattes MI: lower is better
    (transform,) = itk.transformread(str(output / f"{CROP}_if_to_pas.tfm"))
    assert transform.GetNameOfClass() == "CompositeTransform"
    registered = tifffile.imread(output / f"{CROP}_if_registered.tif")
    assert registered.shape == (2, 256, 256) and registered.dtype == np.uint16
    nuclei = read_instance_map(instances)
    with open(output / f"{CROP}_nuclei.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(np.unique(nuclei)) - 1 == report["nuclei"]
    assert set(rows[0]) == {"id", "x0", "y0", "x1", "y1", "mean_podocyte", "class"}
    lit = set(truth["lit_ids"])
    agree = np.mean([(row["class"] == "podocyte") == (int(row["id"]) in lit) for row in rows])
    assert agree > 0.85  # every nucleus, field-of-view losses included (scored separately above)
    classes = np.asarray(Image.open(output / f"{CROP}_classes.png"))
    assert set(np.unique(classes)) == {0, 1}
    assert np.array_equal(np.asarray(Image.open(output / f"{CROP}_podocyte_mask.png")), (classes == 1).astype(np.uint8))
    assert np.asarray(Image.open(output / f"{CROP}_overlay.png")).shape == (256, 256, 3)
    assert report["per_class"]["podocyte"] == sum(row["class"] == "podocyte" for row in rows)
    assert truth["threshold"] == THRESHOLD


def test_bad_inputs_are_named(tmp_path):
    image, instances = SAMPLE_CROPS / "images" / f"{CROP}.png", SAMPLE_CROPS / "instances" / f"{CROP}.png"
    one_channel = tmp_path / "dapi_only.tif"
    tifffile.imwrite(one_channel, np.zeros((256, 256), dtype=np.uint16))
    with pytest.raises(ValueError, match=f"{one_channel}: channel 1 \\(podocyte\\) not among its 1 channels"):
        molecular_labels(str(image), str(one_channel), str(instances), str(tmp_path / "out"), {"podocyte": 1},
                         {"podocyte": 1.0})
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((100, 100), dtype=np.uint16)).save(small)
    two_channels = tmp_path / "if.tif"
    tifffile.imwrite(two_channels, np.zeros((2, 256, 256), dtype=np.uint16))
    with pytest.raises(ValueError, match=f"{small}: instance map \\(100, 100\\) is not the size of"):
        molecular_labels(str(image), str(two_channels), str(small), str(tmp_path / "out"), {"podocyte": 1},
                         {"podocyte": 1.0})
    not_tiff = tmp_path / "if_as.tif"
    not_tiff.write_text("not an image")
    with pytest.raises(ValueError, match=f"{not_tiff}: cannot read the IF image"):
        molecular_labels(str(image), str(not_tiff), str(instances), str(tmp_path / "out"), {"podocyte": 1},
                         {"podocyte": 1.0})


def test_slide_geojson_and_review_overlay_draw_a_class_in_one_colour(tmp_path):
    """One palette: the second class is the same RGB in QuPath (the slide GeoJSON) and in the lay review overlay."""
    from scripts.annotation.marker_classes import overlay
    from scripts.data import class_colour
    from scripts.wsi import GeoJsonDetections

    classes = ["podocyte", "mesangial"]
    detections = GeoJsonDetections(tmp_path / "slide.geojson", classes)
    detections.add([[4, 4], [11, 4], [11, 11], [4, 11], [4, 4]], class_index=1, instance_id=1)
    detections.close()
    feature = json.loads((tmp_path / "slide.geojson").read_text())["features"][0]
    assert feature["properties"]["classification"] == {"name": "mesangial", "color": list(class_colour(1))}
    instances = np.zeros((16, 16), np.uint16)
    instances[4:12, 4:12] = 1
    picture = overlay(np.zeros((16, 16, 3), np.uint8), instances, [{"id": 1, "class": "mesangial"}], classes, {}, {})
    assert tuple(picture[4, 4]) == class_colour(1) != class_colour(0)
    assert tuple(picture[8, 8]) == (0, 0, 0)  # outlined, not filled
