#!/usr/bin/env python
# ruff: noqa: E402  (sys.path is fixed before the imports that reach torch)
"""Exact fp32 on the CPU: where ONNX Runtime's time goes and which fp32 engine is fastest, same run.

1. ONNX Runtime's own profiler (``enable_profiling``) on one batch-1 call: kernel time per operator type.
2. ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``, model types ``vit`` and ``clip``)
   on the bundle's graph: which fusions it finds (attention, SkipLayerNorm, GELU); a variant is timed only when it
   fused something ONNX Runtime does not already fuse at session creation.
3. Interleaved batch-1 timing (one call of each engine per round, so load changes hit all alike) of ONNX Runtime
   fp32 (default session; intra-op spinning off), OpenVINO fp32 (oneDNN) and the torch module (oneDNN), with the
   max abs difference of every output from torch.

    python benchmarks/fp32_engines.py --bundle /work/models/b16p --rounds 3

Writes benchmarks/results/fp32_engines_<model>_<stamp>.md/.json with the CPU model, load average and command.
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from winclip_edge.performance.bench import machine_info, markdown_table, software_versions, write_report
from winclip_edge.bundle import Bundle
from winclip_edge.engines import EngineConfig, create_engine

TOLERANCE = 1e-5  # "exact": every output within this of torch fp32 (unit vectors)


def op_profile(path: str, image: np.ndarray) -> list[tuple[str, float, int]]:
    """(operator type, ms, count) of one profiled batch-1 call after a warm-up, largest first."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        session.run(names, {"images": image})
        session.run(names, {"images": image})
        events = json.loads(Path(session.end_profiling()).read_text())
    run = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-1]
    time_us: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and run["ts"] <= e["ts"] <= run["ts"] + run["dur"]:
            time_us[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    return [(op, us / 1e3, count[op]) for op, us in time_us.most_common()]


def optimizer_fusions(path: str, heads: int, width: int) -> dict[str, dict[str, int]]:
    from onnxruntime.transformers.optimizer import optimize_model

    found = {}
    for model_type in ("vit", "clip"):
        model = optimize_model(path, model_type=model_type, num_heads=heads, hidden_size=width, opt_level=0,
                               use_gpu=False)
        found[model_type] = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    return found


class _NoSpin:
    """ONNX Runtime fp32 with intra-op spinning off (threads sleep between ops: kinder to a shared CPU)."""

    def __init__(self, path: str):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> dict:
        return dict(zip(self.names, self.session.run(self.names, {"images": images})))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each engine once per round; default 3)")
    p.add_argument("--heads", type=int, default=14, help="attention heads, for the optimizer (ViT-B-16-plus-240: 14)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    load_before = [round(v, 2) for v in os.getloadavg()]
    bundle = Bundle(args.bundle)
    image = np.random.default_rng(0).integers(0, 256, (1, *bundle.spec.image_size, 3), dtype=np.uint8)
    profile = op_profile(str(bundle.onnx_path), image)
    fusions = optimizer_fusions(str(bundle.onnx_path), args.heads, bundle.manifest.width)
    engines = {"onnxruntime fp32 (default session)": create_engine(bundle, EngineConfig(backend="onnxruntime")),
               "onnxruntime fp32, spinning off": _NoSpin(str(bundle.onnx_path)),
               "openvino fp32 (oneDNN)": create_engine(bundle, EngineConfig(backend="openvino")),
               "torch fp32 (oneDNN), the reference": create_engine(bundle, EngineConfig(backend="torch", device="cpu"))}
    reference = engines["torch fp32 (oneDNN), the reference"].run(image)
    diffs = {name: max(float(np.abs(e.run(image)[k] - reference[k]).max()) for k in reference) for name, e in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.run(image)
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n.split(' (')[0]} {v[-1]:.2f} s" for n, v in times.items()),
              file=sys.stderr, flush=True)
    base = float(np.median(times["onnxruntime fp32 (default session)"]))
    rows = [[name, f"{np.median(v):.2f}", f"{base / np.median(v):.2f}x", f"{diffs[name]:.1e}",
             "yes" if diffs[name] <= TOLERANCE else "NO"] for name, v in times.items()]
    total = sum(ms for _, ms, _ in profile)
    machine = machine_info()
    report = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "versions": software_versions(), "command": shlex.join([sys.executable, *sys.argv]),
              "bundle": str(bundle.root), "model": bundle.manifest.model, "profile_ms": profile, "fusions": fusions,
              "seconds": times, "max_abs_diff_vs_torch": diffs, "load_average_before": load_before,
              "load_average_after": [round(v, 2) for v in os.getloadavg()]}
    md = [f"# Exact fp32 engines on {machine['cpu']} ({machine['cores']} cores), {bundle.manifest.model}, batch 1", "",
          f"- date (UTC): {report['date']}; command: `{report['command']}`",
          f"- load average before / after: {load_before} / {report['load_average_after']} (a shared CPU: compare rows "
          "of this run, not runs)", f"- versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}", "",
          f"## ONNX Runtime fp32, kernel time per operator type (one profiled call, {total:.0f} ms of kernels)", "",
          markdown_table(["operator", "ms", "share", "nodes"],
                         [[op, f"{ms:.0f}", f"{100 * ms / total:.1f} %", n] for op, ms, n in profile if ms / total >= 0.001]),
          "", "## ONNX Runtime transformer optimizer: fusions found on this graph", "",
          *(f"- `{t}`: {f or 'none'}" for t, f in fusions.items()), "",
          f"## Interleaved timing, {args.rounds} round(s), median seconds per image", "",
          markdown_table(["engine", "s / image", "speed vs ONNX Runtime default", "max abs diff vs torch", "exact (<= 1e-5)"],
                         rows)]
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    paths = write_report(args.out, f"fp32_engines_{bundle.manifest.model}_{stamp}", report, "\n".join(md))
    print("\n".join(md))
    print(f"written: {paths[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
