"""The TensorRT engine cache: which serialised engine belongs to which device, and refusing the others.

A TensorRT plan only runs on the GPU model and the TensorRT version that built it, and only computes
the graph it was built from. Every plan is therefore stored with a key: GPU name, compute capability,
TensorRT version, precision, sha256 of the bundle's ``visual.onnx`` and the batch profile. The key is
in the file name (readable) and in a sidecar JSON written atomically after the plan (authoritative:
a plan without its sidecar is never loaded)::

    <bundle>/engines/<gpu-slug>-sm<cc>-trt<version>-<precision>-<onnx sha8>-b<max batch>.plan
    <bundle>/engines/<same stem>.json       key, plan sha256, build settings

Pure Python (no TensorRT, no CUDA): the runtime and the builder ask the device for a
:class:`DeviceInfo` and hand it in, so every rule here is testable anywhere.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..fileio import atomic_write_bytes, atomic_write_json, sha256_file
from .base import EngineError
from .cache_dir import default_engine_dir
from .config import PRECISIONS

PLAN_SUFFIX = ".plan"
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = 1
SHORT_SHA = 8  # hex digits of the ONNX sha256 in a file name


class EngineCacheError(EngineError):
    """No usable engine for this device, or a cached engine that belongs to another device, graph or build."""


def slug(text: str) -> str:
    """File-name-safe lower-case form: 'NVIDIA GeForce RTX 4090' -> 'nvidia-geforce-rtx-4090'."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


@dataclass(frozen=True)
class DeviceInfo:
    """What the running machine offers; the part of the key a plan must match to be loadable here."""

    gpu: str  # device name as CUDA reports it, e.g. "Orin" or "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]  # (major, minor), e.g. (8, 7) for Jetson Orin
    trt_version: str  # tensorrt.__version__, e.g. "8.5.2.2"

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    def describe(self) -> str:
        return f"GPU '{self.gpu}' ({self.sm}), TensorRT {self.trt_version}"


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile of the dynamic batch axis: TensorRT tunes for ``opt`` and runs ``min..max``."""

    min: int = 1
    opt: int = 8
    max: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise EngineCacheError(f"batch profile needs 1 <= min <= opt <= max, got min={self.min}, "
                                   f"opt={self.opt}, max={self.max}; fix --opt-batch / --max-batch")

    def shapes(self, image_size: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of the ``images`` input, ``[N, H, W, 3]``."""
        h, w = image_size
        return (self.min, h, w, 3), (self.opt, h, w, 3), (self.max, h, w, 3)


@dataclass(frozen=True)
class EngineKey:
    """Everything a plan depends on. Two plans with the same key are interchangeable."""

    device: DeviceInfo
    precision: str  # fp32 | fp16 | int8
    onnx_sha256: str  # of the bundle's visual.onnx (manifest files entry)
    profile: BatchProfile

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineCacheError(f"precision {self.precision!r} unknown; choose one of {PRECISIONS}")

    @property
    def stem(self) -> str:
        d = self.device
        return (f"{slug(d.gpu)}-{d.sm}-trt{slug(d.trt_version)}-{self.precision}-"
                f"{self.onnx_sha256[:SHORT_SHA]}-b{self.profile.max}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineKey":
        device = dict(d["device"])
        device["compute_capability"] = tuple(device["compute_capability"])
        return cls(device=DeviceInfo(**device), precision=d["precision"], onnx_sha256=d["onnx_sha256"],
                   profile=BatchProfile(**d["profile"]))

    def mismatches(self, device: DeviceInfo, precision: str, onnx_sha256: str) -> list[str]:
        """How this plan differs from what the caller runs (empty: it fits), as readable phrases."""
        built, here = self.device, device
        out = []
        if built.gpu != here.gpu:
            out.append(f"built on GPU '{built.gpu}', this is '{here.gpu}'")
        if built.compute_capability != here.compute_capability:
            out.append(f"built for {built.sm}, this GPU is {here.sm}")
        if built.trt_version != here.trt_version:
            out.append(f"built with TensorRT {built.trt_version}, this is {here.trt_version}")
        if self.precision != precision:
            out.append(f"precision {self.precision}, asked for {precision}")
        if self.onnx_sha256 != onnx_sha256:
            out.append(f"built from another visual.onnx (sha256 {self.onnx_sha256[:12]}..., "
                       f"the bundle's is {onnx_sha256[:12]}...)")
        return out


@dataclass(frozen=True)
class CachedEngine:
    plan: Path
    key: EngineKey
    build: dict = field(default_factory=dict)  # build settings recorded by build-engine


def plan_path(engine_dir: str | Path, key: EngineKey) -> Path:
    return Path(engine_dir) / f"{key.stem}{PLAN_SUFFIX}"


def build_command(bundle_root: str | Path, precision: str, engine_dir: str | Path | None = None) -> str:
    """The command that makes the engine this device needs (quoted in every refusal)."""
    extra = f" --engine-dir {engine_dir}" if engine_dir is not None else ""
    return f"winclip-edge engine build --bundle {bundle_root} --precision {precision}{extra}"


def save_engine(engine_dir: str | Path, key: EngineKey, plan: bytes, build: dict) -> Path:
    """Write the plan, then its sidecar (both atomically): a crash in between leaves a plan that is never loaded."""
    path = plan_path(engine_dir, key)
    atomic_write_bytes(path, plan)
    sidecar = {"format": SIDECAR_FORMAT, "key": key.to_dict(), "plan_sha256": sha256_file(path),
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "build": build}
    atomic_write_json(path.with_suffix(SIDECAR_SUFFIX), sidecar)
    return path


def _read_sidecar(plan: Path) -> tuple[dict | None, str]:
    """(sidecar, '') or (None, why it cannot be used)."""
    path = plan.with_suffix(SIDECAR_SUFFIX)
    if not path.is_file():
        return None, "no sidecar JSON (not written by build-engine, or the build was interrupted)"
    try:
        sidecar = json.loads(path.read_text())
        if sidecar.get("format") != SIDECAR_FORMAT:
            return None, f"sidecar format {sidecar.get('format')!r}, this winclip-edge reads {SIDECAR_FORMAT}"
        EngineKey.from_dict(sidecar["key"])
        return sidecar, ""
    except (OSError, ValueError, KeyError, TypeError, EngineCacheError) as err:
        return None, f"unreadable sidecar ({type(err).__name__}: {err})"


def find_engine(engine_dir: str | Path, device: DeviceInfo, precision: str, onnx_sha256: str, bundle_root: str | Path,
                max_batch: int | None = None) -> CachedEngine:
    """The cached plan for this device, precision and graph; with several, the one with the largest max batch
    (or exactly ``max_batch``). Raises :class:`EngineCacheError` saying what is there, why it does not fit
    and which command builds the right one."""
    engine_dir = Path(engine_dir)
    custom_dir = None if engine_dir == default_engine_dir(bundle_root) else engine_dir
    how = f"build one on this device: {build_command(bundle_root, precision, custom_dir)}"
    plans = sorted(engine_dir.glob(f"*{PLAN_SUFFIX}")) if engine_dir.is_dir() else []
    fitting: list[CachedEngine] = []
    refused: list[str] = []
    for plan in plans:
        sidecar, why = _read_sidecar(plan)
        if sidecar is None:
            refused.append(f"{plan.name}: {why}")
            continue
        key = EngineKey.from_dict(sidecar["key"])
        reasons = key.mismatches(device, precision, onnx_sha256)
        if max_batch is not None and key.profile.max != max_batch:
            reasons.append(f"max batch {key.profile.max}, asked for {max_batch}")
        if reasons:
            refused.append(f"{plan.name}: " + "; ".join(reasons))
            continue
        if sha256_file(plan) != sidecar.get("plan_sha256"):
            raise EngineCacheError(f"{plan} fails its sha256 check (damaged or partly copied); delete it and {how}")
        fitting.append(CachedEngine(plan=plan, key=key, build=sidecar.get("build", {})))
    if fitting:
        return max(fitting, key=lambda c: c.key.profile.max)
    wanted = f"{device.describe()}, {precision}, visual.onnx {onnx_sha256[:12]}..."
    found = ("; found: " + " | ".join(refused)) if refused else f"; {engine_dir} holds no engine"
    raise EngineCacheError(f"no TensorRT engine for {wanted} in {engine_dir}{found}. "
                           f"Engines are specific to the GPU and TensorRT version: {how}")
