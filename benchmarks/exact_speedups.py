#!/usr/bin/env python
"""Exact speed-ups of the export graph, measured (docs/method.md §4.3, docs/performance.md §5).

Variants of ``export.windowed_clip.WindowedVisual`` on one model (random weights: speed does not depend
on them), each checked to give the same outputs as the shipped graph, then timed at batch 1 in torch
(CPU or CUDA) and in ONNX Runtime (CPU):

- shipped: open_clip's blocks written out for short sequences (export/blocks.py: 2-D ``Gemm`` with fused
  bias, two transposes per block), the last block for the CLS query only, the first block's
  query/key/value rows computed once per image token and gathered for the windows
- full last block: the last block computes every token and the CLS row is taken afterwards
- first projections per window: every window projects its own copies of the first block's tokens
- open_clip blocks: open_clip's ``ResidualAttentionBlock`` called as is on ``[sequences, length, width]``
  (``nn.MultiheadAttention``; the graph shipped before export/blocks.py), CLS-only last block kept

Calls are interleaved (one call of each variant per round), so a load change on a shared machine hits
every variant alike; the table reports medians and the load average. Run from the repository root::

    python benchmarks/exact_speedups.py                          # ViT-B-16-plus-240, ~5 min on 2 cores
    python benchmarks/exact_speedups.py --model tests/tiny.json --iters 2   # any open_clip name / config
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from winclip_edge.export.models import load_model  # noqa: E402
from winclip_edge.export.onnx_export import export_onnx  # noqa: E402
from winclip_edge.export.windowed_clip import WindowedVisual  # noqa: E402
from winclip_edge.performance.bench import interleaved, latency_stats, machine_info, markdown_table, software_versions, \
    write_report  # noqa: E402
from winclip_edge.contract import INPUT_NAME, output_names  # noqa: E402

SHIPPED = "shipped (written-out blocks, CLS-only last block, shared first projections)"
EXACT_TOLERANCE = 1e-5  # max abs difference of unit vectors for "same outputs"


class OpenClipBlocks(WindowedVisual):
    """open_clip's blocks called as they are, on ``[sequences, length, width]`` (nn.MultiheadAttention).

    The full image's first projections are still computed by ``forward`` and left unused here (about 0.2 %
    of the work in torch; the ONNX export drops them as dead code).
    """

    def _run_body(self, x: torch.Tensor, length: int, first_qkv: torch.Tensor | None = None) -> torch.Tensor:
        c = x.shape[-1]
        x = x.reshape(-1, length, c)
        for block in self.body:
            x = block.block(x)
        return x.reshape(-1, c)

    def _last_cls(self, x: torch.Tensor, length: int) -> torch.Tensor:
        blk = self.last_block.block
        x = x.reshape(-1, length, x.shape[-1])
        kv = blk.ln_1(x)
        y = x[:, :1] + blk.ls_1(blk.attn(kv[:, :1], kv, kv, need_weights=False)[0])
        return (y + blk.ls_2(blk.mlp(blk.ln_2(y))))[:, 0]


def build_variants(visual: nn.Module, mean, std) -> dict[str, WindowedVisual]:
    return {
        SHIPPED: WindowedVisual(visual, mean, std).eval(),
        "full last block": WindowedVisual(visual, mean, std, cls_only_last_block=False).eval(),
        "first projections per window": WindowedVisual(visual, mean, std, shared_first_projections=False).eval(),
        "open_clip blocks": OpenClipBlocks(visual, mean, std, shared_first_projections=False).eval(),
    }


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-16-plus-240", help="open_clip model name or config JSON")
    p.add_argument("--device", default="cpu", help="torch device for the torch timings (default cpu)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (default 1)")
    p.add_argument("--iters", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime timings (no export)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder of the result tables")
    args = p.parse_args(argv)

    load_before = [round(v, 2) for v in os.getloadavg()]
    loaded = load_model(args.model, "none", seed=0)
    variants = build_variants(loaded.model.visual, loaded.mean, loaded.std)
    shipped = variants[SHIPPED]
    images = np.random.default_rng(0).integers(0, 256, (1, *shipped.spec.image_size, 3), dtype=np.uint8)
    x = torch.from_numpy(images)
    with torch.inference_mode():
        reference = {k: v.numpy() for k, v in shipped(x).items()}
        exactness = {name: max_diff({k: v.numpy() for k, v in m(x).items()}, reference) for name, m in variants.items()}
    for name, diff in exactness.items():
        print(f"[exact] {name}: max abs difference from shipped {diff:.1e}", file=sys.stderr)

    device = torch.device(args.device)
    x_dev = x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def torch_call(module: nn.Module) -> Callable[[], object]:
        module.to(device)

        def call() -> object:
            with torch.inference_mode():
                out = module(x_dev)
            sync()
            return out
        return call

    print(f"[exact] torch {device}: {args.warmup} + {args.iters} interleaved rounds ...", file=sys.stderr)
    timings = {"torch": interleaved({n: torch_call(m) for n, m in variants.items()}, args.warmup, args.iters)}
    for m in variants.values():
        m.to("cpu")
    if not args.no_onnx:
        import onnxruntime as ort

        names = output_names(shipped.spec.scales)
        with tempfile.TemporaryDirectory(prefix="exact-speedups-") as tmp:
            sessions = {}
            for i, (name, module) in enumerate(variants.items()):
                print(f"[exact] exporting {name} ...", file=sys.stderr)
                path = Path(tmp) / f"v{i}.onnx"
                fastpath = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused kernel has no ONNX symbolic
                try:
                    export_onnx(module, path)
                finally:
                    torch.backends.mha.set_fastpath_enabled(fastpath)
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            onnx_ref = dict(zip(names, sessions[SHIPPED].run(names, {INPUT_NAME: images})))
            for name, session in sessions.items():
                diff = max_diff(dict(zip(names, session.run(names, {INPUT_NAME: images}))), onnx_ref)
                exactness[name] = max(exactness[name], diff)
            print(f"[exact] onnxruntime CPU: {args.warmup} + {args.iters} interleaved rounds ...", file=sys.stderr)
            timings["onnxruntime CPU"] = interleaved(
                {n: (lambda s=s: s.run(names, {INPUT_NAME: images})) for n, s in sessions.items()}, args.warmup, args.iters)

    stats = {rt: {n: latency_stats(v) for n, v in per.items()} for rt, per in timings.items()}
    rows = []
    for runtime, per in stats.items():
        base = per[SHIPPED].p50_ms
        for name, s in per.items():
            rows.append([runtime, name, f"{s.p50_ms:.0f}", f"{s.min_ms:.0f} - {s.max_ms:.0f}",
                         "-" if name == SHIPPED else f"{100 * (s.p50_ms / base - 1):+.1f} %",
                         f"{exactness[name]:.1e}" if name != SHIPPED else "(reference)"])
    mach = machine_info()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    command = shlex.join([sys.executable, *sys.argv])
    load_after = [round(v, 2) for v in os.getloadavg()]
    markdown = "\n".join([
        f"# Exact speed-ups of the export graph: {loaded.model_name} (random weights), batch 1",
        "",
        f"- date (UTC): {date}; command: `{command}`",
        f"- machine: {mach['cpu']}, {mach['cores']} logical cores, {mach['ram_gib']} GiB RAM, GPU: "
        f"{', '.join(mach['gpus']) or 'none'}; torch device {device}",
        f"- load average before {load_before}, after {load_after}; {args.warmup} + {args.iters} interleaved rounds",
        f"- versions: {', '.join(f'{k} {v}' for k, v in software_versions().items())}",
        "",
        "'slower than shipped' = how much time each exact saving of the shipped graph saves; the difference",
        "column shows that every variant computes the same outputs (max abs difference, unit vectors).",
        "",
        markdown_table(["runtime", "variant", "median ms per image", "min - max ms", "slower than shipped",
                        "max abs diff vs shipped"], rows),
    ])
    report = {"date": date, "command": command, "machine": mach, "versions": software_versions(),
              "model": loaded.model_name, "device": str(device), "load_average_before": load_before,
              "load_average_after": load_after, "exactness_max_abs": exactness,
              "timings_ms": timings, "tolerance": EXACT_TOLERANCE}
    stamp = date.replace("-", "").replace(":", "")[:15]
    md, js = write_report(args.out, f"exact_speedups_{Path(loaded.model_name).name}_{device.type}_{stamp}", report, markdown)
    print(markdown)
    print(f"\nwritten: {md} and {js}", file=sys.stderr)
    worst = max(exactness.values())
    if worst > EXACT_TOLERANCE:
        print(f"error: a variant differs from the shipped graph by {worst:.1e} > {EXACT_TOLERANCE:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
