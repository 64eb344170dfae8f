"""Engine caches with a bound: what the engines keep per machine key in the engine folder, and how much of it stays.

Three backends cache what they make at start-up in a folder per machine key (registry.machine_key: CPU model and
ISA flags, GPUs, the engine libraries' versions)::

    <engine folder>/onnxruntime-cpu-<key>/        ONNX Runtime's optimised CPU graph (ort_cache.py)
    <engine folder>/openvino-<key>/               OpenVINO's compiled models (openvino.py)
    <engine folder>/onnxruntime-tensorrt-<key>/   ONNX Runtime's TensorRT-provider engines + timing cache

A package upgrade changes the key and the old folder is never read again; left alone, every upgrade would add a
copy (447 MiB for ViT-B-16-plus-240's optimised graph). So when a folder of a new key is made, and again once its
cache is written, the stale keys of that kind beyond the bound (:class:`CacheBound`) go: the ``keep`` most recently
used keys per kind stay (default 2: this machine's and one to roll a package downgrade back to), and under a size
cap the least recently used stale ones of any kind go until these caches together fit. This machine's key is
never removed by the bound (a running process may use it). A stale folder is renamed to a hidden tombstone first
and deleted after, so nobody sees half of one: a process of the old key starting meanwhile finds no cache (or
loses it mid-start) and builds its own again.

TensorRT plans (the files at the top of the folder, ``winclip-edge engine build``) are not bounded: they take
minutes to build, need the GPU, and are removed only when asked (``winclip-edge cache clear --kind tensorrt``).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ..performance.machine import KEY_DIGITS
from .base import EngineError
from .registry import machine_key

ORT_CPU, OPENVINO, ORT_TENSORRT = "onnxruntime-cpu", "openvino", "onnxruntime-tensorrt"
TENSORRT = "tensorrt"  # engine build's plans (+ sidecars) and its timing / calibration caches: not bounded
OTHER = "other"  # anything else in the folder (a plugin's): listed, never removed
KEYED_KINDS = {ORT_CPU: "ONNX Runtime's optimised CPU graph (remade at the next CPU start: seconds)",
               OPENVINO: "OpenVINO's compiled models (remade at the next start: seconds)",
               ORT_TENSORRT: "ONNX Runtime TensorRT provider's engines (remade at the next start: minutes)"}
KINDS = {**KEYED_KINDS, TENSORRT: "TensorRT plans of `winclip-edge engine build` and its timing / calibration "
                                  "caches (not bounded: made on the device by engine build, minutes each)"}
TENSORRT_SUFFIXES = (".plan", ".json", ".cache")
KEEP_ENV, MAX_MIB_ENV = "WINCLIP_ENGINE_CACHE_KEEP", "WINCLIP_ENGINE_CACHE_MAX_MIB"
DEFAULT_KEEP = 2  # this machine's key + one to roll a package downgrade back to
TOMBSTONE = ".trash-"  # prefix of a folder being deleted (hidden: never listed, never loaded)
MIB = 1 << 20
_KEYED = re.compile(rf"({'|'.join(map(re.escape, KEYED_KINDS))})-([0-9a-f]{{{KEY_DIGITS}}})")


@dataclass(frozen=True)
class CacheBound:
    """How many machine-keyed caches stay: ``keep`` keys per kind (this machine's included) and, when ``max_mib`` is
    set, at most that many MiB of them together (this machine's caches stay even when they alone exceed it)."""

    keep: int = DEFAULT_KEEP
    max_mib: float | None = None

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise EngineError(f"engine caches: keep {self.keep} < 1 (this machine's cache always stays); "
                              f"set {KEEP_ENV} to 1 or more")
        if self.max_mib is not None and self.max_mib < 0:
            raise EngineError(f"engine caches: size cap {self.max_mib} MiB < 0; set {MAX_MIB_ENV} to 0 or more, or unset it")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "CacheBound":
        """The bound set by ``WINCLIP_ENGINE_CACHE_KEEP`` / ``WINCLIP_ENGINE_CACHE_MAX_MIB`` (unset: the defaults)."""
        environ = os.environ if environ is None else environ
        keep, cap = environ.get(KEEP_ENV, "").strip(), environ.get(MAX_MIB_ENV, "").strip()
        try:
            value = int(keep) if keep else DEFAULT_KEEP
        except ValueError:
            raise EngineError(f"{KEEP_ENV}={keep!r} is not a whole number; set it to the caches to keep per kind "
                              f"(default {DEFAULT_KEEP})") from None
        try:
            max_mib = float(cap) if cap else None
        except ValueError:
            raise EngineError(f"{MAX_MIB_ENV}={cap!r} is not a number of MiB; set it (e.g. 1024) or unset it") from None
        return cls(keep=value, max_mib=max_mib)

    def describe(self) -> str:
        cap = "" if self.max_mib is None else f", at most {self.max_mib:g} MiB together"
        return f"the {self.keep} most recently used machine key(s) per kind{cap} ({KEEP_ENV}, {MAX_MIB_ENV})"


@dataclass(frozen=True)
class CacheEntry:
    """One cache in the engine folder: a machine-keyed folder, a TensorRT plan with its sidecar, or a builder cache."""

    kind: str  # a KINDS name or OTHER
    name: str  # the folder's name; for TensorRT files their common stem
    paths: tuple[Path, ...]  # what it consists of (a plan's sidecar first: a plan without it is never loaded)
    key: str | None  # the machine key of a keyed folder; None: not keyed (TensorRT files, older unkeyed folders)
    size: int  # bytes
    used: float  # modification time: when it was last written or loaded (touch)
    current: bool  # of this machine's key: in use here

    @property
    def stale(self) -> bool:
        """A machine-keyed cache of another key (or of no key): no process of this machine's versions reads it."""
        return self.kind in KEYED_KINDS and not self.current


def folder_for(engine_dir: str | os.PathLike, kind: str) -> Path:
    """This machine's folder of ``kind`` (a KEYED_KINDS name) in the engine folder."""
    return Path(engine_dir) / f"{kind}-{machine_key()}"


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed meanwhile
                continue
    return total


def list_caches(engine_dir: str | os.PathLike) -> list[CacheEntry]:
    """Every cache in ``engine_dir`` (hidden names, i.e. temporary files and tombstones, left out), by kind and name."""
    folder = Path(engine_dir)
    try:
        children = sorted(folder.iterdir())
    except OSError:  # no folder (yet)
        return []
    here = machine_key()
    entries: list[CacheEntry] = []
    files: dict[str, list[Path]] = {}
    for child in children:
        if child.name.startswith("."):
            continue
        try:
            if child.is_dir() and not child.is_symlink():
                match = _KEYED.fullmatch(child.name)
                kind, key = (match.group(1), match.group(2)) if match else \
                    (ORT_TENSORRT if child.name == ORT_TENSORRT else OTHER, None)  # the TensorRT provider's, before keys
                entries.append(CacheEntry(kind, child.name, (child,), key, _size(child), child.stat().st_mtime,
                                          key == here))
            elif child.suffix in TENSORRT_SUFFIXES:
                files.setdefault(child.stem, []).append(child)
            else:
                entries.append(CacheEntry(OTHER, child.name, (child,), None, _size(child), child.lstat().st_mtime, False))
        except OSError:  # removed while listing
            continue
    for stem, paths in files.items():
        paths.sort(key=lambda p: p.suffix != ".json")  # the sidecar goes first: a plan without it is never loaded
        try:
            entries.append(CacheEntry(TENSORRT, stem, tuple(paths), None, sum(_size(p) for p in paths),
                                      max(p.stat().st_mtime for p in paths), False))
        except OSError:
            continue
    return sorted(entries, key=lambda e: (list(KINDS).index(e.kind) if e.kind in KINDS else len(KINDS), e.name))


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # a file another process still holds open stays readable to it
    else:
        path.unlink(missing_ok=True)


def remove(entry: CacheEntry) -> bool:
    """Delete ``entry``: each path renamed to a hidden tombstone beside it (atomic: a reader finds the whole cache or
    none), then deleted. False where a path could not be renamed (a read-only folder)."""
    removed = True
    for path in entry.paths:
        tomb = path.parent / f"{TOMBSTONE}{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.rename(path, tomb)
        except FileNotFoundError:  # gone already (another process pruned it)
            continue
        except OSError:
            removed = False
            continue
        _delete(tomb)
    return removed


def sweep(engine_dir: str | os.PathLike) -> None:
    """Delete the tombstones a killed process left behind."""
    try:
        tombs = [p for p in Path(engine_dir).iterdir() if p.name.startswith(TOMBSTONE)]
    except OSError:
        return
    for tomb in tombs:
        try:
            _delete(tomb)
        except OSError:
            continue


def over_bound(entries: Iterable[CacheEntry], kind: str, bound: CacheBound) -> list[CacheEntry]:
    """The caches ``bound`` drops after a cache of ``kind`` was made here: stale keys of ``kind`` beyond the ``keep``
    most recently used keys (this machine's counts as one, older unkeyed folders always go), then, under the size
    cap, stale ones of every kind, least recently used first. Never a cache of this machine's key."""
    entries = [e for e in entries if e.kind in KEYED_KINDS]
    stale = sorted((e for e in entries if e.kind == kind and e.stale and e.key is not None),
                   key=lambda e: e.used, reverse=True)
    drop = [e for e in entries if e.kind == kind and e.key is None] + stale[bound.keep - 1:]
    if bound.max_mib is not None:
        total = sum(e.size for e in entries if e not in drop)
        for entry in sorted((e for e in entries if e.stale and e not in drop), key=lambda e: e.used):
            if total <= bound.max_mib * MIB:
                break
            drop.append(entry)
            total -= entry.size
    return drop


def prune(engine_dir: str | os.PathLike, kind: str, bound: CacheBound | None = None) -> list[CacheEntry]:
    """Apply the bound (default: :meth:`CacheBound.from_env`) to ``engine_dir`` after this machine made a cache of
    ``kind``; the caches removed."""
    bound = CacheBound.from_env() if bound is None else bound
    sweep(engine_dir)
    return [e for e in over_bound(list_caches(engine_dir), kind, bound) if remove(e)]


def make_folder(engine_dir: str | os.PathLike, kind: str, bound: CacheBound | None = None) -> tuple[Path, bool]:
    """This machine's folder of ``kind``, made when missing -> (folder, fresh). ``fresh`` (it was missing or empty: a
    cache is about to be written) prunes the stale keys first, so their space is free for it; call :func:`prune`
    again once it is written. Raises OSError where it cannot be made."""
    folder = folder_for(engine_dir, kind)
    try:
        fresh = not any(folder.iterdir())
    except OSError:
        fresh = True
    folder.mkdir(parents=True, exist_ok=True)
    if fresh:
        prune(engine_dir, kind, bound)
    return folder, fresh


def touch(folder: Path) -> None:
    """Mark a cache folder as just used (its modification time orders the bound); skipped where it is read-only."""
    try:
        os.utime(folder)
    except OSError:
        pass


__all__ = ["DEFAULT_KEEP", "KEEP_ENV", "KEYED_KINDS", "KINDS", "MAX_MIB_ENV", "OPENVINO", "ORT_CPU", "ORT_TENSORRT",
           "OTHER", "TENSORRT", "CacheBound", "CacheEntry", "folder_for", "list_caches", "make_folder", "over_bound",
           "prune", "remove", "sweep", "touch"]
