"""The ``--http`` flags of ``winclip-edge serve`` (the station's HTTP face, docs/service.md); serve maps them onto the
station spec's ``[http]`` table (line/spec.py's HttpSpec)."""
from __future__ import annotations

import argparse

from .. import inputs
from ..errors import WinclipError
from ..line.build import TOKEN_ENV
from ..service.config import DEFAULT_PORT, KEEP_RESULTS, MAX_UPLOAD_MB, RESULT_TIMEOUT_S
from .common import CliError


def add_http_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP face (docs/service.md; needs the serve extra)")
    g.add_argument("--http", metavar="HOST:PORT", default=None,
                   help=f"serve the API, the review page and /metrics, e.g. 127.0.0.1:{DEFAULT_PORT} (loopback only unless "
                        "--token or --insecure)")
    g.add_argument("--token", default=None,
                   help=f"bearer token every endpoint but /healthz requires (default: ${TOKEN_ENV}; prefer the "
                        "environment variable: a flag shows in the process list)")
    g.add_argument("--token-file", metavar="FILE", default=None,
                   help="named tokens, one name:token per line (also $WINCLIP_TOKENS): verdicts, teach and rollback "
                        "record the name (chmod 600 the file)")
    g.add_argument("--insecure", action="store_true", help="allow a non-loopback --http without a token")
    g.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help=f"larger uploads get 413 before they are read (default {MAX_UPLOAD_MB:g})")
    g.add_argument("--request-timeout", type=float, default=RESULT_TIMEOUT_S,
                   help=f"seconds a request waits for its result (queue + engine) before 504 (default {RESULT_TIMEOUT_S:g})")
    g.add_argument("--keep-results", type=int, default=KEEP_RESULTS,
                   help=f"newest results kept for the review page and /v1/results (default {KEEP_RESULTS})")


def parse_host_port(text: str) -> tuple[str, int]:
    """--http's HOST:PORT (no default port: a listening address is always explicit)."""
    try:
        return inputs.parse_host_port(text)
    except WinclipError:
        raise CliError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT} or [::1]:{DEFAULT_PORT}") from None


def add_drift_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("drift (docs/service.md: per product, gauges in /metrics, alerts to MQTT and hooks)")
    g.add_argument("--drift-window", type=int, default=200, help="decisions and verdicts per product watched (default 200)")
    g.add_argument("--drift-min-samples", type=int, default=30,
                   help="observations a statistic needs before it is judged (default 30)")
    for flag, (on, off), what in (("false-alarm-rate", (0.10, 0.06), "share of reviewed goods that were flagged"),
                                  ("ks", (0.30, 0.20), "KS statistic of recent vs calibration scores"),
                                  ("share-above", (0.20, 0.12), "share of recent scores above the threshold")):
        g.add_argument(f"--drift-{flag}", metavar="ON[:OFF]|none", type=parse_limit, default=None,
                       help=f"alert when the {what} rises above ON, clear below OFF (default {on:g}:{off:g}; "
                            f"OFF defaults to {CLEAR_SHARE:g} x ON; none: not watched)")


CLEAR_SHARE = 0.6  # a --drift-* ON without :OFF clears at this share of ON


def parse_limit(text: str) -> tuple[float, float] | None:
    """``ON[:OFF]`` or ``none`` of a --drift-* flag."""
    if text.strip().lower() == "none":
        return None
    on, sep, off = text.partition(":")
    try:
        high = float(on)
        low = float(off) if sep else round(high * CLEAR_SHARE, 6)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ON[:OFF] (numbers in [0, 1]) or none, got {text!r}") from None
    return high, low
