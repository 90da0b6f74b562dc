"""Molecular-empowered labels (P2): each annotated nucleus takes the cell class whose registered IF marker lights
it up, given a threshold per marker and slide (the pathologist's); the lay annotator reviews a CSV and an overlay."""

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..data import class_colour, instance_contours, staged, write_png_atomic

UNASSIGNED_COLOUR = (255, 225, 25)
MARKER_COLOUR = (60, 220, 60)


def assign_marker_classes(instances: np.ndarray, markers: dict[str, np.ndarray],
                          thresholds: dict[str, float]) -> list[dict]:
    """One row per nucleus of ``instances`` (H, W): ``id``, ``box`` [x0, y0, x1, y1] (end exclusive), the mean of
    each marker (H, W) inside it (``mean_<class>``) and ``class``: the class whose mean / threshold is highest
    and at least 1, or ``""`` when no marker reaches its threshold."""
    if set(markers) != set(thresholds):
        raise ValueError(f"a threshold per marker is needed: markers {sorted(markers)}, "
                         f"thresholds {sorted(thresholds)}")
    slices = ndimage.find_objects(instances)
    ids = [index + 1 for index, found in enumerate(slices) if found is not None]
    means = {name: np.atleast_1d(ndimage.mean(marker, labels=instances, index=ids)) for name, marker in markers.items()}
    rows = []
    for row, nucleus in enumerate(ids):
        ys, xs = slices[nucleus - 1]
        ratios = {name: means[name][row] / thresholds[name] for name in markers}
        best = max(ratios, key=ratios.get) if ratios else None
        rows.append({"id": nucleus, "box": [xs.start, ys.start, xs.stop, ys.stop],
                     **{f"mean_{name}": round(float(means[name][row]), 3) for name in markers},
                     "class": best if best is not None and ratios[best] >= 1 else ""})
    return rows


def class_map(instances: np.ndarray, rows: list[dict], classes: list[str]) -> np.ndarray:
    """Class map (H, W) uint8 for the multi-class training: 0 background or unassigned, c = ``classes[c - 1]``."""
    lookup = np.zeros(int(instances.max(initial=0)) + 1, dtype=np.uint8)
    for row in rows:
        if row["class"]:
            lookup[row["id"]] = classes.index(row["class"]) + 1
    return lookup[instances]


def overlay(rgb: np.ndarray, instances: np.ndarray, rows: list[dict], classes: list[str],
            markers: dict[str, np.ndarray], thresholds: dict[str, float]) -> np.ndarray:
    """PAS (H, W, 3) with the marker-positive regions outlined in green and each nucleus outlined in its class's
    colour (yellow: no marker above threshold)."""
    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    for name, marker in markers.items():
        positive = ndimage.label(marker >= thresholds[name])[0]
        for contour in instance_contours(positive).values():
            draw.line([tuple(point) for point in contour], fill=MARKER_COLOUR, width=1)
    colour = {row["id"]: class_colour(classes.index(row["class"])) if row["class"] else UNASSIGNED_COLOUR
              for row in rows}
    for nucleus, contour in instance_contours(instances).items():
        draw.line([tuple(point) for point in contour], fill=colour[nucleus], width=1)
    return np.asarray(picture)


def write_marker_labels(output_dir: str | Path, name: str, rgb: np.ndarray, instances: np.ndarray,
                        markers: dict[str, np.ndarray], thresholds: dict[str, float]) -> list[dict]:
    """Write ``<name>_nuclei.csv`` (id, box, marker means, class), ``<name>_classes.png`` (class map),
    ``<name>_<class>_mask.png`` (0/1 per class) and ``<name>_overlay.png``; returns the rows."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    classes = list(markers)
    rows = assign_marker_classes(instances, markers, thresholds)
    with staged(output / f"{name}_nuclei.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "x0", "y0", "x1", "y1", *[f"mean_{c}" for c in classes], "class"])
        for row in rows:
            writer.writerow([row["id"], *row["box"], *[row[f"mean_{c}"] for c in classes], row["class"]])
    classes_map = class_map(instances, rows, classes)
    write_png_atomic(output / f"{name}_classes.png", classes_map)
    for index, class_name in enumerate(classes):
        write_png_atomic(output / f"{name}_{class_name}_mask.png", (classes_map == index + 1).astype(np.uint8))
    write_png_atomic(output / f"{name}_overlay.png", overlay(rgb, instances, rows, classes, markers, thresholds))
    return rows
