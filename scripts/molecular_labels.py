"""Molecular-empowered annotation (P2): register an IF image to its PAS / H&E image and label nuclei by marker.

    python scripts/molecular_labels.py run --pas_image pas.png --if_image if.tif --instances nuclei_instances.png \
        --markers "{'podocyte': 1}" --thresholds "{'podocyte': 1200}" --output_dir labels/
    python scripts/molecular_labels.py synthetic --image data/monuseg/cases/images/X.png \
        --instances data/monuseg/cases/instances/X.png --output_dir synthetic_if/
    python scripts/molecular_labels.py bench --prepared_dir data/monuseg --images 4

``run`` is the bundle's ``configs/molecular_labels.json`` from the shell. ``synthetic`` makes the test proxy
(P2's kidney PAS / IF pairs are private): from a real H&E image and its nuclei, an IF image on a dark background
with a DAPI-like channel (every nucleus) and a marker channel lit on a seeded 30 % of the nuclei, blurred and
noisy, then warped by a known affine + smooth deformation. ``bench`` registers such pairs and prints the nucleus
landmark error before / after, the seconds per pair and the class-assignment accuracy against the known subset.
"""

import json
import time
from pathlib import Path

import fire
import numpy as np
import tifffile
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)

from scripts.annotation import assign_marker_classes  # noqa: E402  (the allinsam bundle's package)
from scripts.data import read_instance_map, read_rgb_image  # noqa: E402
from scripts.registration import molecular_labels, nuclear_channel, register, resample  # noqa: E402

IF_SCALE = 4000  # uint16 units of a fully lit synthetic pixel
THRESHOLD = 1200  # the synthetic marker threshold (about half a lit nucleus' mean after blur)


class KnownWarp:
    """Moving (IF) pixel q -> fixed (PAS) pixel p = A (q - c) + c + t + d(q), d a smooth sinusoidal field.

    Documented defaults: rotation 3 deg, scales 1.03 / 0.98, shear 0.02, translation (14, -9) px about the image
    centre c; d = 3 px * (sin(2 pi y / 400), cos(2 pi x / 500)).
    """

    def __init__(self, shape: tuple[int, int], rotation_deg: float = 3.0, scales=(1.03, 0.98), shear: float = 0.02,
                 translation=(14.0, -9.0), amplitude: float = 3.0):
        angle = np.deg2rad(rotation_deg)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        self.matrix = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(scales)
        self.centre = np.array([shape[1] / 2, shape[0] / 2])
        self.translation, self.amplitude = np.asarray(translation, dtype=float), amplitude

    def displacement(self, xy: np.ndarray) -> np.ndarray:
        return self.amplitude * np.stack([np.sin(2 * np.pi * xy[:, 1] / 400), np.cos(2 * np.pi * xy[:, 0] / 500)], 1)

    def to_fixed(self, xy: np.ndarray) -> np.ndarray:
        """Moving points (N, 2) [x, y] -> fixed points."""
        return (xy - self.centre) @ self.matrix.T + self.centre + self.translation + self.displacement(xy)

    def to_moving(self, xy: np.ndarray, iterations: int = 20) -> np.ndarray:
        """Fixed points -> moving points (fixed-point iteration; the field is small and smooth)."""
        inverse = np.linalg.inv(self.matrix)
        moving = (xy - self.centre - self.translation) @ inverse.T + self.centre
        for _ in range(iterations):
            moving = (xy - self.centre - self.translation - self.displacement(moving)) @ inverse.T + self.centre
        return moving


def synthetic_if(instances: np.ndarray, seed: int = 0, marker_fraction: float = 0.3) -> tuple[np.ndarray, set[int]]:
    """IF image (2, H, W) uint16 on the PAS grid: channel 0 DAPI-like (every nucleus), channel 1 a marker lit on a
    seeded ``marker_fraction`` of the nuclei; Gaussian blur 1.5 px and noise. Returns it and the lit ids."""
    rng = np.random.default_rng(seed)
    ids = np.unique(instances[instances > 0])
    lit = {int(i) for i in ids[rng.random(len(ids)) < marker_fraction]}
    dapi = 0.05 + 0.7 * ndimage.gaussian_filter((instances > 0).astype(np.float32), 1.5)
    marker = 0.03 + 0.8 * ndimage.gaussian_filter(np.isin(instances, list(lit)).astype(np.float32), 1.5)
    channels = np.stack([dapi, marker]) + rng.normal(0, 0.03, size=(2, *instances.shape))
    return (np.clip(channels, 0, 1) * IF_SCALE).astype(np.uint16), lit


def warp(image: np.ndarray, known: KnownWarp) -> np.ndarray:
    """(C, H, W) on the fixed grid -> the moving image M(q) = image(known.to_fixed(q)), same size, 0 outside."""
    rows, cols = np.mgrid[: image.shape[1], : image.shape[2]]
    fixed = known.to_fixed(np.stack([cols.ravel(), rows.ravel()], 1).astype(float))
    coordinates = [fixed[:, 1].reshape(rows.shape), fixed[:, 0].reshape(rows.shape)]
    return np.stack([ndimage.map_coordinates(channel.astype(np.float32), coordinates, order=1, cval=0)
                     for channel in image]).astype(image.dtype)


def synthetic(image: str, instances: str, output_dir: str, seed: int = 0) -> dict:
    """Write ``<name>_if.tif`` (the warped synthetic IF, (2, H, W) uint16) and ``<name>_if_truth.json`` (lit ids,
    warp parameters) for a real H&E ``image`` and its ``instances``."""
    nuclei = read_instance_map(instances)
    fluorescence, lit = synthetic_if(nuclei, seed)
    known = KnownWarp(nuclei.shape)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    name = Path(image).stem
    tifffile.imwrite(output / f"{name}_if.tif", warp(fluorescence, known), photometric="minisblack")
    truth = {"image": str(image), "lit_ids": sorted(lit), "seed": seed, "threshold": THRESHOLD,
             "warp": "KnownWarp defaults (scripts/molecular_labels.py)"}
    (output / f"{name}_if_truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def evaluate_pair(rgb: np.ndarray, nuclei: np.ndarray, seed: int = 0, transform: str = "affine",
                  bspline_mesh: int | None = 8, max_size: int = 1024, known: KnownWarp | None = None) -> dict:
    """Synthetic pair from (rgb, nuclei), warped by ``known`` (default: ``KnownWarp``'s documented one) and
    registered: landmark errors (px) before / after, seconds, class-assignment accuracy."""
    fluorescence, lit = synthetic_if(nuclei, seed)
    known = known or KnownWarp(nuclei.shape)
    moving = warp(fluorescence, known).astype(np.float32)
    fitted = register(nuclear_channel(rgb), moving[0], transform, bspline_mesh, max_size)
    ids = np.unique(nuclei[nuclei > 0])
    centroids = np.array(ndimage.center_of_mass(np.ones_like(nuclei), nuclei, ids))[:, ::-1]  # [x, y]
    truth = known.to_moving(centroids)
    before = np.linalg.norm(centroids - truth, axis=1)
    after = np.linalg.norm(fitted.map_points(centroids) - truth, axis=1)
    marker = resample(moving[1], fitted, nuclei.shape)
    rows = assign_marker_classes(nuclei, {"marker": marker}, {"marker": THRESHOLD})
    # nuclei the warp moved out of the IF field of view (5 px margin) cannot be labelled from it: not scored
    inside = np.all((truth >= 5) & (truth < np.array(nuclei.shape[::-1]) - 5), axis=1)
    correct = [(row["class"] == "marker") == (row["id"] in lit) for row, seen in zip(rows, inside) if seen]
    return {"error_before_px": float(np.median(before)), "error_after_px": float(np.median(after)),
            "error_after_p95_px": float(np.percentile(after, 95)), "seconds": fitted.seconds,
            "accuracy": float(np.mean(correct)), "nuclei_scored": len(correct), "nuclei": len(rows), "lit": len(lit)}


def bench(prepared_dir: str = "data/monuseg", images: int = 4, split: str = "test", transform: str = "affine",
          bspline_mesh: int = 8) -> None:
    """Synthetic pairs from the first ``images`` images of ``split`` of a prepared MoNuSeg: one line per image."""
    datalist = json.loads((Path(prepared_dir) / "datalist_all.json").read_text())[split][:images]
    results = []
    for entry in datalist:
        start = time.perf_counter()
        rgb = read_rgb_image(Path(prepared_dir) / entry["image"])
        result = evaluate_pair(rgb, read_instance_map(Path(prepared_dir) / entry["instances"]), transform=transform,
                               bspline_mesh=bspline_mesh)
        result.update(image=Path(entry["image"]).stem, total_seconds=time.perf_counter() - start)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
        results.append(result)
    for key in ("error_before_px", "error_after_px", "seconds", "accuracy"):
        print(f"{key}: median {np.median([r[key] for r in results]):.3f}")


if __name__ == "__main__":
    fire.Fire({"run": molecular_labels, "synthetic": synthetic, "bench": bench})
