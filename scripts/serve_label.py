"""Serve the allinsam bundle in MONAI Label (``apps/allinsam``), on the loopback interface unless told otherwise.

    python scripts/serve_label.py --studies tiles/                          # http://127.0.0.1:8000
    python scripts/serve_label.py --studies tiles/ --bundle_path unpacked/allinsam --port 8010
    python scripts/serve_label.py --studies tiles/ --host 0.0.0.0           # other machines: with a token

It runs ``monailabel start_server`` (whose own default host is 0.0.0.0) with the app's guards
(``apps/allinsam/guarded_server.py``): bound beyond loopback, every request needs ``Authorization: Bearer <token>``;
the token is ``--token``, else ``$ALLINSAM_LABEL_TOKEN``, else a new random one printed at start. Inference runs one
request at a time behind a queue of ``--max_queue`` requests waiting at most ``--max_wait_s`` seconds (503 beyond).
Further ``--key value`` pairs go to the app as ``--conf key value`` (e.g. ``--instances watershed``,
``--backbone vit_b --sam_checkpoint sam_vit_b.pth``).
"""

import ipaddress
import os
import secrets
import sys
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
TOKEN_VARIABLE = "ALLINSAM_LABEL_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is the loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


def server_command(studies: str, bundle_path: str, app_dir: str, host: str, port: int, token: str | None,
                   max_queue: int, max_wait_s: float, conf: dict) -> tuple[list[str], dict[str, str]]:
    """The ``monailabel start_server`` command line and its environment; a token is made when ``host`` is not
    loopback and none was given."""
    for name, folder in (("studies", studies), ("bundle_path", bundle_path), ("app_dir", app_dir)):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: not a folder (--{name})")
    token = token or os.environ.get(TOKEN_VARIABLE) or (None if is_loopback(host) else secrets.token_urlsafe(24))
    app = str(Path(app_dir).resolve())
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [app, os.environ.get("PYTHONPATH")])),
                   "ALLINSAM_LABEL_MAX_QUEUE": str(max_queue), "ALLINSAM_LABEL_MAX_WAIT_S": str(max_wait_s)}
    environment.pop(TOKEN_VARIABLE, None)
    if token:
        environment[TOKEN_VARIABLE] = token
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", app,
               "--studies", str(Path(studies).resolve()), "--host", host, "--port", str(port),
               "--uvicorn_app", "guarded_server:app", "--conf", "bundle_path", str(Path(bundle_path).resolve())]
    for key, value in conf.items():
        command += ["--conf", key, str(value)]
    return command, environment


def serve(studies: str, bundle_path: str = str(REPO / "bundles" / "allinsam"),
          app_dir: str = str(REPO / "apps" / "allinsam"), host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, max_queue: int = 4, max_wait_s: float = 120.0, **conf) -> None:
    """Start the MONAI Label server on ``host:port`` with the tiles of ``studies`` (replaces this process)."""
    token = None if token is None else str(token)  # fire reads a numeric token as a number
    command, environment = server_command(studies, bundle_path, app_dir, host, port, token, max_queue, max_wait_s, conf)
    print(" ".join(command), flush=True)
    if TOKEN_VARIABLE in environment:
        print(f"Requests need the header 'Authorization: Bearer {environment[TOKEN_VARIABLE]}'", flush=True)
    os.execve(sys.executable, command, environment)


if __name__ == "__main__":
    fire.Fire(serve)
