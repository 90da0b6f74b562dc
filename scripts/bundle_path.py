"""Puts the allinsam bundle's ``scripts`` package on ``sys.path`` for the repository's command lines, which import it
with ``import bundle_path`` before ``from scripts.<module> import ...`` (the one place the path is set)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "allinsam"
if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))
