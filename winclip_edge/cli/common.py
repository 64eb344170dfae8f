"""What the commands share: exit codes, the user-facing error, engine / scoring flags and their typed objects.

Flags are registered here once and turned into the library's typed configs (EngineConfig, ScoringOptions);
no argparse Namespace crosses into library code.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..engines import EngineConfig
from ..engines.registry import backends, broken_backends, precisions
from ..errors import WinclipError
from ..scoring import ScoringOptions

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


class CliError(WinclipError):
    """A message for the user; main() prints it and exits with EXIT_ERROR."""


def csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet or total < 2, file=sys.stderr)


def report_failures(failed: Any) -> None:
    for r in failed:
        print(f"error: {r.error}", file=sys.stderr)


# ---------------------------------------------------------------- engine flags
# The common EngineConfig fields every backend may take (its record's ``takes``) and their flags.
COMMON_FLAGS = {"threads": "--threads", "device": "--device", "engine_dir": "--engine-dir"}
COMMON_HELP = {"threads": "intra-op threads of a CPU backend (0 = its default)",
               "device": "where the graph runs",
               "engine_dir": "where a backend keeps what it builds or caches: TensorRT plans (build-engine), ONNX "
                             "Runtime's TensorRT provider and CPU graph caches, OpenVINO's compiled models (default "
                             "$WINCLIP_ENGINE_DIR, else <bundle>/engines)"}


@dataclass(frozen=True)
class EngineFlag:
    """One engine flag: a common EngineConfig field (``field``), or options fields of one or more backends
    (``owners``: backend -> its options field)."""

    flag: str
    dest: str
    field: str | None = None
    owners: tuple[tuple[str, str], ...] = ()

    def backends(self) -> list[str]:
        """The backends that take this flag, in the registry's order."""
        if self.field is not None:
            return [n for n, r in backends().items() if self.field in r.takes]
        return [n for n, _ in self.owners]


def _option_flag(record: Any, f: Any) -> str | None:
    """A built-in's historical flag; a plugin's are always --<backend>-<field> (they cannot collide with ours)."""
    if record.builtin:
        return f.metadata.get("flag")
    return f"--{record.name}-{f.name.replace('_', '-')}"


def engine_flags() -> list[EngineFlag]:
    """Every engine flag, from the registry: the common ones, then each backend's options (plugins' included)."""
    flags = [EngineFlag(flag, flag[2:].replace("-", "_"), field=name) for name, flag in COMMON_FLAGS.items()]
    owners: dict[str, list[tuple[str, str]]] = {}
    for record in backends().values():
        for f in record.option_fields():
            flag = _option_flag(record, f)
            if flag is not None:
                owners.setdefault(flag, []).append((record.name, f.name))
    flags += [EngineFlag(flag, flag[2:].replace("-", "_"), owners=tuple(o)) for flag, o in owners.items()]
    return flags


def flag_name(backend_name: str | None) -> Callable[[str], str]:
    """EngineConfig field names -> the flags that set them (for messages), for options of ``backend_name``."""
    names = {"backend": "--backend", "precision": "--precision", **COMMON_FLAGS}
    for flag in engine_flags():
        names.update({field: flag.flag for owner, field in flag.owners if owner == backend_name})
    return lambda field: names.get(field, field)


def _backend_help() -> str:
    plugins = [f"{n} ({r.origin})" for n, r in backends().items() if not r.builtin]
    broken = broken_backends()
    return ("engine (default auto: the winner `winclip-edge engine tune` recorded for this machine, else onnxruntime fp32; "
            "with --precision P: the fastest engine of precision P tune accepted here, e.g. --precision fp32 = the "
            "fastest exact one; a backend's own flag without --backend means that backend)"
            + (f"; plugins: {', '.join(plugins)}" if plugins else "")
            + (f"; plugins that failed to load: {'; '.join(f'{n} ({why})' for n, why in broken.items())}"
               if broken else "")).replace("%", "%%")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """--backend and the engine flags, made from the backend registry (every command that runs the graph). Every
    flag defaults to "not given"; a flag given with a backend that does not take it is an error (engine_config)."""
    records = backends()
    g = p.add_argument_group("engine (backends: winclip_edge/engines/registry.py)")
    g.add_argument("--backend", default="auto", choices=("auto", *records), help=_backend_help())
    g.add_argument("--precision", choices=precisions(), default=None,
                   help="default: the backend's (fp16 for tensorrt, as build-engine; fp32 otherwise). onnxruntime: runs "
                        "the bundle's fp16/int8 variant (make it with `winclip-edge engine quantize`); torch: fp16 casts the "
                        "model (LayerNorm stays fp32); tensorrt: loads the cached engine of that precision (make it "
                        "with `winclip-edge engine build`); openvino: fp32 | bf16 | fp16 (precision hint) | int8 (NNCF "
                        "model)")
    for flag in engine_flags():
        if flag.field is not None:
            takers = [backends()[n] for n in flag.backends()]
            where = "; ".join(f"{r.name}: {', '.join(('auto', *r.devices))}" if flag.field == "device" and r.devices
                              else r.name for r in takers)
            kind = {"threads": int}.get(flag.field, str)
            g.add_argument(flag.flag, dest=flag.dest, type=kind, default=None,
                           help=f"{COMMON_HELP[flag.field]} ({where})".replace("%", "%%"))
            continue
        owner, name = flag.owners[0]
        f = next(f for f in records[owner].option_fields() if f.name == name)
        meta = f.metadata
        text = (meta.get("help") or f"{owner} option {name}").replace("%", "%%")
        text = f"{'/'.join(flag.backends())}: {text}"
        if isinstance(f.default, bool):
            g.add_argument(flag.flag, dest=flag.dest, action="store_const", const=True, default=None, help=text)
            continue
        kind = meta.get("type") or (type(f.default) if isinstance(f.default, (int, float)) else str)
        g.add_argument(flag.flag, dest=flag.dest, type=kind, choices=meta.get("choices"), default=None, help=text)


def _not_taken(flag: EngineFlag, backend_name: str) -> CliError:
    record = backends()[backend_name]
    own = [f.flag for f in engine_flags() if backend_name in f.backends()]
    takers = flag.backends()
    return CliError(f"{flag.flag} is not an option of the {backend_name} backend (it takes: "
                    f"{', '.join(own) or 'no engine flag'}); {flag.flag} is for: {', '.join(takers) or 'no backend'}"
                    + ("" if record.builtin else f" (plugin {record.origin})"))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of the flags of :func:`add_engine_options`. Nothing is resolved here (engines/auto.py selects
    the engine, once); a flag that the named backend does not take is refused, naming the backends that do."""
    flags = engine_flags()
    given = [(f, getattr(args, f.dest)) for f in flags if getattr(args, f.dest, None) is not None]
    own = [(f, v) for f, v in given if f.field is None]
    target = args.backend if args.backend != "auto" else None
    if target is None and own:  # a backend's own flag without --backend: that backend
        common = set.intersection(*(set(f.backends()) for f, _ in own))
        if not common:
            mixed = ", ".join(f"{f.flag} ({'/'.join(f.backends())})" for f, _ in own)
            raise CliError(f"{mixed}: flags of different backends; name one with --backend")
        target = next(n for n in backends() if n in common)
    if target is not None:
        for f, _ in given:
            if target not in f.backends():
                raise _not_taken(f, target)
    options = None
    if own:
        record = backends()[target]
        values = {field: value for f, value in own for owner, field in f.owners if owner == target}
        try:
            options = record.options(**values)
        except (TypeError, ValueError) as err:
            raise CliError(f"{', '.join(f.flag for f, _ in own)}: {err}") from None
    return EngineConfig(backend=args.backend, precision=args.precision,
                        threads=args.threads if args.threads is not None else 0,
                        device=args.device if args.device is not None else "auto",
                        engine_dir=Path(args.engine_dir) if args.engine_dir is not None else None, options=options)


def announce(args: argparse.Namespace, selection: Any) -> None:
    """Print which engine ``auto`` chose and why (the library decided; the CLI only names its flags)."""
    if selection is not None and args.backend == "auto":
        print(f"engine: {selection.explain(flag_name(selection.config.backend))}", file=sys.stderr)


def open_bundle(args: argparse.Namespace) -> Any:
    """The command's bundle, opened and verified once; every later step gets this object."""
    from ..bundle import Bundle

    return Bundle(args.bundle)


# ---------------------------------------------------------------- runtime flags
def add_scoring_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (default: the bundle's, 0.07)")
    p.add_argument("--zero-shot", action="store_true", help="ignore the few-shot memory (plain WinCLIP)")


def scoring_options(args: argparse.Namespace) -> ScoringOptions:
    """The paper's ablations (window scales, image scale, mean) are `eval --ablation`'s alone; a command that scores
    images takes the temperature and zero-shot switch."""
    return ScoringOptions(temperature=args.temperature, use_memory=not args.zero_shot)


def add_runtime_options(p: argparse.ArgumentParser, tiling: bool = True) -> None:
    """Bundle, product, engine, batch and scoring flags of the commands that score images (and the tiling / ROI
    flags, unless ``tiling=False``: commands that time the engine use the product's setting)."""
    p.add_argument("--bundle", required=True, help="bundle folder made by `winclip-edge export`")
    p.add_argument("--product", required=True, help="product name inside the bundle")
    add_engine_options(p)
    p.add_argument("--batch", type=int, default=8, help="images per engine call (default 8)")
    add_scoring_options(p)
    from .tiling_options import add_tiling_options

    if tiling:
        add_tiling_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def inspector(args: argparse.Namespace, zero_shot: bool = False, with_threshold: bool = True) -> Any:
    """The Inspector of a runtime command; ``zero_shot=True`` never reads the memory (register replaces it). The
    bundle is opened and verified once, here, and handed to everything that reads it."""
    from dataclasses import replace

    from ..inspector import Inspector
    from .tiling_options import tiling_and_roi

    engine = engine_config(args)  # bad flags fail before anything is read
    options = scoring_options(args)
    options = replace(options, use_memory=False) if zero_shot else options
    bundle = open_bundle(args)
    tiling, roi = tiling_and_roi(args, bundle)
    made = Inspector(bundle, args.product, engine=engine, options=options, sigma=getattr(args, "sigma", 0.0),
                     with_threshold=with_threshold, tiling=tiling, roi=roi)
    announce(args, made.selection)
    return made
