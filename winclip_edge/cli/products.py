"""``product rename``: give a product folder a new name (e.g. one that follows the name rule of winclip_edge/names.py)."""
from __future__ import annotations

import argparse

from .commands import Commands
from .common import EXIT_OK


def run_rename(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..products import rename_product

    bundle = Bundle(args.bundle, verify=False)
    done = rename_product(bundle, args.old, args.new)
    records = f"; {done.records} version record(s) now name it" if done.records else ""
    what = "finished renaming" if done.resumed else "renamed"
    print(f"product {done.old!r} {what} to {done.new!r} in {args.bundle}{records}. Rows written before (results.jsonl, "
          f"review databases, MQTT topics) keep the old name; a running station serves it after a restart with "
          f"--product {done.new}")
    return EXIT_OK


def register(commands: Commands) -> None:
    def rename_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bundle", required=True, help="bundle folder")
        p.add_argument("old", help="the product folder's current name (any name, also one that breaks the rule)")
        p.add_argument("new", help="the new name: 1-64 of A-Z a-z 0-9 _ - ., starting with a letter or digit")
        p.set_defaults(run=run_rename)

    commands.add("product rename", rename_args,
                 help="rename a product folder (atomic; its versions and thresholds keep working)")
