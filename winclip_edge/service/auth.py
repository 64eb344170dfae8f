"""Bearer-token check for every endpoint but /healthz, as a plain ASGI middleware; tokens have names.

A client sends ``Authorization: Bearer <token>``; a browser (the review page, whose <img> tags send no
headers) sends the ``winclip_token`` cookie, set by the small form ``/`` answers without it. The cookie is
SameSite=Strict, so another site cannot make the browser post with it. Compared in constant time.

Every token has a name (an operator, a line PC): a token file of ``name:token`` lines (``--token-file``) or the
variable ``WINCLIP_TOKENS`` (``name:token`` entries separated by commas or white space); the single ``--token`` /
``WINCLIP_TOKEN`` is named ``default``. The request's ``scope["state"]["operator"]`` is the name of the token it
carried: verdicts and teach record that name, never the token.
"""
from __future__ import annotations

import hmac
import json
import os
import re
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote

from ..review import OPERATOR
from .config import ServiceError

OPEN_PATHS = frozenset({"/healthz"})
COOKIE = "winclip_token"
DEFAULT_NAME = "default"  # the name of the single --token / WINCLIP_TOKEN
TOKENS_ENV = "WINCLIP_TOKENS"


@dataclass(frozen=True)
class NamedToken:
    name: str
    token: str = field(repr=False)  # never printed


def parse_tokens(text: str, where: str, separators: str = r"\n") -> tuple[NamedToken, ...]:
    """``name:token`` entries of ``text`` (split on ``separators``; blank entries and ``#`` comment lines skipped).
    Refused with the entry's line/position (never the token) when an entry has no name or token, a name is invalid
    or used twice, or two names share a token (a verdict must name one person)."""
    tokens, names, secrets = [], set(), {}
    for number, entry in enumerate(re.split(separators, text), 1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        name, colon, token = entry.partition(":")
        name, token = name.strip(), token.strip()
        if not colon or not token:
            raise ServiceError(f"{where}, entry {number}: expected name:token")
        if not OPERATOR.fullmatch(name):
            raise ServiceError(f"{where}, entry {number}: invalid name {name!r} (letters, digits, '_', '.', '@', '-')")
        if name in names:
            raise ServiceError(f"{where}, entry {number}: the name {name!r} is given twice")
        if token in secrets:
            raise ServiceError(f"{where}, entry {number}: {name!r} has the same token as {secrets[token]!r}; "
                               "give every name its own token")
        names.add(name)
        secrets[token] = name
        tokens.append(NamedToken(name, token))
    if not tokens:
        raise ServiceError(f"{where} names no token (lines name:token)")
    return tuple(tokens)


def load_token_file(path: str | os.PathLike) -> tuple[NamedToken, ...]:
    """The named tokens of a token file (one ``name:token`` per line; keep it readable by the station's user only)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ServiceError(f"token file {path} cannot be read ({err})") from None
    return parse_tokens(text, f"token file {path}")


def tokens_from_env(environ: dict | None = None) -> tuple[NamedToken, ...]:
    """The named tokens of ``WINCLIP_TOKENS`` (entries separated by commas or white space), or () when unset."""
    value = (os.environ if environ is None else environ).get(TOKENS_ENV, "")
    return parse_tokens(value, TOKENS_ENV, r"[,\s]+") if value.strip() else ()


def identify(tokens: Sequence[NamedToken], presented: bytes | None) -> str | None:
    """The name of the token ``presented`` is, or None. Every token is compared (in constant time each), so the
    time taken says nothing about which one matched or how much of one."""
    if presented is None:
        return None
    name = None
    for entry in tokens:
        if hmac.compare_digest(presented, entry.token.encode()):
            name = entry.name
    return name

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
    """ASGI middleware: 401 unless the request carries ``token`` or one of ``tokens`` (see the module docstring);
    the name of the token is put in ``scope["state"]["operator"]``."""

    def __init__(self, app, token: str | None = None, on_denied=None, tokens: Sequence[NamedToken] = ()):
        self.app, self.on_denied = app, on_denied
        self.tokens = tuple(tokens) + ((NamedToken(DEFAULT_NAME, token),) if token is not None else ())
        if not self.tokens:
            raise ServiceError("TokenAuth needs a token")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        name = identify(self.tokens, presented_token(scope["headers"]))
        if name is not None:
            scope.setdefault("state", {})["operator"] = name
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
