"""``winclip-edge``: argparse mapped onto one library call per command.

The only place that imports argparse or knows exit codes: 0 = all fine, 1 = some inputs failed (the others were
processed), 2 = nothing could be done. Library code raises typed errors (all WinclipError); main() prints them as
one line. A command module here has ``register(commands)`` (cli/commands.py: plain commands, commands grouped by
noun such as ``engine quantize``, and old names kept as aliases); each command sets ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from . import bench, builders, cache, cameras, demo, eval, export, products, roi, runtime, serve, teach, triton, tune
from .commands import Commands
from .common import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED, CliError
from ..errors import WinclipError

# A new command module = one module with register(commands), listed here (help lists them in this order).
COMMAND_MODULES = (export, runtime, teach, products, roi, builders, cache, bench, eval, demo, triton, tune, serve,
                   cameras)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="winclip-edge",
                                     description="Zero-/few-shot visual anomaly detection (WinCLIP/WinCLIP+).")
    commands = Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for module in COMMAND_MODULES:
        module.register(commands)
    commands.hide_aliases()
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["winclip-edge", *(sys.argv[1:] if argv is None else argv)])  # for reports
    name = getattr(args, "renamed_to", None) or " ".join(filter(None, (args.command, getattr(args, "verb", None))))
    if getattr(args, "renamed_to", None):
        print(f"note: `winclip-edge {args.command}` is now `winclip-edge {name}` (the old name keeps working)",
              file=sys.stderr)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("winclip-edge: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except (WinclipError, OSError) as err:
        print(f"winclip-edge {name}: error: {err}", file=sys.stderr)
        return EXIT_ERROR


__all__ = ["COMMAND_MODULES", "EXIT_ERROR", "EXIT_OK", "EXIT_SOME_FAILED", "CliError", "build_parser", "main"]
