"""Turning what a user names into what the library reads: files, folders and globs into image paths;
``HOST:PORT`` into an address."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

from .errors import WinclipError
from .preprocess import IMAGE_EXTENSIONS


def collect_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, folders (image files below them, sorted) and globs. Unmatched names are kept, so they get an error row."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.exists():
            out.append(item)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            out += [m for m in matches if Path(m).is_file()] if matches else [item]
    return out


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6), or ``HOST`` alone when there is a default port -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep and default_port is not None:
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WinclipError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)
