#!/usr/bin/env python3
"""A side-by-side peer environment for CI: ``python .ci/peer_env.py DIR [options] [REQUIREMENT ...]``.

DIR becomes a venv of the interpreter that runs this script (a venv's own packages included, not only its base
interpreter's: ``venv --system-site-packages`` would see the base only) that sees every package the caller sees
(a ``.pth`` adds the caller's site folders after DIR's own), plus what the requirements install into DIR alone.
The caller's environment is never changed: the caller's versions are pip constraints for the peer, except the
names given with ``--unpin``, which the peer may shadow with versions of its own (PyTriton's ``numpy<2``); pip
leaves the caller's copies alone (they are outside the peer's environment). ``--own NAME`` copies the caller's
version of NAME into the peer itself: PyTriton takes a copy outside the interpreter's own site folders for an
editable install and then misses its libraries.

    python .ci/peer_env.py .venv-anomalib "anomalib==2.7.*" --check anomalib,open_clip,winclip_edge.export
    python .ci/peer_env.py .venv-triton --extra triton-server --unpin numpy,opencv-python-headless \
        --own nvidia-pytriton --check pytriton

Rebuilt only when the interpreter, the requests or the caller's packages changed (DIR/peer.json records them).
``--extra NAME`` adds the requirements of this project's optional dependency NAME (pyproject.toml). Other options
for pip go after ``--``. Exit 0 when the peer imports every ``--check`` module.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = "peer.json"
PTH = "_peer_of_caller.pth"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def caller_sites() -> list[str]:
    """The caller's site folders in its own order: a venv's, its base's when it includes system packages, and those
    a .pth added (a peer of a peer sees what its caller sees)."""
    found = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    on_path = [p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")]
    sites: list[str] = []
    for path in [*on_path, *found]:
        if os.path.isdir(path) and path not in sites:
            sites.append(path)
    return sites


def caller_pins() -> list[str]:
    """``name==version`` of every distribution the caller has (editable ones excluded: the peer sees them)."""
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json", "--exclude-editable",
                          "--disable-pip-version-check"], check=True, capture_output=True, text=True).stdout
    return sorted(f"{d['name']}=={d['version']}" for d in json.loads(out))


def extra_requirements(name: str) -> list[str]:
    import tomllib  # Python >= 3.11

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    if name not in extras:
        raise SystemExit(f"peer_env: pyproject.toml has no extra {name!r} (known: {', '.join(sorted(extras))})")
    return list(extras[name])


def peer_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def peer_site(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())


PROBE = """import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as err:
        print(f"{name}: {type(err).__name__}: {err}")
"""


def check(python: Path, modules: list[str]) -> list[str]:
    """The modules the peer cannot import, each with its error (one process imports them all)."""
    if not modules:
        return []
    proc = subprocess.run([str(python), "-c", PROBE, *modules], capture_output=True, text=True)
    failed = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode and not failed:
        failed = [f"{' '.join(modules)}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}"]
    return failed


def build(folder: Path, requirements: list[str], unpin: set[str], own: list[str], pip_args: list[str],
          pins: list[str]) -> None:
    venv.EnvBuilder(clear=True, with_pip=False, symlinks=os.name != "nt").create(folder)
    python = peer_python(folder)
    sites = caller_sites()
    line = f"import site; list(map(site.addsitedir, {sites!r}))\n"  # after the peer's own folder: its copies win
    (peer_site(python) / PTH).write_text(line)
    if not requirements and not own:
        return
    constraints = folder / "caller-constraints.txt"
    constraints.write_text("".join(f"{pin}\n" for pin in pins if canonical(pin.split("==")[0]) not in unpin))
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(constraints),
           *pip_args, *requirements]
    if requirements:
        pip(cmd, f"{' '.join(requirements)} into {folder} beside the caller's packages (pinned by {constraints}; "
                 "--unpin NAME lets the peer have its own NAME)")
    here = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions(path=[str(peer_site(python))])}
    missing = [name for name in own if canonical(name) not in here]
    if missing:  # the caller's version, copied into the peer itself
        pip([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--ignore-installed",
             "-c", str(constraints), *pip_args, *missing], f"{' '.join(missing)} into {folder} (--own)")


def pip(cmd: list[str], what: str) -> None:
    print("peer_env:", " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd, env={**os.environ, "PIP_USER": "0"}).returncode:
        raise SystemExit(f"peer_env: pip could not install {what}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pip_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("requirements", nargs="*", help="what the peer installs beside the caller's packages")
    p.add_argument("--extra", action="append", default=[], help="requirements of this project's extra NAME")
    p.add_argument("--unpin", default="", help="comma-separated names the peer may install in other versions")
    p.add_argument("--own", default="", help="comma-separated names installed into the peer itself even where the "
                   "caller has them (same version: for packages that look for files next to themselves, like PyTriton)")
    p.add_argument("--check", default="", help="comma-separated modules the peer must import")
    args = p.parse_intermixed_args(argv)
    requirements = [*args.requirements, *(r for name in args.extra for r in extra_requirements(name))]
    unpin = {canonical(n) for n in args.unpin.split(",") if n.strip()}
    modules = [m for m in args.check.split(",") if m.strip()]
    own = [n.strip() for n in args.own.split(",") if n.strip()]
    folder = args.folder.absolute()
    pins = caller_pins()
    key = {"python": sys.executable, "version": sys.version, "sites": caller_sites(), "requirements": requirements,
           "unpin": sorted(unpin), "own": own, "pip_args": pip_args,
           "caller": hashlib.sha256("\n".join(pins).encode()).hexdigest()}
    stamp = folder / STAMP
    python = peer_python(folder)
    try:
        fresh = json.loads(stamp.read_text()) == key and python.exists()
    except (OSError, ValueError):
        fresh = False
    if fresh and not check(python, modules):
        print(f"peer_env: {folder} is up to date")
        return 0
    build(folder, requirements, unpin, own, pip_args, pins)
    failed = check(python, modules)
    if failed:
        print(f"peer_env: {folder} cannot import: " + "; ".join(failed), file=sys.stderr)
        return 1
    stamp.write_text(json.dumps(key, indent=1) + "\n")
    print(f"peer_env: {folder} ready ({python})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
