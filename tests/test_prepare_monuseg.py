"""scripts/prepare_monuseg.py on the real MoNuSeg set and on a small MoNuSeg-layout folder built from the sample
crops."""

import json
import re
import shutil

import numpy as np
import pytest
import tifffile
from conftest import SAMPLE_CROPS
from PIL import Image
from prepare_monuseg import prepare, rasterise_polygons
from skimage.measure import find_contours, regionprops

from scripts.data import instance_contours, read_instance_map, read_xml_polygons

PATCH = 200


def _read(path):
    return np.array(Image.open(path))


def _entries(datalist_path, split):
    base = datalist_path.parent
    return [{key: base / value for key, value in entry.items()}
            for entry in json.loads(datalist_path.read_text())[split]]


def _write_split(path, train, validation, test):
    path.write_text(json.dumps({"train": train, "validation": validation, "test": test}))
    return path


# --- real MoNuSeg -------------------------------------------------------------------------------------------------


def test_xml_parser_counts_every_region_of_the_real_test_files(monuseg_dir):
    total = 0
    for xml_path in sorted((monuseg_dir / "test").glob("*.xml")):
        polygons = read_xml_polygons(xml_path)
        assert len(polygons) == len(re.findall(r"<Region\s", xml_path.read_text())), xml_path.name
        assert all(p.ndim == 2 and p.shape[1] == 2 and len(p) >= 1 for p in polygons)
        total += len(polygons)
    assert total == 6697  # the official count of the 14 test images


def test_split_counts_and_test_nuclei(prepared_monuseg):
    output, report = prepared_monuseg
    images = {split: counts["images"] for split, counts in report["splits"].items()}
    assert images == {"training": 24, "validation": 6, "test": 14}
    assert report["splits"]["test"]["nuclei"] == 6697  # no XML region lost in rasterisation
    datalist = json.loads((output / "datalist_all.json").read_text())
    assert {split: len(datalist[split]) for split in images} == images
    assert set(datalist["test"][0]) >= {"image", "label", "instances", "boxes"}


def test_instance_ids_unique_contiguous_and_label_matches(prepared_monuseg):
    output, _ = prepared_monuseg
    datalist = output / "datalist_all.json"
    for split in ("training", "validation", "test"):
        for entry in _entries(datalist, split):
            instances, label, image = _read(entry["instances"]), _read(entry["label"]), _read(entry["image"])
            assert instances.dtype == np.uint16 and image.shape == instances.shape + (3,)
            ids = np.unique(instances[instances > 0])
            assert np.array_equal(ids, np.arange(1, len(ids) + 1)), entry["instances"].name
            assert np.array_equal(label, (instances > 0).astype(np.uint8))


def test_boxes_are_tight_bounding_boxes_of_their_instance(prepared_monuseg):
    output, _ = prepared_monuseg
    for entry in (_entries(output / "datalist_all.json", "test")[:4]
                  + _entries(output / "datalist_all.json", "training")[:4]):
        boxes = json.loads(entry["boxes"].read_text())
        instances = _read(entry["instances"])
        expected = {r.label: [r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]] for r in regionprops(instances)}
        assert boxes["instance_ids"] == sorted(expected)
        assert boxes["boxes"] == [expected[i] for i in boxes["instance_ids"]]


@pytest.mark.parametrize("fraction, images", [("4pct", 24), ("0.5pct", 3)])
def test_fraction_keeps_one_200px_patch_per_image(prepared_monuseg, fraction, images):
    output, report = prepared_monuseg
    datalist_path = output / f"datalist_{fraction}_seed0.json"
    datalist = json.loads(datalist_path.read_text())
    entries = _entries(datalist_path, "training")
    assert (len(entries) == len(datalist["patches"]) == images
            == report["fractions"][f"{fraction}_seed0"]["training_images"])
    assert len(datalist["validation"]) == 6 and len(datalist["test"]) == 14  # fractions change training only
    for entry, patch in zip(entries, datalist["patches"]):
        x0, y0, x1, y1 = patch["box"]
        assert (x1 - x0, y1 - y0) == (PATCH, PATCH)
        inside = np.zeros((1000, 1000), dtype=bool)
        inside[y0:y1, x0:x1] = True
        image, label, instances = _read(entry["image"]), _read(entry["label"]), _read(entry["instances"])
        assert np.count_nonzero(image.any(axis=-1)) == PATCH * PATCH
        assert not image[~inside].any() and not label[~inside].any() and not instances[~inside].any()
        full = _read(output / "cases" / "labels" / entry["label"].name)
        assert np.array_equal(label[inside], full[inside])  # the patch keeps the full label


def test_half_percent_patches_are_among_the_4pct_patches(prepared_monuseg):
    output, _ = prepared_monuseg
    patches = {f: json.loads((output / f"datalist_{f}_seed0.json").read_text())["patches"] for f in ("4pct", "0.5pct")}
    assert all(p in patches["4pct"] for p in patches["0.5pct"])


def test_same_seed_same_bytes_other_seed_other_patches(monuseg_dir, tmp_path):
    split = _write_split(tmp_path / "split.json", ["TCGA-21-5784-01Z-00-DX1", "TCGA-38-6178-01Z-00-DX1",
                                                   "TCGA-49-4488-01Z-00-DX1", "TCGA-50-5931-01Z-00-DX1"],
                         ["TCGA-E2-A14V-01Z-00-DX1"], ["TCGA-2Z-A9J9-01A-01-TS1"])
    runs = [tmp_path / name for name in ("a", "b")]
    for run in runs:
        prepare(str(monuseg_dir), str(run), split_file=str(split), fractions=("4pct", "0.5pct"), seeds=(0, 1))
    produced = sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*")
                      if p.is_file() and p.name != "prepare_report.json")
    assert produced and produced == sorted(p.relative_to(runs[1]) for p in runs[1].rglob("*")
                                           if p.is_file() and p.name != "prepare_report.json")
    for relative in produced:
        assert (runs[0] / relative).read_bytes() == (runs[1] / relative).read_bytes(), relative
    seed0, seed1 = (json.loads((runs[0] / f"datalist_4pct_seed{s}.json").read_text())["patches"] for s in (0, 1))
    assert seed0 != seed1


def _mini_source(monuseg_dir, tmp_path, names=("TCGA-21-5784-01Z-00-DX1", "TCGA-38-6178-01Z-00-DX1")):
    """A MoNuSeg-layout copy of two real training images, one with XML, one with an instance map."""
    source = tmp_path / "source"
    for sub in ("train/images", "train/annotations", "train/instance_masks"):
        (source / sub).mkdir(parents=True)
    for name in names:
        shutil.copy(monuseg_dir / "train" / "images" / f"{name}.tif", source / "train" / "images")
        for sub, ext in (("annotations", ".xml"), ("instance_masks", ".png")):
            if (monuseg_dir / "train" / sub / f"{name}{ext}").exists():
                shutil.copy(monuseg_dir / "train" / sub / f"{name}{ext}", source / "train" / sub)
    return source, _write_split(source / "split_lvit.json", [names[0]], [], [names[1]])


def test_truncated_tif_is_named_in_the_error(monuseg_dir, tmp_path):
    source, _ = _mini_source(monuseg_dir, tmp_path)
    tif = source / "train" / "images" / "TCGA-38-6178-01Z-00-DX1.tif"
    tif.write_bytes(tif.read_bytes()[:5000])
    with pytest.raises(ValueError, match=re.escape(str(tif))):
        prepare(str(source), str(tmp_path / "out"), fractions=("all",))


def test_malformed_xml_is_named_in_the_error(monuseg_dir, tmp_path):
    source, _ = _mini_source(monuseg_dir, tmp_path)
    xml = source / "train" / "annotations" / "TCGA-21-5784-01Z-00-DX1.xml"
    xml.write_text(xml.read_text()[:3000])  # cut inside a Region
    with pytest.raises(ValueError, match=re.escape(str(xml)) + ".*malformed"):
        prepare(str(source), str(tmp_path / "out"), fractions=("all",))


def test_missing_image_in_split_and_output_inside_source_are_refused(monuseg_dir, tmp_path):
    source, split = _mini_source(monuseg_dir, tmp_path)
    bad_split = _write_split(tmp_path / "bad_split.json", ["NOT-AN-IMAGE"], [], [])
    with pytest.raises(ValueError, match=re.escape(str(bad_split)) + ".*NOT-AN-IMAGE"):
        prepare(str(source), str(tmp_path / "out"), split_file=str(bad_split))
    before = sorted(p for p in source.rglob("*"))
    with pytest.raises(ValueError, match="must not be inside the source"):
        prepare(str(source), str(source / "prepared"))
    assert sorted(p for p in source.rglob("*")) == before  # nothing written into the user's data


# --- without the shared data: a MoNuSeg-layout folder written from the shipped crops -------------------------------


def _polygon_xml(instances):
    """MoNuSeg-style XML with one Region (outer contour, x/y vertices) per instance."""
    regions = []
    for region_id in range(1, int(instances.max()) + 1):
        contour = max(find_contours(np.pad(instances == region_id, 1).astype(float), 0.5), key=len) - 1
        vertices = "".join(f'<Vertex X="{x:.1f}" Y="{y:.1f}"/>' for y, x in contour)
        regions.append(f'<Region Id="{region_id}"><Attributes/><Vertices>{vertices}</Vertices></Region>')
    return f'<Annotations><Annotation Id="1"><Regions>{"".join(regions)}</Regions></Annotation></Annotations>'


def test_prepare_on_monuseg_layout_built_from_sample_crops(tmp_path):
    datalist = json.loads((SAMPLE_CROPS / "datalist.json").read_text())
    source = tmp_path / "source"
    (source / "images").mkdir(parents=True)
    (source / "instance_masks").mkdir()
    split = {"training": [], "validation": [], "test": []}
    for split_name, entries in datalist.items():
        for entry in entries:
            name = entry["image"].split("/")[-1][: -len(".png")]
            instances = read_instance_map(SAMPLE_CROPS / entry["instances"])
            tifffile.imwrite(source / "images" / f"{name}.tif", _read(SAMPLE_CROPS / entry["image"]), compression="lzw")
            if split_name == "training":
                Image.fromarray(instances).save(source / "instance_masks" / f"{name}.png")
            else:
                (source / "images" / f"{name}.xml").write_text(_polygon_xml(instances))
            split[split_name].append((name, instances))
    split_file = _write_split(source / "split_lvit.json", *[[n for n, _ in split[s]] for s in split])

    report = prepare(str(source), str(tmp_path / "out"), split_file=str(split_file), fractions=("all",))

    for split_name, cases in split.items():
        assert report["splits"][split_name]["nuclei"] == sum(int(i.max()) for _, i in cases)
        for name, truth in cases:
            prepared = _read(tmp_path / "out" / "cases" / "instances" / f"{name}.png")
            if split_name == "training":  # instance maps pass through unchanged
                assert np.array_equal(prepared, truth)
            else:  # polygons traced from the truth rasterise back onto it
                dice = (2 * np.count_nonzero((prepared > 0) & (truth > 0))
                        / (np.count_nonzero(prepared) + np.count_nonzero(truth)))
                assert dice > 0.95, name


def test_instance_contours_draw_back_to_their_nuclei():
    """Contours (MONAI Label's answer) drawn as the MoNuSeg XML polygons are drawn give the instances back."""
    square = np.zeros((8, 9), dtype=np.uint16)
    square[2:5, 3:7] = 4
    square[6, 8] = 2
    assert instance_contours(square) == {2: [[8, 6], [8, 6]], 4: [[6, 4], [3, 4], [3, 2], [6, 2], [6, 4]]}
    ious = []
    for path in sorted((SAMPLE_CROPS / "instances").glob("*.png")):
        instances = read_instance_map(path)
        contours = instance_contours(instances)
        assert sorted(contours) == sorted(set(np.unique(instances)) - {0})
        drawn = rasterise_polygons([np.array(contour) for contour in contours.values()], instances.shape)
        for index, nucleus in enumerate(contours):
            truth, redrawn = instances == nucleus, drawn == index + 1
            ious.append((truth & redrawn).sum() / (truth | redrawn).sum())
    assert len(ious) > 150 and np.mean(ious) > 0.98 and np.percentile(ious, 5) > 0.95


# --- a lab's plain folder: images/ + instances/ --------------------------------------------------------------------


def test_folder_layout_reads_geojson_polygons_and_instance_maps_and_names_unpaired_files(tmp_path):
    from scripts.data.prepare import prepare_dataset

    datalist = json.loads((SAMPLE_CROPS / "datalist.json").read_text())
    entries = [entry for split in ("training", "validation", "test") for entry in datalist[split]]
    (tmp_path / "lab" / "images").mkdir(parents=True)
    (tmp_path / "lab" / "instances").mkdir()
    truths = {}
    for index, entry in enumerate(entries):
        name = entry["image"].split("/")[-1][: -len(".png")]
        shutil.copy(SAMPLE_CROPS / entry["image"], tmp_path / "lab" / "images" / f"{name}.png")
        truths[name] = read_instance_map(SAMPLE_CROPS / entry["instances"])
        if index % 2:  # QuPath export: one Polygon feature per nucleus, (x, y) vertices
            features = [{"type": "Feature", "properties": {"objectType": "detection"},
                         "geometry": {"type": "Polygon", "coordinates": [contour]}}
                        for contour in instance_contours(truths[name]).values()]
            features.append({"type": "Feature", "geometry": None})  # QuPath writes these for empty objects
            (tmp_path / "lab" / "instances" / f"{name}.geojson").write_text(
                json.dumps({"type": "FeatureCollection", "features": features}))
        else:
            shutil.copy(SAMPLE_CROPS / entry["instances"], tmp_path / "lab" / "instances" / f"{name}.png")

    report = prepare_dataset(str(tmp_path / "lab"), str(tmp_path / "out"), layout="folder", fractions=("all",))
    assert [report["splits"][s]["images"] for s in ("training", "validation", "test")] == [3, 1, 1]
    for name, truth in truths.items():
        prepared = _read(tmp_path / "out" / "cases" / "instances" / f"{name}.png")
        dice = (2 * np.count_nonzero((prepared > 0) & (truth > 0))
                / (np.count_nonzero(prepared) + np.count_nonzero(truth)))
        assert dice > 0.9 and abs(int(prepared.max()) - int(truth.max())) <= 2, name

    (tmp_path / "lab" / "images" / "orphan.png").write_bytes((tmp_path / "lab" / "images" / f"{name}.png").read_bytes())
    with pytest.raises(ValueError, match=r"without a partner .*orphan"):
        prepare_dataset(str(tmp_path / "lab"), str(tmp_path / "out2"), layout="folder")
    with pytest.raises(ValueError, match="no source folder given"):
        prepare_dataset(None, str(tmp_path / "out3"))
