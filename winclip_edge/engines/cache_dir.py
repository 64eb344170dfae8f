"""The one folder where every backend keeps what it builds or caches for a bundle: ``<bundle>/engines``.

TensorRT plans (engine_cache.py), ONNX Runtime's optimised CPU graph (ort_cache.py) and its TensorRT provider's
caches, OpenVINO's compiled models: each backend keeps a sub-folder of its own here; the machine-keyed ones are
bounded (caches.py). ``--engine-dir`` / ``EngineConfig.engine_dir`` (a station file's ``engine.engine_dir``) moves
the whole folder, and so does the environment variable ``WINCLIP_ENGINE_DIR`` where neither is given: a read-only
bundle on a device keeps its caches on a writable disk without a flag on every command. Several bundles may share
one such folder: every file in it is named by the sha256 of the graph it was made from.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..bundle import Bundle

ENGINE_DIR = "engines"  # under the bundle
ENGINE_DIR_ENV = "WINCLIP_ENGINE_DIR"


def default_engine_dir(bundle: Bundle | str | os.PathLike) -> Path:
    """``<bundle>/engines``; ``bundle`` is a Bundle or its folder."""
    return Path(bundle.root if isinstance(bundle, Bundle) else bundle) / ENGINE_DIR


def engine_dir(bundle: Bundle | str | os.PathLike, configured: str | os.PathLike | None = None) -> Path:
    """The engine folder in use: ``configured`` (``--engine-dir``) when given, else ``$WINCLIP_ENGINE_DIR`` when set,
    else the bundle's own."""
    if configured is not None:
        return Path(configured)
    moved = os.environ.get(ENGINE_DIR_ENV, "").strip()
    return Path(moved).expanduser() if moved else default_engine_dir(bundle)


__all__ = ["ENGINE_DIR", "ENGINE_DIR_ENV", "default_engine_dir", "engine_dir"]
