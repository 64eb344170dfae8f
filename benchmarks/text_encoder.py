#!/usr/bin/env python
"""What the text encoder in the bundle costs: bundle size with and without it, and the time and memory of
``winclip-edge product add`` on the runtime (text.onnx, CPU) against the export stage (torch).

Works on a COPY of ``--bundle`` (a bundle without the text encoder, e.g. the shared ViT-B-16-plus-240 one):
measures its size, runs ``winclip-edge add-text-encoder`` and ``engine quantize --graph text`` (fp16, int8) on the copy,
then times ``product add`` ``--repeats`` times per encoder, each in a fresh process (wall time and the child's
peak RSS from wait4, so imports and model loading are included: what a user waits for), and compares each
encoder's prototypes with the export stage's. The runtime runs have torch and open_clip made unimportable (a
sitecustomize on PYTHONPATH). Run from the repository root::

    python benchmarks/text_encoder.py --bundle /path/to/b16p       # -> benchmarks/results/text_encoder_<model>_<date>.md
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from winclip_edge.performance.bench import machine_info, markdown_table, software_versions, write_report  # noqa: E402
import numpy as np  # noqa: E402

from winclip_edge.bundle import Bundle  # noqa: E402
from winclip_edge.products import load_text  # noqa: E402

BLOCKER = """import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "open_clip", "torchvision"):
            raise ImportError(f"{name} is blocked (runtime measurement)")
sys.meta_path.insert(0, _Block())
"""


def folder_mib(folder: Path, exclude: tuple[str, ...] = ()) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name not in exclude) / 2**20


def timed(argv: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process; raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss / 1024.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "winclip_edge.cli", *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="a bundle without the text encoder (copied, not changed)")
    parser.add_argument("--product", default="cable", help="product name to add (default cable)")
    parser.add_argument("--repeats", type=int, default=3, help="product add runs per encoder (default 3)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--work", default=None, help="folder for the copy (default: a temporary folder)")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="text-encoder-bench-"))
    copy = work / "bundle"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(args.bundle, copy)
    shutil.rmtree(copy / "variants", ignore_errors=True)  # sizes compare the bundle proper
    shutil.rmtree(copy / "engines", ignore_errors=True)
    blocker = work / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    runtime_env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    export_env = {**os.environ, "PYTHONPATH": str(REPO)}
    load_before = [round(v, 2) for v in os.getloadavg()]

    size_without = folder_mib(copy)
    print("add-text-encoder ...", file=sys.stderr, flush=True)
    add_s, add_rss = timed(cli("add-text-encoder", "--bundle", str(copy)), export_env)
    bundle = Bundle(copy)
    size_with = folder_mib(copy, exclude=("variants",))
    section = bundle.manifest.text_encoder
    files = {name: (copy / name).stat().st_size / 2**20 for name in section["files"]}
    variant_rows = []
    for precision in ("fp16", "int8"):
        print(f"engine quantize --graph text --precision {precision} ...", file=sys.stderr, flush=True)
        seconds, rss = timed(cli("engine", "quantize", "--bundle", str(copy), "--graph", "text", "--precision", precision),
                             export_env)
        size = (copy / "variants" / f"text.{precision}.onnx").stat().st_size / 2**20
        variant_rows.append([f"variants/text.{precision}.onnx", f"{size:.0f}", f"{seconds:.0f}", f"{rss:.0f}"])

    runs = [("export stage (torch + open_clip)", ["--text-encoder", "export"], export_env),  # first: the reference
            ("runtime text.onnx fp32 (torch blocked)", ["--text-encoder", "bundle"], runtime_env),
            ("runtime text.int8.onnx (torch blocked)", ["--text-encoder", "bundle", "--text-precision", "int8"],
             runtime_env)]
    rows = []
    reference = None
    for label, extra, env in runs:
        samples = []
        for i in range(args.repeats):
            print(f"product add: {label} #{i + 1}", file=sys.stderr, flush=True)
            samples.append(timed(cli("product", "add", "--bundle", str(copy), args.product, "--force", "--quiet", *extra),
                                 env))
        times = sorted(s for s, _ in samples)
        text = load_text(Bundle(copy), args.product)
        reference = reference or text
        diff = max(float(np.abs(text.t_normal - reference.t_normal).max()),
                   float(np.abs(text.t_anomalous - reference.t_anomalous).max()))
        cosine = min(float(text.t_normal @ reference.t_normal), float(text.t_anomalous @ reference.t_anomalous))
        rows.append([label, f"{statistics.median(times):.1f}", f"{min(times):.1f}-{max(times):.1f}",
                     f"{max(r for _, r in samples):.0f}", f"{diff:.1e}", f"{cosine:.6f}"])
    load_after = [round(v, 2) for v in os.getloadavg()]
    machine = machine_info()
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["benchmarks/text_encoder.py", *argv])
    now = _dt.datetime.now(_dt.timezone.utc)
    report = {
        "model": bundle.manifest.model, "date": now.isoformat(timespec="seconds"), "command": command,
        "machine": machine, "versions": software_versions(), "load_average_before": load_before,
        "load_average_after": load_after, "bundle_mib_without": size_without, "bundle_mib_with": size_with,
        "files_mib": files, "add_text_encoder": {"seconds": add_s, "peak_rss_mib": add_rss},
        "variants": variant_rows, "add_product": rows, "repeats": args.repeats,
    }
    md = [
        f"# Text encoder in the bundle: costs ({bundle.manifest.model}, random weights)", "",
        f"- Machine: {machine['cpu']}, {machine['cores']} logical cores, {machine['ram_gib']} GiB; no GPU used",
        f"- Date: {report['date']}; command: `{command}`",
        f"- Load average before / after: {load_before} / {load_after} (the machine is shared with other jobs: "
        "times are indicative, compare within this table only)", "",
        "## Bundle size", "",
        markdown_table(["bundle", "MiB"], [["without text encoder", f"{size_without:.0f}"],
                                           ["with text encoder", f"{size_with:.0f}"]]
                       + [[f"  of which {n}", f"{v:.1f}"] for n, v in files.items()]), "",
        f"`add-text-encoder` (export stage, torch): {add_s:.0f} s, peak RSS {add_rss:.0f} MiB.", "",
        markdown_table(["optional variant", "MiB", "made in s", "peak RSS MiB"], variant_rows), "",
        f"## `product add {args.product}` (CPE: 7 + 4 states x 22 templates = 242 prompts), one fresh process per run, {args.repeats} runs", "",
        markdown_table(["encoder", "median s", "range s", "peak RSS MiB", "prototypes max abs diff vs export stage",
                        "min cosine"], rows), "",
        "Wall time includes the Python start, imports, loading and verifying the bundle (sha256 of the graphs) and "
        "writing the product; peak RSS is the child's maximum resident set (wait4).",
    ]
    stem = f"text_encoder_{bundle.manifest.model}_{now.strftime('%Y%m%dT%H%M%S')}"
    md_path, _ = write_report(args.out, stem, report, "\n".join(md))
    print(md_path)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
