"""Bearer-token check for every endpoint but /healthz, as a plain ASGI middleware.

A client sends ``Authorization: Bearer <token>``; a browser (the review page, whose <img> tags send no
headers) sends the ``winclip_token`` cookie, set by the small form ``/`` answers without it. The cookie is
SameSite=Strict, so another site cannot make the browser post with it. Compared in constant time.
"""
from __future__ import annotations

import hmac
import json
from http.cookies import SimpleCookie
from urllib.parse import unquote

OPEN_PATHS = frozenset({"/healthz"})
COOKIE = "winclip_token"

LOGIN_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>winclip-edge: token</title></head>
<body style="font-family:sans-serif;margin:3em"><h1>winclip-edge station</h1>
<p>This station requires its access token.</p>
<form id="f"><input id="t" type="password" size="40" autofocus placeholder="token"> <button>Open</button></form>
<script>document.getElementById("f").onsubmit=function(e){e.preventDefault();
document.cookie="winclip_token="+encodeURIComponent(document.getElementById("t").value)+"; path=/; SameSite=Strict";
location.reload();};</script></body></html>"""


def presented_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token a request carries (bearer header first, then the cookie), or None."""
    cookie_token = None
    for key, value in headers:
        if key == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return credentials.strip()
        elif key == b"cookie":
            morsel = SimpleCookie(value.decode("latin-1")).get(COOKIE)
            if morsel is not None:
                cookie_token = unquote(morsel.value).encode()
    return cookie_token


class TokenAuth:
    """ASGI middleware: 401 unless the request carries ``token`` (see the module docstring)."""

    def __init__(self, app, token: str, on_denied=None):
        self.app, self.token, self.on_denied = app, token.encode(), on_denied

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = presented_token(scope["headers"])
        if given is not None and hmac.compare_digest(given, self.token):
            return await self.app(scope, receive, send)
        if self.on_denied is not None:
            self.on_denied()
        if scope["path"] == "/" and scope["method"] == "GET":
            body, kind = LOGIN_PAGE, b"text/html; charset=utf-8"
        else:
            body = json.dumps({"error": "unauthorized", "detail": "missing or wrong bearer token "
                               "(send the header Authorization: Bearer <token>)"}).encode()
            kind = b"application/json"
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
