"""MONAI Label's web app with the allinsam app's guards, served by ``scripts/serve_label.py``
(``monailabel start_server --uvicorn_app guarded_server:app``).

- **Token**: with ``ALLINSAM_LABEL_TOKEN`` set, every request needs ``Authorization: Bearer <token>`` (else 401).
  ``serve_label.py`` sets one (and prints it) whenever the server binds beyond loopback. MONAI Label's own
  authentication needs a Keycloak server, which a lab laptop does not have.
- **Bounded queue**: inference (``/infer/...``) runs one request at a time; at most ``ALLINSAM_LABEL_MAX_QUEUE``
  requests wait (default 4) and none longer than ``ALLINSAM_LABEL_MAX_WAIT_S`` seconds (default 120). Beyond
  either the answer is 503 with ``Retry-After``, so a burst cannot pile up minutes of work. A request that has
  started runs to its end (a running inference cannot be stopped safely).
- **Malformed JSON** in a ``params`` form field answers 422 (MONAI Label's endpoints answer 500).
"""

import asyncio
import hmac
import json
import os
import time

from monailabel.app import app as monailabel_app
from starlette.responses import JSONResponse

TOKEN_VARIABLE = "ALLINSAM_LABEL_TOKEN"
MAX_QUEUE_VARIABLE = "ALLINSAM_LABEL_MAX_QUEUE"
MAX_WAIT_VARIABLE = "ALLINSAM_LABEL_MAX_WAIT_S"
QUEUED_PATHS = ("/infer/",)


async def _malformed_json(request, error: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": f"params is not valid JSON: {error}"})


class RequestGuard:
    """ASGI middleware: a bearer token (when set) on every request, and one-at-a-time inference behind a bounded,
    time-limited queue.

    Args:
        app: the ASGI app guarded.
        token: the required bearer token; None or empty = no token (loopback use).
        max_queue: requests that may wait for the inference slot; one more is refused with 503.
        max_wait_s: seconds a request may wait for the slot before it is refused with 503.
    """

    def __init__(self, app, token: str | None = None, max_queue: int = 4, max_wait_s: float = 120.0):
        self.app, self.token, self.max_queue, self.max_wait_s = app, token or None, max_queue, max_wait_s
        self.waiting = 0
        self.slot: asyncio.Lock | None = None  # made in the server's event loop

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.token and not self._authorised(scope):
            return await JSONResponse(status_code=401, content={"detail": "missing or wrong bearer token"},
                                      headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if not scope["path"].startswith(QUEUED_PATHS):
            return await self.app(scope, receive, send)
        self.slot = self.slot or asyncio.Lock()
        if self.slot.locked() and self.waiting >= self.max_queue:
            return await self._busy(scope, receive, send, f"{self.waiting} requests are already waiting")
        self.waiting += 1
        start = time.monotonic()
        try:
            await asyncio.wait_for(self.slot.acquire(), timeout=self.max_wait_s)
        except asyncio.TimeoutError:
            return await self._busy(scope, receive, send, f"waited {time.monotonic() - start:.0f} s for the model")
        finally:
            self.waiting -= 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.slot.release()

    def _authorised(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    async def _busy(self, scope, receive, send, reason: str):
        answer = JSONResponse(status_code=503, content={"detail": f"busy: {reason}; retry later"},
                              headers={"Retry-After": str(max(1, round(self.max_wait_s / 4)))})
        await answer(scope, receive, send)


monailabel_app.add_exception_handler(json.JSONDecodeError, _malformed_json)
app = RequestGuard(monailabel_app, token=os.environ.get(TOKEN_VARIABLE),
                   max_queue=int(os.environ.get(MAX_QUEUE_VARIABLE, 4)),
                   max_wait_s=float(os.environ.get(MAX_WAIT_VARIABLE, 120)))
