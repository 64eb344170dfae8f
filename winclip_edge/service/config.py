"""What the HTTP face listens on and accepts, as data; safe by default (loopback, uploads bounded)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional

from ..errors import WinclipError

DEFAULT_PORT = 8080
MAX_UPLOAD_MB = 50.0
KEEP_RESULTS = 500
RESULT_TIMEOUT_S = 600.0


class ServiceError(WinclipError, RuntimeError):
    """The HTTP face cannot start as configured (unsafe bind, port taken, missing extra)."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; every other name counts as reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 = any free port (the bound one is on HttpService.port)
    token: Optional[str] = None  # bearer token every endpoint but /healthz requires (named "default"); None = no auth
    tokens: tuple = ()  # named tokens (auth.NamedToken: a token file, WINCLIP_TOKENS), required like ``token``
    insecure: bool = False  # allow a non-loopback bind without a token
    max_upload_mb: float = MAX_UPLOAD_MB
    keep_results: int = KEEP_RESULTS  # newest results the review store keeps (image, overlay, map, record)
    submit_timeout_s: float = 10.0  # how long a request waits for room in a full queue before 503
    # How long a request waits for its result before 504: queue + one engine batch. Generous by default: a big
    # model on a busy CPU takes many seconds per image (ViT-B-16+ at batch 8 on 2 shared cores: minutes).
    result_timeout_s: float = RESULT_TIMEOUT_S

    @property
    def auth(self) -> bool:
        """Requests must carry a token."""
        return self.token is not None or bool(self.tokens)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def check(self) -> None:
        """Refuse unsafe or impossible settings with one line that says what to do."""
        if not 0 <= self.port <= 65535:
            raise ServiceError(f"port {self.port} is out of range (0-65535)")
        if self.max_upload_mb <= 0:
            raise ServiceError(f"--max-upload-mb must be > 0, got {self.max_upload_mb}")
        if self.result_timeout_s <= 0:
            raise ServiceError(f"--request-timeout must be > 0, got {self.result_timeout_s}")
        if self.keep_results < 1:
            raise ServiceError(f"--keep-results must be >= 1, got {self.keep_results}")
        if self.token is not None and not self.token.strip():
            raise ServiceError("the token is empty; give a long random one (e.g. `openssl rand -hex 32`)")
        if not is_loopback(self.host) and not self.auth and not self.insecure:
            raise ServiceError(f"--http {self.host}:{self.port} is reachable from other machines: give --token "
                               "(or WINCLIP_TOKEN) or --token-file so requests must carry one, or --insecure to serve "
                               "without auth")
