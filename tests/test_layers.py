"""The house rules of docs/architecture.md, checked on the source: layers import one way, argparse and the CLI stay
in winclip_edge/cli/, the runtime never imports torch / open_clip / tensorrt at import time, and every link in the
repository points inside it."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "winclip_edge"
HEAVY = ("torch", "torchvision", "open_clip", "tensorrt", "cuda", "onnx", "openvino", "nncf", "tritonclient",
         "pytriton", "fastapi", "uvicorn", "paho", "watchdog", "matplotlib", "sklearn", "asyncua", "pymodbus",
         "cryptography", "gi")
# Modules that exist to use one heavy library: they may import it at module level (they are imported lazily).
HEAVY_HOMES = {"winclip_edge.export", "winclip_edge.engines.torch", "winclip_edge.service", "winclip_edge.triton",
               "winclip_edge.line.mqtt", "winclip_edge.line.sinks", "winclip_edge.line.sources",
               "winclip_edge.line.opcua.server", "winclip_edge.line.genicam"}
# The design notes, method notes and seminar notes of the project's workspace live outside the repository: no
# tracked file may cite them (the pattern is spelled so that this file does not cite them either).
OUTSIDE_NAMES = re.compile(r"\b(?:DESI" r"GN|WIN" r"CLIP|STY" r"LE)\.md\b|shared/do" r"cs|seed/0" r"00_")
MD_LINK = re.compile(r"\]\(([^)#\s]+)")


def module_files() -> dict[str, Path]:
    """Module name -> file, for winclip_edge/ and export/ (installed as winclip_edge.export)."""
    found = {}
    for base, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / "export", f"{PACKAGE}.export")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def imports_of(name: str, files: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported module, at module level?) of every import statement in ``name``, lazy ones included."""
    tree = ast.parse(files[name].read_text())
    package = name if is_package(name, files) else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        eager = id(node) in top_level
        if isinstance(node, ast.Import):
            found += [(a.name, eager) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in files else target, eager))
    return found


def test_no_import_circle():
    files = module_files()
    graph = {name: sorted({t for t, _ in imports_of(name, files) if t in files and t != name}) for name in files}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    # A package's __init__ importing its own submodules is how packages work; a submodule importing back the
    # package that imports it is the circle this rule forbids.
    assert not cycles, "import circles (lazy imports count too):\n" + "\n".join(" -> ".join(c) for c in cycles)


# docs/architecture.md's layers, lowest first: a module imports its own layer and the ones below, never one above
# (lazy imports count). A name is a module or a package of winclip_edge (winclip_edge.export = the export stage);
# the longest prefix decides; the package root (the public API) stands above them all.
LAYERS = (
    ("utilities", ("errors", "fileio", "names", "performance.machine", "verdicts")),
    ("maths and the graph contract", ("contract", "windows", "scoring", "prompts", "evaluation.paper",
                                      "evaluation.metrics", "drift")),
    ("files and images", ("bundle", "products", "versions", "review", "preprocess", "samples", "heatmap", "inputs",
                          "tokenizer", "tiles", "evaluation.datasets")),
    ("engines", ("engines", "builders", "export", "text_encoder")),
    ("pipeline", ("inspector", "catalog", "batcher", "control", "calibration", "registration", "teaching", "rows",
                  "results", "demo", "performance", "evaluation", "triton")),
    ("HTTP face", ("service",)),
    ("line station", ("line",)),
    ("command line", ("cli",)),
)


def layer_of(name: str) -> int | None:
    """Index in LAYERS of module ``name`` (None: the package root, or a module no layer names)."""
    rest = name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else None
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if rest is not None and (rest == prefix or rest.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    return found


def test_every_module_has_a_layer():
    files = module_files()
    assert not [n for n in files if n != PACKAGE and layer_of(n) is None], "add them to LAYERS (docs/architecture.md)"


def test_no_import_runs_back_up_a_layer():
    files = module_files()
    offenders = []
    for name in files:
        here = layer_of(name)
        for target, _ in imports_of(name, files):
            there = layer_of(target) if target in files else None
            if here is not None and there is not None and there > here:
                offenders.append(f"{name} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    assert not offenders, "imports running back up a layer:\n" + "\n".join(offenders)


def test_argparse_and_the_cli_stay_in_the_cli_package():
    files = module_files()
    offenders = [f"{name} imports {target}" for name in files if not name.startswith(f"{PACKAGE}.cli")
                 for target, _ in imports_of(name, files)
                 if target == "argparse" or target == f"{PACKAGE}.cli" or target.startswith(f"{PACKAGE}.cli.")]
    assert not offenders, offenders


def test_runtime_never_imports_heavy_libraries_eagerly():
    files = module_files()
    offenders = []
    for name in files:
        if any(name == home or name.startswith(home + ".") for home in HEAVY_HOMES):
            continue
        for target, eager in imports_of(name, files):
            if eager and target.split(".")[0] in HEAVY:
                offenders.append(f"{name} imports {target} at module level")
    assert not offenders, offenders


def test_importing_the_runtime_and_its_cli_loads_no_heavy_library():
    code = ("import sys, winclip_edge, winclip_edge.cli, winclip_edge.inspector, winclip_edge.performance.bench, "
            "winclip_edge.evaluation.runner; heavy = %r; print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
            % (HEAVY,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_layer_rules_can_fail(tmp_path, monkeypatch):
    """The circle finder and the argparse rule see a planted offence (a rule that cannot fail proves nothing)."""
    pkg = tmp_path / PACKAGE
    (pkg / "cli").mkdir(parents=True)
    (tmp_path / "export").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .a import y\n")
    (pkg / "c.py").write_text("def g():\n    import argparse\n")
    (pkg / "cli" / "__init__.py").write_text("import argparse\n")
    (pkg / "scoring.py").write_text("def h():\n    from .inspector import Inspector\n")
    (pkg / "inspector.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="winclip_edge.a -> winclip_edge.b -> winclip_edge.a"):
        test_no_import_circle()
    with pytest.raises(AssertionError, match="winclip_edge.c imports argparse"):
        test_argparse_and_the_cli_stay_in_the_cli_package()
    with pytest.raises(AssertionError, match=r"winclip_edge.scoring \(maths and the graph contract\) imports "
                                             r"winclip_edge.inspector \(pipeline\)"):
        test_no_import_runs_back_up_a_layer()
    with pytest.raises(AssertionError, match="add them to LAYERS"):
        test_every_module_has_a_layer()


def tracked_text_files() -> list[str]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [n for n in names if n.endswith((".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".yml", ".yaml", ".html",
                                            ".js", ".css", ".pbtxt")) and n != "tests/test_layers.py"
            and (ROOT / n).is_file()]


def test_no_reference_to_files_outside_the_repository():
    bad = []
    for name in tracked_text_files():
        text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        bad += [f"{name}: mentions {m.group(0)}" for m in OUTSIDE_NAMES.finditer(text)]
    assert not bad, bad


def test_markdown_links_point_inside_the_repository():
    bad = []
    for name in tracked_text_files():
        if not name.endswith(".md"):
            continue
        path = ROOT / name
        for target in MD_LINK.findall(path.read_text(encoding="utf-8", errors="replace")):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                bad.append(f"{name}: link to {target}")
    assert not bad, bad
