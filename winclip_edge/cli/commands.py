"""The command table: plain commands (``infer``), commands grouped by noun (``engine quantize``), and the old names
of grouped commands, kept as aliases that print the new name.

Every command module's ``register(commands)`` receives one :class:`Commands`. ``commands.add_parser(name, ...)`` adds
a plain command; ``commands.add("engine quantize", build, help=..., old="quantize")`` adds a command to the noun's
group (made on first use) and, with ``old``, the same command under its old name, hidden from ``--help``, whose
run prints "`winclip-edge quantize` is now `winclip-edge engine quantize`" first.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

GROUP_HELP = {
    "cache": "a bundle's engine caches (compiled / optimised graphs per machine key): list, clear",
    "engine": "engines built or measured on this machine: quantize, build (TensorRT), tune",
    "product": "a bundle's products: add, versions, rollback, rename",
    "triton": "Triton Inference Server: export a model repository, serve it",
}


class Commands:
    """The top-level subparsers with noun groups and hidden aliases (see the module docstring)."""

    def __init__(self, sub: argparse._SubParsersAction):
        self.sub = sub
        self.groups: dict[str, argparse._SubParsersAction] = {}
        self.renamed: dict[str, str] = {}  # old name -> new command line

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return self.sub.add_parser(name, **kwargs)

    def group(self, noun: str) -> argparse._SubParsersAction:
        if noun not in self.groups:
            parser = self.sub.add_parser(noun, help=GROUP_HELP.get(noun, f"{noun} commands"))
            self.groups[noun] = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
        return self.groups[noun]

    def add(self, path: str, build: Callable[[argparse.ArgumentParser], None], help: str,
            old: str | None = None) -> argparse.ArgumentParser:
        """``path`` = "noun verb"; ``build(parser)`` adds the arguments and ``set_defaults(run=...)``."""
        noun, verb = path.split()
        parser = self.group(noun).add_parser(verb, help=help)
        build(parser)
        if old is not None:
            alias = self.sub.add_parser(old, help=help, description=f"Old name of `winclip-edge {path}`.")
            build(alias)
            alias.set_defaults(renamed_to=path)
            self.renamed[old] = path
        return parser

    def hide_aliases(self) -> None:
        """Keep the old names out of ``--help`` (they still parse)."""
        self.sub._choices_actions = [a for a in self.sub._choices_actions if a.dest not in self.renamed]


__all__ = ["Commands", "GROUP_HELP"]
