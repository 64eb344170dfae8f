"""``cache list`` / ``cache clear``: the engine caches of a bundle (engines/caches.py), shown and removed."""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

from .commands import Commands
from .common import EXIT_OK, EXIT_SOME_FAILED, CliError


def _folder(args: argparse.Namespace) -> Path:
    from ..bundle import Bundle
    from ..engines.cache_dir import engine_dir

    bundle = Bundle(args.bundle, verify=False)  # the manifest says it is a bundle; no sha256 of the graph needed here
    return engine_dir(bundle, args.engine_dir)


def mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _state(entry) -> str:
    from ..engines import caches

    if entry.kind == caches.OTHER:
        return "not an engine cache of winclip-edge (left alone)"
    if entry.kind == caches.TENSORRT:
        return "engine build's (not bounded; loads only on the GPU + TensorRT it was built with)"
    if entry.current:
        return "this machine (in use here)"
    if entry.key is None:
        return "stale (from before caches were keyed)"
    return "stale (another machine or other library versions)"


def summary(folder: Path) -> str:
    """One line for ``info``: where the caches are, how big, the bound."""
    from ..engines import caches

    entries = caches.list_caches(folder)
    if not entries:
        return f"engine caches: none in {folder}"
    stale = [e for e in entries if e.stale]
    by_kind = {}
    for e in entries:
        by_kind[e.kind] = by_kind.get(e.kind, 0) + e.size
    kinds = ", ".join(f"{kind} {mib(size)}" for kind, size in by_kind.items())
    return (f"engine caches in {folder}: {mib(sum(e.size for e in entries))} ({kinds}); stale {mib(sum(e.size for e in stale))}"
            f" in {len(stale)}; kept: {caches.CacheBound.from_env().describe()} (winclip-edge cache list|clear)")


def run_list(args: argparse.Namespace) -> int:
    from ..engines import caches
    from ..engines.registry import machine_key

    folder = _folder(args)
    entries = caches.list_caches(folder)
    print(f"engine caches in {folder} (this machine's key {machine_key()}; kept: {caches.CacheBound.from_env().describe()})")
    if not entries:
        print("  none")
        return EXIT_OK
    width = max(len(e.name) for e in entries)
    for e in entries:
        used = _dt.datetime.fromtimestamp(e.used).strftime("%Y-%m-%d %H:%M")
        print(f"  {e.kind:<21} {e.name:<{width}}  {mib(e.size):>11}  used {used}  {_state(e)}")
    stale = [e for e in entries if e.stale]
    print(f"total {mib(sum(e.size for e in entries))}; stale {mib(sum(e.size for e in stale))} in {len(stale)} "
          f"(`winclip-edge cache clear --bundle {args.bundle} --stale` removes them)")
    return EXIT_OK


def run_clear(args: argparse.Namespace) -> int:
    from ..engines import caches

    kinds = tuple(args.kind or caches.KEYED_KINDS)
    if args.stale and caches.TENSORRT in kinds:
        raise CliError("--stale cannot tell which TensorRT plans fit: that is known only on the GPU they were built "
                       "for; clear them whole with --kind tensorrt (without --stale)")
    folder = _folder(args)
    entries = caches.list_caches(folder)
    chosen = [e for e in entries if e.kind in kinds and (e.stale or not args.stale)]
    plans_kept = caches.TENSORRT not in kinds and any(e.kind == caches.TENSORRT for e in entries)
    caches.sweep(folder)
    removed, failed = [], []
    for entry in chosen:
        (removed if caches.remove(entry) else failed).append(entry)
    for entry in failed:
        print(f"error: cannot remove {entry.paths[0]} (read-only?)", file=sys.stderr)
    what = ", ".join(f"{e.kind} {e.name}" for e in removed)
    print(f"removed {len(removed)} cache(s), {mib(sum(e.size for e in removed))}" + (f": {what}" if what else "")
          + (f"; TensorRT plans kept (--kind {caches.TENSORRT} removes them)" if plans_kept else ""))
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True)
    p.add_argument("--engine-dir", default=None,
                   help="the engine folder, where it was moved to (default: $WINCLIP_ENGINE_DIR, else <bundle>/engines)")


def _build_list(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.set_defaults(run=run_list)


def _build_clear(p: argparse.ArgumentParser) -> None:
    from ..engines.caches import KEYED_KINDS, KINDS, TENSORRT

    _common(p)
    p.add_argument("--kind", action="append", choices=tuple(KINDS),
                   help=f"only this kind (repeatable; default: {', '.join(KEYED_KINDS)}, which remake themselves at "
                        f"the next start; {TENSORRT}: engine build's plans, removed only when named)")
    p.add_argument("--stale", action="store_true",
                   help="only the caches of other machine keys (other library versions): what no process here reads")
    p.set_defaults(run=run_clear)


def register(commands: Commands) -> None:
    commands.add("cache list", _build_list,
                 help="show a bundle's engine caches: kind, machine key, size, last use, stale or in use here")
    commands.add("cache clear", _build_clear,
                 help="remove a bundle's engine caches (all self-remaking ones, or --stale ones; TensorRT plans only "
                      "with --kind tensorrt)")


__all__ = ["register", "summary"]
