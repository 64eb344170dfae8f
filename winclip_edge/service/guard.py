"""Request bodies at the edge of the HTTP face: bounded for every route, and never left half-read behind an answer.

A server that answers before it has read the request body (a 413 refused from ``Content-Length``, a 401, a 404
for an unknown product) and then closes the connection while the client is still sending leaves unread bytes in
the kernel's receive buffer; closing such a socket sends a TCP reset instead of a FIN, and the client's kernel
may throw away the answer that was already on its way: the client sees "connection reset" instead of the 413.
Uvicorn closes after the answer whenever the request said ``Connection: close`` (urllib, HTTP/1.0 clients) or
the server is shutting down, so on a loaded machine a 2 MB upload against a 1 MB limit was sometimes reset.

:class:`BodyGuard` wraps the whole app (outside the token check) and makes every early answer clean:

- a declared ``Content-Length`` over the limit is answered 413 without calling the app;
- before any answer starts, a body the app did not read to its end is read and thrown away, up to
  ``drain_bytes`` more and ``drain_s`` seconds: then the answer goes out on a connection with nothing unread,
  and keep-alive goes on;
- a body too long to drain (or a client that announced ``Expect: 100-continue`` and waits for permission to
  send) gets its answer with ``Connection: close``: nothing more is read, and the client learns why.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable, Optional

DRAIN_BYTES = 16 * 2**20  # read and discard at most this much of a refused body
DRAIN_S = 5.0  # ... for at most this long


def _too_large(limit: int) -> bytes:
    return json.dumps({"error": "too_large", "detail": f"the upload is over the limit of {limit / 2**20:g} MiB "
                                                        "(--max-upload-mb)"}).encode()


def _header(scope: dict, name: bytes) -> Optional[bytes]:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class BodyGuard:
    """ASGI middleware: see the module docstring. ``limit``: the most body bytes any request may declare;
    ``on_refused()`` counts a 413 it answers itself."""

    def __init__(self, app: Any, limit: int, on_refused: Optional[Callable[[], None]] = None,
                 drain_bytes: int = DRAIN_BYTES, drain_s: float = DRAIN_S):
        self.app, self.limit, self.on_refused = app, limit, on_refused
        self.drain_bytes, self.drain_s = drain_bytes, drain_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        chunked = _header(scope, b"transfer-encoding") is not None
        expects = (_header(scope, b"expect") or b"").lower() == b"100-continue"
        state = {"ended": not chunked and not declared, "started": False}  # no body at all: nothing to drain

        async def tracked() -> dict:
            message = await receive()
            state["started"] = True
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                state["ended"] = True
            return message

        async def guarded(message: dict) -> None:
            if message["type"] == "http.response.start" and not state["ended"]:
                if not await self._drain(tracked, state, declared, expects):
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        if declared is not None and declared > self.limit:
            if self.on_refused is not None:
                self.on_refused()
            body = _too_large(self.limit)
            await guarded({"type": "http.response.start", "status": 413,
                           "headers": [(b"content-type", b"application/json"),
                                       (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, tracked, guarded)

    async def _drain(self, receive: Callable, state: dict, declared: Optional[int], expects: bool) -> bool:
        """Read the rest of the body and drop it; True when it ended (the connection can stay open)."""
        if expects and not state["started"]:
            return False  # the client waits for "100 Continue" before sending: do not invite the body
        if declared is not None and declared > self.drain_bytes + self.limit:
            return False  # not worth reading: answer now and close
        deadline = time.monotonic() + self.drain_s
        drained = 0
        try:
            while not state["ended"] and drained <= self.drain_bytes:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
                drained += len(message.get("body", b""))
        except asyncio.TimeoutError:
            return False
        return state["ended"]


__all__ = ["BodyGuard", "DRAIN_BYTES", "DRAIN_S"]
