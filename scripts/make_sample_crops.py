"""Cut the small real MoNuSeg crops shipped in ``bundles/allinsam/sample_data/monuseg_crops`` (quickstart, tests).

    python scripts/prepare_monuseg.py --output_dir data/monuseg
    python scripts/make_sample_crops.py --prepared_dir data/monuseg

Each crop keeps the layout of a prepared case (images / labels / instances / boxes) and nuclei cut by the crop
border keep their visible part. The datalist has the split of the image each crop comes from.
"""

from pathlib import Path

import fire
import numpy as np
from prepare_monuseg import SPLITS, relative_entry, write_case  # same folder: scripts/ is on sys.path

from scripts.data import read_instance_map, read_rgb_image, relabel_sequential, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
# (split, image name, top row, left column): two organs per split, XML and instance-map sources in training.
DEFAULT_CROPS = (
    ("training", "TCGA-21-5784-01Z-00-DX1", 372, 372),
    ("training", "TCGA-38-6178-01Z-00-DX1", 372, 372),
    ("validation", "TCGA-E2-A14V-01Z-00-DX1", 372, 372),
    ("test", "TCGA-2Z-A9J9-01A-01-TS1", 300, 300),
    ("test", "TCGA-AC-A2FO-01A-01-TS1", 372, 372),
)


def make_sample_crops(
    prepared_dir: str = "data/monuseg",
    output_dir: str = str(REPO / "bundles" / "allinsam" / "sample_data" / "monuseg_crops"),
    crops: tuple = DEFAULT_CROPS,
    size: int = 256,
) -> None:
    """Write ``size`` x ``size`` crops of prepared MoNuSeg cases and their ``datalist.json``."""
    prepared, output = Path(prepared_dir), Path(output_dir)
    datalist = {split: [] for split in SPLITS}
    for split, name, top, left in crops:
        window = (slice(top, top + size), slice(left, left + size))
        image = read_rgb_image(prepared / "cases" / "images" / f"{name}.png")[window]
        instances = relabel_sequential(read_instance_map(prepared / "cases" / "instances" / f"{name}.png")[window])
        crop_name = f"{name}_y{top}_x{left}"
        datalist[split].append(relative_entry(write_case(output, crop_name, image, instances), output))
        print(f"{split:<11}{crop_name}: {int(instances.max())} nuclei, {np.count_nonzero(instances)} nuclear pixels")
    write_json_atomic(output / "datalist.json", datalist)


if __name__ == "__main__":
    fire.Fire(make_sample_crops)
