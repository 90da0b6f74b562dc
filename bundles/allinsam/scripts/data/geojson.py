"""GeoJSON as QuPath exports it: a FeatureCollection, a bare list of features, or a single geometry."""

import json
import os
from pathlib import Path

import numpy as np


def geojson_geometries(content) -> list[dict | None]:
    """The geometry of each feature of parsed GeoJSON ``content`` (None where a feature has none)."""
    features = content if isinstance(content, list) else content.get("features", [content])
    return [feature.get("geometry") if feature.get("type") == "Feature" else feature for feature in features]


def read_geojson_polygons(path: str | os.PathLike) -> list[np.ndarray]:
    """Polygons (K, 2) of ``(x, y)`` pixels from a GeoJSON file (QuPath's export): the outer ring of each Polygon and
    of each part of a MultiPolygon; features without a geometry and non-polygon geometries are skipped."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read GeoJSON ({error})") from error
    polygons = []
    for geometry in geojson_geometries(content):
        if not geometry or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        parts = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        polygons += [np.asarray(part[0], dtype=np.float64).reshape(-1, 2) for part in parts if part and part[0]]
    if not polygons:
        raise ValueError(f"{path}: no Polygon or MultiPolygon feature; not a GeoJSON nucleus annotation")
    return polygons
