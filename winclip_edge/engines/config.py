"""What engine to run, as data: the one object the faces (CLI, service, Python callers) hand to the library.

Four fields every backend understands (backend, precision, and the common ``threads`` / ``device`` /
``engine_dir``, each taken by the backends its record names), plus ``options``: an instance of the chosen backend's
own options dataclass (``OnnxRuntimeOptions(provider="cuda")``, ``OpenVinoOptions(performance_hint="throughput")``,
...), defined in that backend's module. A field or an options type that the backend does not take is an error
naming it, never silently ignored (registry.check_config).

``backend="auto"`` (the default, for Python as for the CLI) is resolved once, by ``engines.auto.select``: the backend
whose ``options`` are given, else the winner ``winclip-edge engine tune`` recorded for this machine, else ONNX Runtime fp32.
So ``Inspector(bundle, product, engine=EngineConfig(precision="int8"))`` gets what ``--precision int8`` gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

PRECISIONS = ("fp32", "fp16", "int8")  # what ONNX variants and TensorRT plans are made in
AUTO = "auto"
# The fields every backend may take (its record's ``takes``), with the value that means "not set".
COMMON_DEFAULTS = {"threads": 0, "device": AUTO, "engine_dir": None}
COMMON_FIELDS = tuple(COMMON_DEFAULTS)


@dataclass(frozen=True)
class EngineConfig:
    backend: str = AUTO  # a registered backend (engines/registry.py) or auto (engines/auto.py)
    precision: Optional[str] = None  # fp32 | bf16 | fp16 | int8; None = the backend's default (fp16 tensorrt, else fp32)
    threads: int = 0  # intra-op threads of a CPU backend; 0 = the library's default
    device: str = AUTO  # where the graph runs: auto | cpu | cuda | cuda:<i> | gpu | npu (each backend checks its own)
    engine_dir: Optional[Path] = None  # where a backend keeps what it builds or caches ($WINCLIP_ENGINE_DIR, else <bundle>/engines)
    options: Optional[Any] = None  # the backend's own options dataclass; None = its defaults

    def common_given(self) -> tuple[str, ...]:
        """The common fields set to something other than "not set", in COMMON_FIELDS order."""
        return tuple(f for f in COMMON_FIELDS if getattr(self, f) != COMMON_DEFAULTS[f])


__all__ = ["AUTO", "COMMON_DEFAULTS", "COMMON_FIELDS", "EngineConfig", "PRECISIONS"]
