"""Load test of the MONAI Label app on loopback: bursts of concurrent ``allinsam_box`` requests against the guarded
server (``scripts/serve_label.py``), each answer checked.

    python scripts/bench_label_server.py --requests 20 --concurrency 20 --max_queue 4
    python scripts/bench_label_server.py --output docs/results/label_server_load.json

Serves the shipped sample crops; every request asks for the SAM masks of one crop's first ``boxes`` boxes. An answer
is *correct* when it is the instance map of the first answer for that crop, a *clean refusal* when it is 503 with a
reason and ``Retry-After``; anything else is counted as an error. Prints throughput (answers per second over the
burst), p50 / p95 latency of the served and of the refused requests, and the counts.
"""

import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fire
import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
CROPS = REPO / "bundles" / "allinsam" / "sample_data" / "monuseg_crops"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50_s": None, "p95_s": None}
    return {"p50_s": round(float(np.percentile(seconds, 50)), 2), "p95_s": round(float(np.percentile(seconds, 95)), 2)}


def bench(requests_total: int = 20, concurrency: int = 20, max_queue: int = 4, max_wait_s: float = 120.0,
          boxes: int = 10, startup_timeout_s: float = 300.0, output: str | None = None) -> dict:
    """Start the server, send ``requests_total`` requests ``concurrency`` at a time, stop it; returns the figures."""
    crops = sorted(path.stem for path in (CROPS / "images").glob("*.png"))
    prompts = {name: json.loads((CROPS / "boxes" / f"{name}.json").read_text())["boxes"][:boxes] for name in crops}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as scratch, open(Path(scratch) / "server.log", "w") as log:
        studies = Path(scratch) / "studies"
        studies.mkdir()
        for name in crops:
            (studies / f"{name}.png").write_bytes((CROPS / "images" / f"{name}.png").read_bytes())
        server = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve_label.py"), "--studies", str(studies),
                                   "--port", str(port), "--max_queue", str(max_queue), "--max_wait_s", str(max_wait_s)],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + startup_timeout_s
            while True:
                try:
                    if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server not up:\n{(Path(scratch) / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
            expected = {}
            for name in crops:  # reference answers, one at a time
                answer = requests.post(f"{url}/infer/allinsam_box", params={"image": name, "output": "image"},
                                       data={"params": json.dumps({"boxes": prompts[name]})}, timeout=300)
                answer.raise_for_status()
                expected[name] = answer.content

            def ask(index: int) -> tuple[str, float]:
                name = crops[index % len(crops)]
                start = time.perf_counter()
                try:
                    answer = requests.post(f"{url}/infer/allinsam_box", params={"image": name, "output": "image"},
                                           data={"params": json.dumps({"boxes": prompts[name]})}, timeout=600)
                except requests.RequestException:
                    return "error", time.perf_counter() - start
                seconds = time.perf_counter() - start
                if answer.status_code == 200:
                    return ("correct" if answer.content == expected[name] else "wrong"), seconds
                if answer.status_code == 503 and answer.json().get("detail") and answer.headers.get("Retry-After"):
                    return "refused", seconds
                return "error", seconds

            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                outcomes = list(pool.map(ask, range(requests_total)))
            burst_s = time.perf_counter() - start
            still_up = requests.get(f"{url}/info/", timeout=10).status_code == 200
        finally:
            server.terminate()
            server.wait(timeout=60)
    counts = {kind: sum(outcome == kind for outcome, _ in outcomes)
              for kind in ("correct", "refused", "wrong", "error")}
    figures = {
        "requests": requests_total, "concurrency": concurrency, "max_queue": max_queue, "max_wait_s": max_wait_s,
        "boxes_per_request": boxes, "tile": "256x256 sample crops", "burst_s": round(burst_s, 1),
        "served_per_s": round(counts["correct"] / burst_s, 3), **counts, "server_up_after": still_up,
        "served": _percentiles([s for outcome, s in outcomes if outcome == "correct"]),
        "refused_latency": _percentiles([s for outcome, s in outcomes if outcome == "refused"]),
    }
    print(json.dumps(figures, indent=1))
    if output:
        Path(output).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    fire.Fire(bench, serialize=lambda result: None)
