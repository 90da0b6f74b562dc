"""Prompt readers (boxes JSON, CSV, COCO, QuPath GeoJSON, ImageScope XML, points), box perturbation and box
validation, on small real-shaped files and, property-based (hypothesis), on any content."""

import json
import re
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scripts.annotation import perturb_boxes, read_prompts
from scripts.annotation.box_prompted import validate_boxes

IMAGE = "TCGA-2Z-A9J9-01A-01-TS1_y300_x300.png"


def test_project_boxes_json_with_points(tmp_path):
    path = tmp_path / "case.json"
    path.write_text(json.dumps({"image": IMAGE, "boxes": [[1, 2, 11, 12], [5, 5, 9, 9]], "points": [[30, 40]]}))
    prompts = read_prompts(path)
    assert prompts.boxes.tolist() == [[1, 2, 11, 12], [5, 5, 9, 9]] and prompts.points.tolist() == [[30, 40]]


def test_csv_boxes_filtered_by_image_and_csv_points(tmp_path):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(f"image,x0,y0,x1,y1\n{IMAGE},1,2,11,12\nother.png,0,0,5,5\n{IMAGE[:-4]},3,4,13,14\n")
    assert read_prompts(boxes, image_name=IMAGE).boxes.tolist() == [[1, 2, 11, 12], [3, 4, 13, 14]]
    assert len(read_prompts(boxes).boxes) == 3
    points = tmp_path / "points.csv"
    points.write_text(f"image,x,y\n{IMAGE},10.5,20\n")
    prompts = read_prompts(points, image_name=IMAGE)
    assert prompts.points.tolist() == [[10.5, 20]] and prompts.boxes.shape == (0, 4)


def test_coco_bbox_is_converted_from_xywh_and_filtered(tmp_path):
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": f"crops/{IMAGE}"}, {"id": 2, "file_name": "other.png"}],
        "annotations": [{"image_id": 1, "bbox": [10, 20, 5, 8]}, {"image_id": 2, "bbox": [0, 0, 1, 1]}],
        "categories": [{"id": 1, "name": "nucleus"}],
    }))
    assert read_prompts(path, image_name=IMAGE).boxes.tolist() == [[10, 20, 15, 28]]
    assert read_prompts(path, image_name="missing.png").boxes.shape == (0, 4)


def test_qupath_geojson_polygons_give_bounds_and_points_are_kept(tmp_path):
    rectangle = [[[10, 20], [30, 20], [30, 35], [10, 35], [10, 20]]]
    polygon = [[[50, 50], [60, 52], [58, 65], [49, 60], [50, 50]]]
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rectangle},
         "properties": {"objectType": "annotation", "classification": {"name": "Nucleus"}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [polygon]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [100, 120]}, "properties": {}},
    ]
    collection = tmp_path / "qupath.geojson"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    prompts = read_prompts(collection)
    assert prompts.boxes.tolist() == [[10, 20, 30, 35], [49, 50, 60, 65]] and prompts.points.tolist() == [[100, 120]]
    bare_list = tmp_path / "qupath_list.json"  # QuPath's "export as list of features"
    bare_list.write_text(json.dumps(features[:1]))
    assert read_prompts(bare_list).boxes.tolist() == [[10, 20, 30, 35]]


@pytest.mark.parametrize("name, text, problem", [
    ("broken.json", '{"boxes": [[1, 2, 3', "malformed"),
    ("wrong.csv", "image,a,b\nx.png,1,2\n", "expected columns"),
    ("letters.csv", "image,x0,y0,x1,y1\nx.png,1,two,3,4\n", "line 2: not a number"),
    ("line.geojson", '{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}}',
     "unsupported geometry type 'LineString'"),
    ("coco.json", '{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1}]}', "malformed"),
    ("no_images.json", '{"annotations": [{"image_id": 1, "bbox": [1, 2, 3, 4]}]}', "needs 'images'"),
    ("header_only.csv", "image,a,b\n", "expected columns image,x0,y0,x1,y1 (boxes) or image,x,y (points), got "
                                      "['a', 'b', 'image']"),
    ("no_type.geojson", '{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"x": 1}}]}',
     "feature 0 is not GeoJSON"),
])
def test_malformed_prompt_files_name_the_file_and_the_problem(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(problem)):
        read_prompts(path)


def test_a_feature_without_geometry_is_skipped_with_a_note_and_a_header_only_csv_has_no_prompts(tmp_path, caplog):
    collection = tmp_path / "qupath.geojson"
    square = {"type": "Polygon", "coordinates": [[[10, 20], [30, 20], [30, 35], [10, 20]]]}
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": None, "properties": {"objectType": "annotation"}},
        {"type": "Feature", "geometry": square}]}))
    with caplog.at_level("WARNING"):
        assert read_prompts(collection).boxes.tolist() == [[10, 20, 30, 35]]
    assert f"{collection}: 1 feature(s) without a geometry skipped (features [0])" in caplog.text
    header_only = tmp_path / "boxes.csv"
    header_only.write_text("image,x0,y0,x1,y1\n")
    assert read_prompts(header_only, "a.png").boxes.shape == (0, 4)


def test_missing_prompt_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        read_prompts(tmp_path / "nothing.csv")


def test_perturbed_boxes_are_seeded_bounded_and_loosened():
    boxes = np.array([[10, 10, 30, 30], [50, 60, 70, 90]], dtype=float)
    jittered = perturb_boxes(boxes, jitter=3, seed=1)
    assert np.array_equal(jittered, perturb_boxes(boxes, jitter=3, seed=1))
    assert not np.array_equal(jittered, perturb_boxes(boxes, jitter=3, seed=2))
    assert np.abs(jittered - boxes).max() <= 3 and np.abs(jittered - boxes).max() > 0
    assert perturb_boxes(boxes, loosen=2).tolist() == [[8, 8, 32, 32], [48, 58, 72, 92]]


# --- property-based: any file content either parses into well-formed prompts or fails with the file's name ---

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "coordinates", "geometry", "features", "boxes", "points", "images", "annotations",
                         "bbox", "id", "image_id", "file_name", "x"]), children, max_size=4),
    max_leaves=20)
GEOMETRIES = st.fixed_dictionaries({
    "type": st.sampled_from(["Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString"]),
    "coordinates": st.recursive(st.lists(st.floats(-1e4, 1e4), min_size=0, max_size=3),
                                lambda children: st.lists(children, max_size=4), max_leaves=12)})


def _assert_well_formed_or_named(path, suffix_text):
    path.write_text(suffix_text)
    try:
        prompts = read_prompts(path)
    except ValueError as error:
        assert str(error).startswith(f"{path}: ")
        return
    assert prompts.boxes.dtype == prompts.points.dtype == np.float64
    assert prompts.boxes.ndim == prompts.points.ndim == 2
    assert prompts.boxes.shape[1] == 4 and prompts.points.shape[1] == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=JSON_VALUES | st.lists(st.fixed_dictionaries({"geometry": GEOMETRIES}), max_size=3))
def test_any_json_prompt_file_parses_or_names_the_file(tmp_path, content):
    _assert_well_formed_or_named(tmp_path / f"{uuid.uuid4().hex}.json", json.dumps(content))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.sampled_from(["image,x0,y0,x1,y1", "image,x,y", "x0,y0,x1,y1", "a,b", ""]),
       rows=st.lists(st.lists(st.one_of(st.floats(allow_nan=True), st.text(alphabet="0123456789.-e,\"x", max_size=6)),
                              max_size=6), max_size=5))
def test_any_csv_prompt_file_parses_or_names_the_file(tmp_path, header, rows):
    text = "\n".join([header] + [",".join(str(value) for value in row) for row in rows]) + "\n"
    _assert_well_formed_or_named(tmp_path / f"{uuid.uuid4().hex}.csv", text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet='<>/="RegionVertXY 0123456789.', max_size=120))
def test_any_xml_prompt_file_parses_or_names_the_file(tmp_path, text):
    _assert_well_formed_or_named(tmp_path / f"{uuid.uuid4().hex}.xml", text)


@settings(max_examples=300, deadline=None)
@given(boxes=st.lists(st.lists(st.floats(-50, 350) | st.sampled_from([np.nan, np.inf, -np.inf]), min_size=4,
                               max_size=4), max_size=12),
       height=st.integers(1, 300), width=st.integers(1, 300))
def test_every_box_is_either_clipped_inside_the_image_or_skipped_with_a_reason(boxes, height, width):
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    clipped, skipped = validate_boxes(boxes, height=height, width=width)
    assert clipped.shape == boxes.shape
    skipped_rows = [entry["index"] for entry in skipped]
    assert len(set(skipped_rows)) == len(skipped_rows) and all(entry["reason"] for entry in skipped)
    for row, (box, kept) in enumerate(zip(boxes, clipped)):
        if row in skipped_rows:
            assert np.isnan(kept).all()
            continue
        assert np.isfinite(box).all() and box[2] > box[0] and box[3] > box[1]  # only valid input boxes are kept
        assert 0 <= kept[0] < kept[2] <= width and 0 <= kept[1] < kept[3] <= height  # inside, positive area
        assert np.array_equal(kept, np.clip(box, 0, [width, height, width, height]))  # clipped, nothing else


def test_xml_regions_give_their_bounds_and_a_cut_xml_names_the_file(tmp_path):
    xml = tmp_path / "slide.xml"
    xml.write_text('<Annotations><Annotation><Regions>'
                   '<Region Id="1"><Vertices><Vertex X="10" Y="20"/><Vertex X="30" Y="25"/><Vertex X="15" Y="35"/>'
                   '</Vertices></Region><Region Id="2"><Vertices><Vertex X="49.5" Y="50"/><Vertex X="60" Y="65"/>'
                   '</Vertices></Region></Regions></Annotation></Annotations>')
    assert read_prompts(xml).boxes.tolist() == [[10, 20, 30, 35], [49.5, 50, 60, 65]]
    xml.write_text(xml.read_text()[:90])
    with pytest.raises(ValueError, match=re.escape(str(xml)) + ".*malformed"):
        read_prompts(xml)
