"""Which engine a config means, decided once, in the library: :func:`select` returns the engine's config and why.

``backend="auto"`` (the default of EngineConfig and of the CLI) is resolved here and nowhere else:

1. ``options`` of backend X given (``OnnxRuntimeOptions(provider="cuda")``, the CLI's ``--provider cuda``): X.
2. common fields given (``threads``, ``device``, ``engine_dir``): the tune winner when its backend takes them and
   names that device (the given values replace the row's), else the first backend in the default order
   (registry.BUILTINS, ONNX Runtime first) that does.
3. else the engine ``winclip-edge engine tune`` found fastest and faithful on this machine, else ONNX Runtime fp32. With a
   precision (``EngineConfig(precision="fp32")``, ``--precision fp32``) it is the fastest engine of that precision
   ``tune`` accepted here -- for fp32 the fastest *exact* engine -- else ONNX Runtime at that precision.

The tune record lives in the bundle, one file per machine (registry.machine_key: CPU model + ISA flags, GPUs,
inference library versions), checksummed::

    bundle/tuning/<machine key>.json    ranked candidates with speed and fidelity, the winner, the tolerance

A record is used only on the machine (and library versions) it was measured on and only for the visual.onnx
it was measured with; anything else -- no record, another machine, a re-exported graph, a damaged file --
falls back to the exact default, and the reason says which.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..bundle import VISUAL_ONNX, Bundle, BundleError, read_checked_json
from .base import Engine, EngineError
from .config import AUTO, EngineConfig
from .registry import (
    BUILTINS,
    BackendRecord,
    backend,
    check_config,
    describe,
    machine_identity,
    machine_key,
    options_from_values,
    options_values,
    owner_of,
    resolved,
)

TUNING_DIR = "tuning"
RECORD_FORMAT = 1
FALLBACK = EngineConfig(backend="onnxruntime", precision="fp32")
Namer = Callable[[str], str]  # an EngineConfig field name -> how the caller calls it (the CLI: its flag)


def _same(name: str) -> str:
    return name


@dataclass(frozen=True)
class Selection:
    """What a config resolved to and why (the CLI prints ``explain(flag_name)``); ``create`` makes the engine."""

    config: EngineConfig  # the engine's config: a concrete backend, its precision filled in
    reason: str
    record: dict | None  # the tune record it came from, None when none was used
    backend: BackendRecord
    wording: Callable[[Namer], str] | None = field(default=None, compare=False, repr=False)

    def explain(self, name: Namer = _same) -> str:
        """``reason`` with the config's field names as ``name`` calls them (``threads`` -> ``--threads``)."""
        return self.wording(name) if self.wording is not None else self.reason

    def create(self, bundle: Bundle) -> Engine:
        """The engine, after refusing what the backend would otherwise ignore (registry.check_config)."""
        check_config(self.backend, self.config)
        return self.backend.create(bundle, self.config)


def _selection(config: EngineConfig, record: dict | None, wording: Callable[[Namer], str]) -> Selection:
    return Selection(config, wording(_same), record, backend(config.backend), wording)


def record_path(bundle: Bundle, key: str | None = None) -> Path:
    return bundle.root / TUNING_DIR / f"{key or machine_key()}.json"


def load_record(bundle: Bundle, key: str | None = None) -> dict:
    """This machine's tune record (checksum verified); BundleError when missing, damaged or for another graph."""
    path = record_path(bundle, key)
    if not path.is_file():
        others = sorted(p.stem for p in (bundle.root / TUNING_DIR).glob("*.json"))
        elsewhere = f" (records exist for other machines/library versions: {', '.join(others)})" if others else ""
        raise BundleError(f"no tune record for this machine ({machine_identity()['cpu']}, key {path.stem}){elsewhere}")
    record = read_checked_json(path, f"re-run `winclip-edge engine tune --bundle {bundle.root}`")
    if record.get("format") != RECORD_FORMAT or record.get("visual_sha256") != bundle.manifest.files[VISUAL_ONNX]:
        raise BundleError(f"{path} was measured with another visual.onnx or format; re-run `winclip-edge engine tune`")
    return record


def config_row(config: EngineConfig) -> dict:
    """How a candidate's config is written into a tune record: backend, precision, the common fields the record
    keeps, and the backend's own options (their defaults where none were given)."""
    return {"backend": config.backend, "precision": resolved(config).precision, "threads": config.threads,
            "device": config.device, **options_values(backend(config.backend), config.options)}


def row_config(row: dict) -> EngineConfig:
    """The EngineConfig of one candidate row of a tune record (rows of earlier versions, which carried every
    backend's fields, read the same)."""
    record = backend(row["backend"])
    return EngineConfig(backend=row["backend"], precision=row["precision"], threads=int(row.get("threads", 0)),
                        device=row.get("device", "auto"), options=options_from_values(record, row))


def fastest_accepted(record: dict, precision: str | None) -> dict | None:
    """The record's winner, or with ``precision`` its fastest accepted candidate of that precision (None: none)."""
    if precision is None:
        return record["winner"]
    rows = [c for c in record["candidates"] if c["status"] == "accepted" and c["precision"] == precision]
    return min(rows, key=lambda c: c["ms_per_image"]) if rows else None


def _takes(record: BackendRecord, config: EngineConfig, given: tuple[str, ...]) -> bool:
    return all(f in record.takes for f in given) and record.accepts_device(config.device)


def _names(given: tuple[str, ...], name: Namer) -> str:
    return ", ".join(name(f) for f in given)


def _options_backend(config: EngineConfig) -> Selection:
    """Rule 1: the backend whose options are given."""
    owner = owner_of(config.options)
    if owner is None:
        raise EngineError(f"{type(config.options).__name__} is the options type of no backend here; give the "
                          "options of the backend you mean (e.g. OnnxRuntimeOptions) or name it in backend")
    chosen = replace(config, backend=owner.name, precision=config.precision or owner.default_precision)
    defaults = owner.options()
    given = tuple(f.name for f in owner.option_fields() if getattr(config.options, f.name) != getattr(defaults, f.name))

    def wording(name: Namer) -> str:
        what = _names(given, name) if given else f"{owner.name} options"
        return f"{describe(chosen)} ({what} given without {name('backend')})"

    return _selection(chosen, None, wording)


def select(bundle: Bundle, config: EngineConfig) -> Selection:
    """The engine ``config`` means on this machine, and why (the rules of the module docstring)."""
    if config.backend != AUTO:
        chosen = resolved(config)
        return _selection(chosen, None, lambda name: f"{describe(chosen)} (asked for)")
    if config.options is not None:
        return _options_backend(config)
    given, precision = config.common_given(), config.precision
    record, row, row_backend, error = None, None, None, None
    try:
        record = load_record(bundle)
        row = fastest_accepted(record, precision)
        row_backend = backend(row["backend"]) if row is not None else None  # a plugin since removed: refused
    except (BundleError, EngineError) as err:
        record, row, error = None, None, err
    if row is not None and (not given or _takes(row_backend, config, given)):
        chosen = replace(row_config(row), **{f: getattr(config, f) for f in given})
        tol = record["tolerance"]
        what = "tuned winner" if precision is None else f"fastest {precision} engine `tune` measured"

        def tuned(name: Namer) -> str:
            kept = f"; {_names(given, name)} as given (it was measured with its own)" if given else ""
            return (f"{describe(chosen)}: {what} for this machine ({record['machine']['cpu']}, {record['date']}), "
                    f"{row['ms_per_image']:.0f} ms/image vs {record['reference_ms_per_image']:.0f} for onnxruntime "
                    f"fp32; scores within {row['score_max_abs']:.1e} (limit {tol['score']:.0e}), maps within "
                    f"{row['map_max_abs']:.1e} (limit {tol['map']:.0e}) of fp32{kept}")

        return _selection(chosen, record, tuned)
    name_ = FALLBACK.backend
    if given:  # the first backend, in the default order, that takes them (and runs that precision)
        fits = [n for n in BUILTINS if _takes(backend(n), config, given)
                and (precision is None or precision in (backend(n).precisions or (precision,)))]
        if not fits:
            asked = ", ".join(f"{f}={getattr(config, f)!r}" for f in given)
            runs = "; ".join(f"{n}: {', '.join(backend(n).takes) or 'none'}" + (
                f" on {', '.join(backend(n).devices)}" if backend(n).devices else "") for n in BUILTINS)
            raise EngineError(f"no backend takes {asked}{f' at {precision}' if precision else ''} (what each takes: "
                              f"{runs})")
        name_ = fits[0]
    fallback = replace(config, backend=name_, precision=precision or backend(name_).default_precision)
    default = "the exact default" if fallback.precision == "fp32" else "the default backend"

    def fallback_reason(name: Namer) -> str:
        if given:
            head = f"{describe(fallback)}: the first backend that takes {_names(given, name)}"
            if row is not None:
                return f"{head} (the tuned {row['backend']} {row['precision']} does not)"
            return f"{head}; no tuned engine here ({error or f'`winclip-edge engine tune` accepted no {precision} engine'})"
        if error is not None:
            return (f"{describe(fallback)}, {default}: {error}; `winclip-edge engine tune --bundle {bundle.root}` finds the "
                    "fastest faithful engine here")
        return f"{describe(fallback)}, {default}: `winclip-edge engine tune` accepted no {precision} engine on this machine"

    return _selection(fallback, None, fallback_reason)


__all__ = ["FALLBACK", "RECORD_FORMAT", "Selection", "TUNING_DIR", "config_row", "fastest_accepted", "load_record",
           "record_path", "row_config", "select"]
