"""Shared fixtures. Tests that need the real MoNuSeg folder skip cleanly when it is absent."""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "allinsam"
SAMPLE_CROPS = BUNDLE / "sample_data" / "monuseg_crops"
MONUSEG = Path(os.environ.get("MONUSEG_DIR", REPO.parent / "shared" / "data" / "monuseg"))

# the bundle's ``scripts`` package and the repository's command lines (scripts/ is no package: no name clash)
sys.path.insert(0, str(BUNDLE))
sys.path.insert(0, str(REPO / "scripts"))


@pytest.fixture(scope="session")
def monuseg_dir() -> Path:
    if not (MONUSEG / "split_lvit.json").is_file():
        pytest.skip(f"real MoNuSeg not found at {MONUSEG} (set MONUSEG_DIR)")
    return MONUSEG


@pytest.fixture(scope="session")
def prepared_monuseg(monuseg_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The whole MoNuSeg set prepared once: (output folder, report)."""
    from prepare_monuseg import prepare

    output = tmp_path_factory.mktemp("monuseg_prepared")
    return output, prepare(source_dir=str(monuseg_dir), output_dir=str(output))


@pytest.fixture(scope="session")
def sample_datalist() -> dict:
    return json.loads((SAMPLE_CROPS / "datalist.json").read_text())
