"""Serve the allinsam bundle in MONAI Label (``apps/allinsam``), on the loopback interface unless told otherwise.

    python scripts/serve_label.py --studies tiles/                          # http://127.0.0.1:8000
    python scripts/serve_label.py --studies tiles/ --bundle_path unpacked/allinsam --port 8010
    python scripts/serve_label.py --studies tiles/ --host 0.0.0.0           # reachable from other machines

It runs ``monailabel start_server`` (whose own default host is 0.0.0.0). Further ``--key value`` pairs go to the
app as ``--conf key value`` (e.g. ``--instances watershed``, ``--backbone vit_b --sam_checkpoint sam_vit_b.pth``).
"""

import os
import sys
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]


def serve(studies: str, bundle_path: str = str(REPO / "bundles" / "allinsam"),
          app_dir: str = str(REPO / "apps" / "allinsam"), host: str = "127.0.0.1", port: int = 8000, **conf) -> None:
    """Start the MONAI Label server on ``host:port`` with the tiles of ``studies`` (replaces this process)."""
    for name, folder in (("studies", studies), ("bundle_path", bundle_path), ("app_dir", app_dir)):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: not a folder (--{name})")
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(Path(app_dir).resolve()),
               "--studies", str(Path(studies).resolve()), "--host", host, "--port", str(port),
               "--conf", "bundle_path", str(Path(bundle_path).resolve())]
    for key, value in conf.items():
        command += ["--conf", key, str(value)]
    print(" ".join(command), flush=True)
    os.execv(sys.executable, command)


if __name__ == "__main__":
    fire.Fire(serve)
