"""ONNX Runtime's optimised graph, saved once per machine: the next start skips graph optimisation.

Creating a CPU session for ViT-B-16-plus-240 spends ~40 % of its time optimising the graph (fusions, NCHWc
layouts); ONNX Runtime can save the result (``optimized_model_filepath``) and load it with optimisation off, with
outputs bit-identical (docs/performance.md). The saved graph may use kernels of this CPU, so it is keyed by the
machine (registry.machine_key: CPU model + ISA flags, library versions) and by the sha256 of the bundle's visual.onnx::

    <engine_dir or bundle/engines>/onnxruntime-cpu-<machine key>/visual-<sha16>.opt.onnx   (+ .json: its sha256)

It is verified by sha256 on load like every bundle file; anything missing, stale or damaged is simply rebuilt,
and a read-only bundle runs without the cache. The folders of other machine keys are bounded (caches.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..bundle import VISUAL_ONNX, Bundle, BundleError, json_with_checksum, read_checked_json
from ..fileio import atomic_write_json, fsync_dir, sha256_file
from . import caches
from .cache_dir import engine_dir
from .config import EngineConfig
from .registry import machine_key

SHA_DIGITS = 16


class OptimizedGraphCache:
    def __init__(self, bundle: Bundle, config: EngineConfig):
        self.source = bundle.onnx_path
        self.source_sha256 = bundle.manifest.files[VISUAL_ONNX]
        self.engine_dir = engine_dir(bundle, config.engine_dir)
        self.bound = caches.CacheBound.from_env()  # read on every start, so a bad value is reported every time
        folder = caches.folder_for(self.engine_dir, caches.ORT_CPU)
        self.path = folder / f"visual-{self.source_sha256[:SHA_DIGITS]}.opt.onnx"
        self.sidecar = self.path.with_suffix(".json")
        self.pending: Path | None = None
        self.hit = False

    def _valid(self) -> bool:
        if not (self.path.is_file() and self.sidecar.is_file()):
            return False
        try:
            meta = read_checked_json(self.sidecar)
            return meta.get("source_sha256") == self.source_sha256 and sha256_file(self.path) == meta.get("file_sha256")
        except (BundleError, OSError):  # damaged, or removed meanwhile (the bound of another process's key)
            return False

    def prepare(self, options: Any) -> str:
        """The graph to load: the verified cached one (optimisation then off), or the source with ``options`` set to
        save the optimised graph (call :meth:`commit` once the session exists)."""
        import onnxruntime as ort

        if self._valid():
            self.hit = True
            caches.touch(self.path.parent)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return str(self.path)
        try:
            caches.make_folder(self.engine_dir, caches.ORT_CPU, self.bound)
        except OSError:
            return str(self.source)
        if os.access(self.path.parent, os.W_OK):
            self.pending = self.path.parent / f".{self.path.name}.{os.getpid()}.tmp"
            options.optimized_model_filepath = str(self.pending)
            options.log_severity_level = 3  # its "hardware specific" warning is why the file is keyed by machine
        return str(self.source)

    def abandon(self) -> None:
        """The session could not start with the cache: forget it (and the graph it may have begun to save)."""
        if self.pending is not None:
            self.pending.unlink(missing_ok=True)
            self.pending = None
        self.hit = False

    def commit(self) -> None:
        """Publish the optimised graph saved by the session (atomically, sidecar last)."""
        pending, self.pending = self.pending, None
        if pending is None or not pending.is_file():
            return
        try:
            sha = sha256_file(pending)
            os.replace(pending, self.path)
            fsync_dir(self.path.parent)
            atomic_write_json(self.sidecar, json_with_checksum({"source": VISUAL_ONNX, "source_sha256": self.source_sha256,
                                                                "file_sha256": sha, "machine_key": machine_key()}))
        except OSError:  # the folder went meanwhile (another key's bound) or the disk is full: this start runs as is
            pending.unlink(missing_ok=True)
            return
        caches.prune(self.engine_dir, caches.ORT_CPU, self.bound)  # again, with this cache's size (the size cap)
