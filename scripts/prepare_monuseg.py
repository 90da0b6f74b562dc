"""Prepare MoNuSeg 2018 for the bundles: instance maps, binary masks, tight boxes, datalists, label fractions.

    python scripts/prepare_monuseg.py --source_dir ../shared/data/monuseg --output_dir data/monuseg

A thin command line over the bundle's ``prepare`` workflow (``scripts.data.prepare_dataset``, layout ``monuseg``),
which the bundle runs by itself as well::

    python -m monai.bundle run prepare --config_file bundles/allinsam/configs/prepare.json \
        --source_dir ../shared/data/monuseg --output_dir data/monuseg

The layout written, the split and the label fractions: ``bundles/allinsam/scripts/data/prepare.py``.
"""

import sys

import bundle_path  # noqa: F401  (puts the bundle's scripts package on sys.path)
import fire

from scripts.data.prepare import SPLITS, prepare_dataset, print_report, rasterise_polygons, relative_entry, write_case

__all__ = ["SPLITS", "prepare", "rasterise_polygons", "relative_entry", "write_case"]


def prepare(source_dir: str = "../shared/data/monuseg", output_dir: str = "data/monuseg",
            split_file: str | None = None, fractions: tuple[str, ...] = ("all", "4pct", "0.5pct"),
            seeds: tuple[int, ...] = (0,), patch_size: int = 200) -> dict:
    """Prepare MoNuSeg (``split_file`` default: ``split_lvit.json`` in ``source_dir``); returns the report."""
    report = prepare_dataset(source_dir, output_dir, "monuseg", split_file, fractions=fractions, seeds=seeds,
                             patch_size=patch_size)
    print_report(report, output_dir)
    return report


if __name__ == "__main__":
    try:
        fire.Fire(prepare, serialize=lambda report: None)  # the report is printed as a table already
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"prepare_monuseg: error: {error}")
