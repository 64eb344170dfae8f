"""The one folder where every backend keeps what it builds or caches for a bundle: ``<bundle>/engines``.

TensorRT plans (engine_cache.py), ONNX Runtime's optimised CPU graph (ort_cache.py) and its TensorRT provider's
caches, OpenVINO's compiled models: each backend keeps a sub-folder of its own here. ``--engine-dir`` /
``EngineConfig.engine_dir`` moves the whole folder (a read-only bundle, a faster disk).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..bundle import Bundle

ENGINE_DIR = "engines"  # under the bundle


def default_engine_dir(bundle: Bundle | str | os.PathLike) -> Path:
    """``<bundle>/engines``; ``bundle`` is a Bundle or its folder."""
    return Path(bundle.root if isinstance(bundle, Bundle) else bundle) / ENGINE_DIR


def engine_dir(bundle: Bundle | str | os.PathLike, configured: str | os.PathLike | None = None) -> Path:
    """The engine folder in use: ``configured`` (``--engine-dir``) when given, else the bundle's own."""
    return Path(configured) if configured is not None else default_engine_dir(bundle)


__all__ = ["ENGINE_DIR", "default_engine_dir", "engine_dir"]
