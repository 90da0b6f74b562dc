"""Instance label maps (H, W), 0 = background, 1..N = one id per nucleus, and their tight boxes."""

import numpy as np
import shapely
from scipy import ndimage
from skimage.measure import find_contours
from skimage.segmentation import relabel_sequential as _skimage_relabel

# how a binary prediction becomes nuclei (post-processing of inference, the app, WSI and the metrics)
INSTANCE_METHODS = ("components", "watershed")


def relabel_sequential(instances: np.ndarray) -> np.ndarray:
    """Map the ids of an instance map (H, W) onto 1..N in increasing order of the old ids; returns uint16 or uint32."""
    relabelled = _skimage_relabel(np.asarray(instances))[0]
    dtype = np.uint16 if relabelled.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    return relabelled.astype(dtype)


def boxes_from_instances(instances: np.ndarray) -> np.ndarray:
    """Tight boxes (N, 4) int64 as ``[x0, y0, x1, y1]`` (pixels, end exclusive) of instances 1..N.

    The instance map must have contiguous ids 1..N (see ``relabel_sequential``); row i is instance i + 1.
    """
    instances = np.asarray(instances)
    slices = ndimage.find_objects(instances)
    if any(s is None for s in slices):
        missing = [i + 1 for i, s in enumerate(slices) if s is None]
        raise ValueError(f"instance ids are not contiguous: ids {missing[:10]} have no pixels")
    return np.array([[sx.start, sy.start, sx.stop, sy.stop] for sy, sx in slices], dtype=np.int64).reshape(-1, 4)


def instance_contours(instances: np.ndarray, tolerance: float = 0.5) -> dict[int, list[list[int]]]:
    """Outer contour of every instance of a map (H, W): ``{id: [[x, y], ...]}``, closed (first point = last).

    The points are centres of the instance's boundary pixels (OpenCV's and the MoNuSeg XML convention: filling
    the polygon with its outline gives the pixels back), simplified to ``tolerance`` pixels; holes are ignored.
    Ids in increasing order; a one-pixel instance is a single repeated point.
    """
    instances = np.asarray(instances)
    contours = {}
    for index, found in enumerate(ndimage.find_objects(instances)):
        if found is None:
            continue
        rows, cols = found
        crop = np.pad(instances[found] == index + 1, 1).astype(np.float32)
        # an iso-line just below 1 runs through the instance's own boundary pixels, 8-connected
        outer = max(find_contours(crop, 1.0 - 1e-3, fully_connected="high"), key=len)
        outer = np.rint(outer)
        if len(outer) > 2:  # Douglas-Peucker in GEOS: 65x faster than skimage's approximate_polygon (a Python loop)
            outer = shapely.get_coordinates(shapely.simplify(shapely.linestrings(outer), tolerance,
                                                             preserve_topology=False))
        contours[index + 1] = (outer[:, ::-1] + [cols.start - 1, rows.start - 1]).astype(int).tolist()
    return contours


def instances_from_mask(mask: np.ndarray, method: str = "components", min_distance: int = 3) -> np.ndarray:
    """Binary map (H, W) -> instance map (H, W) int32, 0 = background.

    ``components``: 8-connected components. ``watershed``: components split by a watershed on the distance
    transform from its local maxima at least ``min_distance`` pixels apart (separates touching nuclei).
    """
    if method not in INSTANCE_METHODS:
        raise ValueError(f"instances must be one of {INSTANCE_METHODS}, got {method!r}")
    mask = np.asarray(mask) > 0
    components, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    if method == "components":
        return components.astype(np.int32)
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    distance = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=mask).astype(np.int32)
