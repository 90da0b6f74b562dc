"""The molecular-empowered annotation workflow on files: register the IF image to the PAS image, resample the IF
channels onto the PAS grid, and turn the annotated nuclei into cell-class labels by their marker signal."""

import json
import logging
from pathlib import Path

import itk
import numpy as np
import tifffile

from ..annotation.marker_classes import write_marker_labels
from ..data import read_instance_map, read_rgb_image, staged, write_json_atomic
from .itk_registration import nuclear_channel, register, resample

logger = logging.getLogger(__name__)


def read_if_image(path: str | Path) -> np.ndarray:
    """An IF image as (C, H, W): a multi-page / channel-first TIFF, or a single channel (H, W)."""
    path = Path(path)
    try:
        image = tifffile.imread(path)
    except (OSError, ValueError, tifffile.TiffFileError) as error:
        raise ValueError(f"{path}: cannot read the IF image as TIFF ({error})") from error
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] > 16:
        raise ValueError(f"{path}: expected an IF image (C, H, W) with C <= 16 channels or (H, W), got {image.shape}")
    return image


def molecular_labels(pas_image: str, if_image: str, instances: str, output_dir: str, markers: dict[str, int],
                     thresholds: dict[str, float], registration_channel: int = 0, transform: str = "affine",
                     bspline_mesh: int | None = 8, max_size: int = 1024) -> dict:
    """Register channel ``registration_channel`` (DAPI) of ``if_image`` to the haematoxylin of ``pas_image``, write
    ``<name>_if_to_pas.tfm`` (ITK transform: PAS points -> IF points), ``<name>_if_registered.tif`` (every channel on
    the PAS grid), then the marker labels of the nuclei in ``instances`` (``markers``: class -> IF channel,
    ``thresholds``: class -> marker threshold in the IF image's units). Returns the report (also written as JSON)."""
    rgb = read_rgb_image(pas_image)
    fluorescence = read_if_image(if_image)
    nuclei = read_instance_map(instances)
    for class_name, channel in {"registration": registration_channel, **markers}.items():
        if not 0 <= channel < len(fluorescence):
            raise ValueError(f"{if_image}: channel {channel} ({class_name}) not among its {len(fluorescence)} channels")
    if nuclei.shape != rgb.shape[:2]:
        raise ValueError(f"{instances}: instance map {nuclei.shape} is not the size of {pas_image} {rgb.shape[:2]}")
    name = Path(pas_image).stem
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    fitted = register(nuclear_channel(rgb), fluorescence[registration_channel].astype(np.float32), transform,
                      bspline_mesh, max_size)
    with staged(output / f"{name}_if_to_pas.tfm") as tmp:
        itk.transformwrite([fitted.transform], str(tmp))
    registered = np.stack([resample(channel.astype(np.float32), fitted, rgb.shape[:2]) for channel in fluorescence])
    with staged(output / f"{name}_if_registered.tif") as tmp:
        tifffile.imwrite(tmp, registered.astype(fluorescence.dtype), photometric="minisblack")
    rows = write_marker_labels(output, name, rgb, nuclei, {c: registered[i] for c, i in markers.items()}, thresholds)
    report = {"pas_image": str(pas_image), "if_image": str(if_image), "transform": transform,
              "bspline_mesh": bspline_mesh, "mutual_information_before": round(fitted.metric_before, 4),
              "mutual_information_after": round(fitted.metric_after, 4),
              "registration_seconds": round(fitted.seconds, 2),
              "nuclei": len(rows), "per_class": {c: sum(row["class"] == c for row in rows) for c in markers}}
    write_json_atomic(output / f"{name}_molecular_labels.json", report)
    logger.info(json.dumps(report))
    return report
