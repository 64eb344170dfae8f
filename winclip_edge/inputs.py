"""Turning what a user names (files, folders, globs) into the list of images to read."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

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
