"""Prompts in the formats labs have, read into boxes (N, 4) ``[x0, y0, x1, y1]`` and points (M, 2) ``[x, y]``.

Pixels, end exclusive for boxes. Formats: the project's boxes JSON (``{"boxes": [...], "points": [...]}``),
CSV with a header (``image,x0,y0,x1,y1`` for boxes or ``image,x,y`` for points), COCO JSON (``bbox`` is
``[x, y, w, h]``), QuPath / GeoJSON (Polygon and MultiPolygon give their bounds, Point and MultiPoint give
points), Aperio ImageScope / MoNuSeg XML (each Region gives its bounds). Files that cover several images are filtered
by the image's name (file stem). A malformed file raises ``ValueError`` naming it and the problem; a GeoJSON feature
without a geometry (``null``, as QuPath writes for some objects) is skipped with a logged note.
"""

import csv
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..data import read_xml_polygons
from ..data.geojson import geojson_geometries

logger = logging.getLogger(__name__)


@dataclass
class Prompts:
    boxes: np.ndarray  # (N, 4) float64
    points: np.ndarray  # (M, 2) float64

    @classmethod
    def of(cls, boxes=(), points=()) -> "Prompts":
        return cls(np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                   np.asarray(points, dtype=np.float64).reshape(-1, 2))


def _same_image(reference, image_name: str | None) -> bool:
    return image_name is None or Path(str(reference)).stem == Path(image_name).stem


def _from_project_json(content: dict) -> Prompts:
    return Prompts.of(content.get("boxes", ()), content.get("points", ()))


def _from_coco(content: dict, image_name: str | None) -> Prompts:
    if "images" not in content:
        raise ValueError("a COCO file needs 'images' (ids and file names) beside 'annotations'")
    ids = {image["id"] for image in content["images"] if _same_image(image["file_name"], image_name)}
    if image_name is not None and not ids:
        return Prompts.of()
    boxes = [[x, y, x + w, y + h] for annotation in content["annotations"] if not ids or annotation["image_id"] in ids
             for x, y, w, h in [annotation["bbox"]]]
    return Prompts.of(boxes)


def _from_geojson(content, source: Path) -> Prompts:
    boxes, points, empty = [], [], []
    for index, geometry in enumerate(geojson_geometries(content)):
        if geometry is None:
            empty.append(index)
            continue
        if "type" not in geometry or "coordinates" not in geometry:
            raise ValueError(f"feature {index} is not GeoJSON: no 'type' and 'coordinates' ({str(geometry)[:80]})")
        kind, coordinates = geometry["type"], geometry["coordinates"]
        if kind in ("Polygon", "MultiPolygon"):
            vertices = np.asarray([v for ring in (coordinates if kind == "Polygon" else sum(coordinates, []))
                                   for v in ring], dtype=np.float64)
            boxes.append([*vertices.min(axis=0), *vertices.max(axis=0)])
        elif kind in ("Point", "MultiPoint"):
            points.extend(position[:2] for position in ([coordinates] if kind == "Point" else coordinates))
        else:
            raise ValueError(f"unsupported geometry type {kind!r} (Polygon, MultiPolygon, Point, MultiPoint)")
    if empty:
        logger.warning(f"{source}: {len(empty)} feature(s) without a geometry skipped (features {empty[:10]})")
    return Prompts.of(boxes, points)


def _from_csv(table: dict, image_name: str | None) -> Prompts:
    columns, rows = set(table["columns"]), table["rows"]
    box_columns, point_columns = ["x0", "y0", "x1", "y1"], ["x", "y"]
    if not (set(box_columns) <= columns or set(point_columns) <= columns):
        raise ValueError(f"expected columns image,x0,y0,x1,y1 (boxes) or image,x,y (points), got {sorted(columns)}")
    boxes, points = [], []
    for line, row in enumerate(rows, start=2):
        if "image" in row and not _same_image(row["image"], image_name):
            continue
        try:
            if set(box_columns) <= columns:
                boxes.append([float(row[c]) for c in box_columns])
            else:
                points.append([float(row[c]) for c in point_columns])
        except (TypeError, ValueError) as error:
            raise ValueError(f"line {line}: not a number ({error})") from error
    return Prompts.of(boxes, points)


@lru_cache(maxsize=8)
def _parsed(path: Path, modified_ns: int, size: int):
    """CSV rows or JSON content of a prompt file, read once while the file is unchanged (one file often covers
    every image of a run)."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            return {"columns": reader.fieldnames or [], "rows": rows}
    return json.loads(path.read_text())


def read_prompts(path, image_name: str | None = None) -> Prompts:
    """Boxes and points of ``image_name`` (all of them when None) from any supported prompt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    try:
        if path.suffix.lower() == ".xml":
            return Prompts.of([[*polygon.min(axis=0), *polygon.max(axis=0)] for polygon in read_xml_polygons(path)])
        status = path.stat()
        content = _parsed(path.resolve(), status.st_mtime_ns, status.st_size)
        if path.suffix.lower() == ".csv":
            return _from_csv(content, image_name)
        if isinstance(content, dict) and "annotations" in content:
            return _from_coco(content, image_name)
        if isinstance(content, dict) and ("boxes" in content or "points" in content):
            return _from_project_json(content)
        return _from_geojson(content, path)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError, IndexError,
            AttributeError) as error:
        raise ValueError(f"{path}: malformed prompt file ({error})") from error


def perturb_boxes(boxes: np.ndarray, jitter: float = 0, loosen: float = 0, seed: int = 0) -> np.ndarray:
    """Boxes (N, 4) as careless annotators draw them: each side moved outward by ``loosen`` pixels, then each
    coordinate moved by a uniform random offset in ``[-jitter, jitter]`` pixels (seeded)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) + np.array([-loosen, -loosen, loosen, loosen])
    if jitter:
        boxes = boxes + np.random.default_rng(seed).uniform(-jitter, jitter, size=boxes.shape)
    return boxes
