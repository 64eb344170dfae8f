"""ONNX Runtime's optimised graph, saved once per machine: the next start skips graph optimisation.

Creating a CPU session for ViT-B-16-plus-240 spends ~40 % of its time optimising the graph (fusions, NCHWc
layouts); ONNX Runtime can save the result (``optimized_model_filepath``) and load it with optimisation off, with
outputs bit-identical (docs/performance.md). The saved graph may use kernels of this CPU, so it is keyed by the
machine (registry.machine_key: CPU model + ISA flags, library versions) and by the sha256 of the bundle's visual.onnx::

    <engine_dir or bundle/engines>/onnxruntime-cpu-<machine key>/visual-<sha16>.opt.onnx   (+ .json: its sha256)

It is verified by sha256 on load like every bundle file; anything missing, stale or damaged is simply rebuilt,
and a read-only bundle runs without the cache.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..bundle import VISUAL_ONNX, Bundle, BundleError, json_with_checksum, read_checked_json
from ..fileio import atomic_write_json, fsync_dir, sha256_file
from .cache_dir import engine_dir
from .config import EngineConfig
from .registry import machine_key

PREFIX = "onnxruntime-cpu-"
SHA_DIGITS = 16


class OptimizedGraphCache:
    def __init__(self, bundle: Bundle, config: EngineConfig):
        self.source = bundle.onnx_path
        self.source_sha256 = bundle.manifest.files[VISUAL_ONNX]
        folder = engine_dir(bundle, config.engine_dir) / f"{PREFIX}{machine_key()}"
        self.path = folder / f"visual-{self.source_sha256[:SHA_DIGITS]}.opt.onnx"
        self.sidecar = self.path.with_suffix(".json")
        self.pending: Path | None = None
        self.hit = False

    def _valid(self) -> bool:
        if not (self.path.is_file() and self.sidecar.is_file()):
            return False
        try:
            meta = read_checked_json(self.sidecar)
        except BundleError:
            return False
        return meta.get("source_sha256") == self.source_sha256 and sha256_file(self.path) == meta.get("file_sha256")

    def prepare(self, options: Any) -> str:
        """The graph to load: the verified cached one (optimisation then off), or the source with ``options`` set to
        save the optimised graph (call :meth:`commit` once the session exists)."""
        import onnxruntime as ort

        if self._valid():
            self.hit = True
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return str(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return str(self.source)
        if os.access(self.path.parent, os.W_OK):
            self.pending = self.path.parent / f".{self.path.name}.{os.getpid()}.tmp"
            options.optimized_model_filepath = str(self.pending)
            options.log_severity_level = 3  # its "hardware specific" warning is why the file is keyed by machine
        return str(self.source)

    def commit(self) -> None:
        """Publish the optimised graph saved by the session (atomically, sidecar last)."""
        if self.pending is None or not self.pending.is_file():
            return
        sha = sha256_file(self.pending)
        os.replace(self.pending, self.path)
        fsync_dir(self.path.parent)
        atomic_write_json(self.sidecar, json_with_checksum({"source": VISUAL_ONNX, "source_sha256": self.source_sha256,
                                                            "file_sha256": sha, "machine_key": machine_key()}))
        self.pending = None
