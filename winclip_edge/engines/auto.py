"""``--backend auto``: the engine ``winclip-edge tune`` found fastest and faithful on this machine, else ONNX Runtime fp32.

With a precision (``EngineConfig(backend="auto", precision="fp32")``, the CLI's ``--precision fp32``) it is the
fastest engine of that precision ``tune`` accepted here -- for fp32 the fastest *exact* engine -- else ONNX Runtime
at that precision.

The tune record lives in the bundle, one file per machine (machine.py: CPU model + ISA flags, GPUs, inference
library versions), checksummed::

    bundle/tuning/<machine key>.json    ranked candidates with speed and fidelity, the winner, the tolerance

A record is used only on the machine (and library versions) it was measured on and only for the visual.onnx
it was measured with; anything else -- no record, another machine, a re-exported graph, a damaged file --
falls back to the exact default, and the reason says which.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..bundle import VISUAL_ONNX, Bundle, BundleError, read_checked_json
from ..performance.machine import machine_identity, machine_key
from .config import EngineConfig

TUNING_DIR = "tuning"
RECORD_FORMAT = 1
FALLBACK = EngineConfig(backend="onnxruntime", precision="fp32")


def record_path(bundle: Bundle, key: str | None = None) -> Path:
    return bundle.root / TUNING_DIR / f"{key or machine_key()}.json"


@dataclass(frozen=True)
class Selection:
    """What ``auto`` resolved to and why (the CLI prints ``reason``)."""

    config: EngineConfig
    reason: str
    record: dict | None  # the tune record it came from, None on fallback


def load_record(bundle: Bundle, key: str | None = None) -> dict:
    """This machine's tune record (checksum verified); BundleError when missing, damaged or for another graph."""
    path = record_path(bundle, key)
    if not path.is_file():
        others = sorted(p.stem for p in (bundle.root / TUNING_DIR).glob("*.json"))
        elsewhere = f" (records exist for other machines/library versions: {', '.join(others)})" if others else ""
        raise BundleError(f"no tune record for this machine ({machine_identity()['cpu']}, key {path.stem}){elsewhere}")
    record = read_checked_json(path, f"re-run `winclip-edge tune --bundle {bundle.root}`")
    if record.get("format") != RECORD_FORMAT or record.get("visual_sha256") != bundle.manifest.files[VISUAL_ONNX]:
        raise BundleError(f"{path} was measured with another visual.onnx or format; re-run `winclip-edge tune`")
    return record


def row_config(row: dict, base: EngineConfig) -> EngineConfig:
    """The EngineConfig of one candidate row of a tune record."""
    return replace(base, backend=row["backend"], precision=row["precision"], threads=int(row.get("threads", 0)),
                   performance_hint=row.get("performance_hint", base.performance_hint),
                   device=row.get("device", base.device), provider=row.get("provider", base.provider))


def fastest_accepted(record: dict, precision: str | None) -> dict | None:
    """The record's winner, or with ``precision`` its fastest accepted candidate of that precision (None: none)."""
    if precision is None:
        return record["winner"]
    rows = [c for c in record["candidates"] if c["status"] == "accepted" and c["precision"] == precision]
    return min(rows, key=lambda c: c["ms_per_image"]) if rows else None


def resolve(bundle: Bundle, config: EngineConfig) -> Selection:
    """``config`` unchanged unless its backend is ``auto``; then the tuned choice or the exact fallback.

    ``config.precision`` None: the tuned winner; a precision: the fastest accepted engine of that precision."""
    if config.backend != "auto":
        return Selection(config, f"{config.describe()} (asked for)", None)
    precision = config.precision
    fallback = replace(config, backend=FALLBACK.backend, precision=precision or FALLBACK.precision)
    default = "the exact default" if fallback.resolved_precision == "fp32" else "the default backend"
    try:
        record = load_record(bundle)
    except BundleError as err:
        return Selection(fallback, f"{fallback.describe()}, {default}: {err}; `winclip-edge tune --bundle "
                                   f"{bundle.root}` finds the fastest faithful engine here", None)
    row = fastest_accepted(record, precision)
    if row is None:
        return Selection(fallback, f"{fallback.describe()}, {default}: `winclip-edge tune` accepted no {precision} "
                                   f"engine on this machine", None)
    chosen = row_config(row, config)
    tol = record["tolerance"]
    what = "tuned winner" if precision is None else f"fastest {precision} engine `tune` measured"
    return Selection(chosen, f"{chosen.describe()}: {what} for this machine ({record['machine']['cpu']}, "
                             f"{record['date']}), {row['ms_per_image']:.0f} ms/image vs {record['reference_ms_per_image']:.0f} "
                             f"for onnxruntime fp32; scores within {row['score_max_abs']:.1e} (limit {tol['score']:.0e}), "
                             f"maps within {row['map_max_abs']:.1e} (limit {tol['map']:.0e}) of fp32", record)


__all__ = ["FALLBACK", "RECORD_FORMAT", "Selection", "TUNING_DIR", "fastest_accepted", "load_record", "record_path",
           "resolve", "row_config"]
