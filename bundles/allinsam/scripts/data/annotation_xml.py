"""Aperio ImageScope XML annotations (MoNuSeg's format): one ``<Region>`` of ``<Vertex X= Y=>`` per nucleus."""

import os
import xml.etree.ElementTree as ET

import numpy as np


def read_xml_polygons(path: str | os.PathLike) -> list[np.ndarray]:
    """Polygons (K, 2) of ``(x, y)`` vertices in pixels, one per ``Region``; an error names the file otherwise."""
    try:
        regions = ET.parse(path).getroot().iter("Region")
        polygons = [
            np.array([(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]).reshape(-1, 2)
            for region in regions
        ]
    except (ET.ParseError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: malformed ImageScope / MoNuSeg XML annotation ({error!r})") from error
    if not polygons:
        raise ValueError(f"{path}: no <Region> found; not an ImageScope / MoNuSeg XML annotation")
    return polygons
