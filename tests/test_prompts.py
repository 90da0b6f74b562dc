"""Prompt readers (boxes JSON, CSV, COCO, QuPath GeoJSON, points) and box perturbation, on small real-shaped files."""

import json
import re

import numpy as np
import pytest

from scripts.annotation import perturb_boxes, read_prompts

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
])
def test_malformed_prompt_files_name_the_file_and_the_problem(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(problem)):
        read_prompts(path)


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
