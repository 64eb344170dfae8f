"""Benchmarks: latency percentiles and throughput per batch size, the split into pipeline stages, cold start,
peak memory and (for fp16 / int8) fidelity against fp32, written as Markdown + JSON with the machine,
versions, load and exact command line (docs/architecture.md, Conventions: every number states what it was measured on).

The timing helpers (:func:`time_calls`, :func:`latency_stats`, :func:`cold_start`, :func:`peak_rss_mib`,
:func:`machine_info`, :func:`software_versions`, :func:`markdown_table`, :func:`write_report`) take plain
callables and command lines, so other harnesses (``benchmarks/anomalib_compare.py``) reuse them.

Stages of one benchmark iteration (sequential, so that each is timed alone; ``infer`` overlaps decoding
with the engine): decode + resize (``inspector.decode``), engine (``Inspector.embed``), scoring and fusion
(``Inspector.score``), resize + overlay at the original size (``heatmap.upsample_map`` / ``overlay``).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..engines.config import EngineConfig
from ..errors import WinclipError
from .machine import cpu_model, gpus, installed_versions
from ..samples import load_model_inputs, synthetic_images
from ..scoring import ScoringOptions

RESULT_MARKER = "WINCLIP_BENCH_RESULT "  # a cold-start child prints this + JSON when its first result exists
DEFAULT_OUT = "benchmarks/results"
DEFAULT_BATCHES = (1, 4, 8)
DEFAULT_SYNTHETIC_SIZE = (1024, 1024)  # (H, W) of generated frames: MVTec-like resolution
DEFAULT_FIDELITY_IMAGES = 4
COLD_START_TIMEOUT_S = 900.0
PERCENTILES = (50, 90, 99)
# Distributions whose versions a report lists (the ones present).
VERSIONED_PACKAGES = ("numpy", "opencv-python-headless", "opencv-python", "onnxruntime", "onnxruntime-gpu", "onnx",
                      "torch", "open_clip_torch", "tensorrt", "anomalib", "openvino", "nncf")
_KIB_PER_MIB = 1024.0


class BenchError(WinclipError, ValueError):
    """A benchmark that cannot run as asked (no images, bad counts)."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: one bundle, product, engine and scoring setup, several batch sizes."""

    bundle: Path
    product: str
    engine: EngineConfig = EngineConfig()
    options: ScoringOptions = ScoringOptions()
    sigma: float = 0.0
    batches: tuple[int, ...] = DEFAULT_BATCHES
    images: str = "8"  # a count of synthetic frames, or a folder / glob of images
    synthetic_size: tuple[int, int] = DEFAULT_SYNTHETIC_SIZE
    warmup: int = 1
    iters: int = 5
    fidelity_images: int = DEFAULT_FIDELITY_IMAGES
    cold_start: bool = True
    roofline: bool = True  # GFLOP/s achieved and the fraction of a measured GEMM peak (roofline.py)
    progress: bool = True
    command: str = ""  # the command line that asked for it, for the report

    def check(self) -> None:
        if min(self.batches, default=0) < 1 or self.iters < 1 or self.warmup < 0:
            raise BenchError(f"need batch sizes >= 1 (got {list(self.batches)}), --iters >= 1 (got {self.iters}) "
                             f"and --warmup >= 0 (got {self.warmup})")


# ---------------------------------------------------------------- timing helpers (library)
@dataclass(frozen=True)
class LatencyStats:
    """Percentiles of a list of durations, in milliseconds."""

    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float


def latency_stats(samples_ms: Sequence[float]) -> LatencyStats:
    if len(samples_ms) == 0:
        raise ValueError("no timing samples: run at least one iteration")
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, PERCENTILES)
    return LatencyStats(n=int(a.size), mean_ms=float(a.mean()), p50_ms=float(p50), p90_ms=float(p90),
                        p99_ms=float(p99), min_ms=float(a.min()), max_ms=float(a.max()))


def time_calls(fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``iters`` times; returns the durations in ms.
    ``fn`` must return only when its work is done (e.g. synchronise a GPU inside it)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def interleaved(calls: dict[str, Callable[[], Any]], warmup: int, iters: int) -> dict[str, list[float]]:
    """ms per call of each entry, calling every entry once per round: on a shared machine a change of load
    then hits every entry alike (compare entries measured this way, not separate runs)."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB.

    Linux: VmHWM of /proc/self/status (per address space, so a child started with fork + exec reports its own
    peak; ru_maxrss carries the parent's peak over into it). Elsewhere: ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / _KIB_PER_MIB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / _KIB_PER_MIB


@dataclass(frozen=True)
class ColdStart:
    seconds: float  # from spawning the process to reading its result line
    report: dict | None  # the JSON the child printed after the marker (its own phase timings, peak RSS)
    returncode: int | None


def cold_start(argv: Sequence[str], marker: str = RESULT_MARKER, timeout_s: float = COLD_START_TIMEOUT_S,
               env: dict | None = None) -> ColdStart:
    """Spawn ``argv`` and time it until it prints a line starting with ``marker`` (then let it finish).

    The child's stdout is read line by line; what follows the marker is parsed as JSON when it is JSON.
    Raises RuntimeError with the child's stderr tail when it exits without the marker or runs past ``timeout_s``.
    """
    seconds, payload = None, None
    with tempfile.TemporaryFile(mode="w+") as stderr:  # a file, not a pipe: a chatty child cannot block on it
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        killer = threading.Timer(timeout_s, proc.kill)
        killer.start()
        try:
            for line in proc.stdout:
                if line.startswith(marker):
                    seconds = time.perf_counter() - t0
                    payload = line[len(marker):].strip()
                    break
            proc.communicate()
        finally:
            killer.cancel()
        stderr.seek(0)
        tail = stderr.read().strip().splitlines()[-5:]
    if seconds is None:
        raise RuntimeError(f"cold-start child {shlex.join(list(argv))[:200]} gave no {marker.strip()!r} line within "
                           f"{timeout_s:.0f} s (exit code {proc.returncode}); its stderr ends with: "
                           f"{' | '.join(tail) or '(empty)'}")
    try:
        report = json.loads(payload) if payload else None
    except ValueError:
        report = None
    return ColdStart(seconds=seconds, report=report, returncode=proc.returncode)


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """CPU model, logical cores, RAM, GPUs, OS and the current load average (the CPU may be shared)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": _ram_gib(), "gpus": gpus(details=True),
            "os": platform.platform(), "python": platform.python_version(),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def software_versions(packages: Sequence[str] = VERSIONED_PACKAGES) -> dict:
    """Installed versions of ``packages`` (absent ones left out); torch's CUDA version when torch is loaded."""
    versions = installed_versions(packages)
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None):
        versions["torch_cuda"] = torch.version.cuda
    return versions


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, stem: str, report: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` under ``out_dir`` (atomically); returns both paths."""
    from ..fileio import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    atomic_write_bytes(md, (markdown.rstrip() + "\n").encode())
    atomic_write_json(js, report)
    return md, js


# ---------------------------------------------------------------- the pipeline, stage by stage
STAGES = ("decode", "engine", "scoring", "resize_overlay")


def pipeline_once(inspector: Any, items: Sequence[Any]) -> dict[str, float]:
    """One batch through the Inspector's building blocks, each stage timed alone: stage -> ms for the batch."""
    from ..heatmap import overlay, upsample_map
    from ..preprocess import ImageError
    from ..samples import decode, name_of

    t0 = time.perf_counter()
    decoded = [decode(item, inspector.model_size, name_of(item, i))
               for i, item in enumerate(items)]
    failed = [d.error for d in decoded if d.error is not None]
    if failed:
        raise ImageError(f"benchmark input unreadable: {failed[0]}; benchmark readable images only")
    t1 = time.perf_counter()
    outputs = inspector.embed(np.stack([d.model_input for d in decoded]))
    t2 = time.perf_counter()
    scores = inspector.score(outputs)
    t3 = time.perf_counter()
    for i, d in enumerate(decoded):
        full = upsample_map(scores.token_map[i], d.image.shape[:2], inspector.sigma)
        overlay(d.image, full, f"score {scores.image_score[i]:.4f}", (float(full.min()), float(full.max())))
    t4 = time.perf_counter()
    return {"decode": (t1 - t0) * 1e3, "engine": (t2 - t1) * 1e3, "scoring": (t3 - t2) * 1e3,
            "resize_overlay": (t4 - t3) * 1e3}


def bench_batch(inspector: Any, images: Sequence[Any], batch: int, warmup: int, iters: int,
                progress: Callable[[], None] | None = None) -> dict:
    """Latency percentiles, throughput and the stage split of ``batch``-image calls (images reused cyclically)."""
    stages: list[dict[str, float]] = []
    for i in range(warmup + iters):
        items = [images[(i * batch + j) % len(images)] for j in range(batch)]
        timing = pipeline_once(inspector, items)
        if i >= warmup:
            stages.append(timing)
        if progress is not None:
            progress()
    totals = [sum(s.values()) for s in stages]
    stats = latency_stats(totals)
    return {
        "batch": batch, "iterations": iters, "warmup": warmup,
        "latency_ms": dataclasses.asdict(stats),  # per call = what each image of the batch waits
        "ms_per_image": stats.mean_ms / batch,
        "images_per_s": 1e3 * batch / stats.mean_ms,
        "stages_ms_per_image": {k: float(np.mean([s[k] for s in stages])) / batch for k in STAGES},
    }


# ---------------------------------------------------------------- cold start child
_CHILD_CODE = "import sys; from winclip_edge.performance.bench import cold_start_child; cold_start_child(sys.argv[1], sys.argv[2])"


def _inspector(config: BenchConfig, engine: EngineConfig | None = None, bundle: Any = None) -> Any:
    from ..inspector import Inspector

    return Inspector(bundle or config.bundle, config.product, engine=engine or config.engine, options=config.options,
                     sigma=config.sigma)


def _child_args(config: BenchConfig, engine: EngineConfig) -> str:
    """The Inspector's inputs as JSON (the child rebuilds the same Inspector, on the engine the benchmark ran)."""
    from ..engines.registry import config_to_dict

    return json.dumps({"bundle": str(config.bundle), "product": config.product, "sigma": config.sigma,
                       "engine": config_to_dict(engine), "options": dataclasses.asdict(config.options)})


def cold_start_child(args_json: str, image: str) -> None:
    """Run in a fresh interpreter: build the Inspector as the benchmark did, inspect one image, print the marker."""
    from ..engines.registry import config_from_dict
    from ..inspector import Inspector
    from ..scoring import ScoringOptions

    t1 = time.perf_counter()
    spec = json.loads(args_json)
    options = spec["options"]
    options["scales"] = tuple(options["scales"]) if options["scales"] is not None else None
    inspector = Inspector(spec["bundle"], spec["product"], engine=config_from_dict(spec["engine"]),
                          options=ScoringOptions(**options), sigma=spec["sigma"])
    t2 = time.perf_counter()
    (result,) = inspector.inspect([image], batch_size=1)
    if result.error is not None:
        raise SystemExit(f"cold start: {result.error}")
    t3 = time.perf_counter()
    report = {"load_s": t2 - t1, "first_image_s": t3 - t2, "peak_rss_mib": peak_rss_mib(),
              "engine_device": inspector.engine.device}
    print(RESULT_MARKER + json.dumps(report), flush=True)


# ---------------------------------------------------------------- the benchmark
def _images(spec: str, folder: Path, size: tuple[int, int]) -> tuple[list[str], str]:
    from ..inputs import collect_inputs

    if spec.isdigit():
        count = int(spec)
        if count < 1:
            raise BenchError(f"--images needs at least 1 image, got {count}")
        return synthetic_images(count, size, folder), f"{count} synthetic {size[0]}x{size[1]} PNG frames"
    paths = collect_inputs([spec])
    if not paths or not Path(paths[0]).exists():
        raise BenchError(f"--images {spec!r}: no images there (give a count for synthetic frames, or a folder/glob)")
    return paths, f"{len(paths)} image(s) from {spec}"


def _model_inputs(inspector: Any, paths: Sequence[str], count: int) -> np.ndarray:
    from ..preprocess import ImageError

    loaded = load_model_inputs(inspector.model_size, paths[:count])
    if loaded.skipped:
        raise ImageError(f"fidelity input unreadable: {loaded.skipped[0][1]}; benchmark readable images only")
    return loaded.images


def _gpu_peak_mib() -> float | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _fp32_reference(engine: EngineConfig) -> EngineConfig:
    """The same engine at fp32 (and without CUDA graphs, which change no number): what fidelity compares with."""
    from ..engines.torch import TorchOptions

    options = engine.options
    if isinstance(options, TorchOptions):
        options = dataclasses.replace(options, cuda_graphs=False)
    return dataclasses.replace(engine, precision="fp32", options=options)


def run_bench(config: BenchConfig) -> dict:
    """The whole benchmark of one backend / precision; returns the report (write it with :func:`write_report`)."""
    from tqdm import tqdm

    from ..engines.onnx_variants import variant_metadata
    from .fidelity import embed_and_score, fidelity

    config.check()
    load_before = [round(v, 2) for v in os.getloadavg()]
    report: dict = {"command": config.command, "cwd": os.getcwd(),
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "machine": machine_info(), "backend": None, "precision": None}
    with tempfile.TemporaryDirectory(prefix="winclip-bench-") as tmp:
        paths, source = _images(config.images, Path(tmp) / "frames", config.synthetic_size)
        t0 = time.perf_counter()
        inspector = _inspector(config)  # opens the bundle once and selects the engine (engines/auto.py)
        load_s = time.perf_counter() - t0
        engine = inspector.selection.config
        report.update(backend=engine.backend, precision=engine.precision, engine_selection=inspector.selection.reason)
        m = inspector.bundle.manifest
        report.update({
            "versions": software_versions(),
            "bundle": {"path": str(inspector.bundle.root), "model": m.model, "weights": m.weights["source"],
                       "image_size": list(m.image_size), "scales": list(m.scales), "stride": m.stride},
            "product": config.product, "mode": inspector.mode, "engine": inspector.engine.name,
            "engine_device": inspector.engine.device, "engine_load_s": load_s,
            "images": source, "batches": [],
        })
        if engine.backend == "onnxruntime" and engine.precision != "fp32":
            meta = variant_metadata(inspector.bundle, engine.precision)
            report["variant"] = {k: meta[k] for k in ("file", "file_sha256", "method", "calibration_images")}
        total = len(config.batches) * (config.warmup + config.iters)
        with tqdm(total=total, desc="bench", unit="call", disable=not config.progress, file=sys.stderr) as bar:
            for batch in config.batches:
                bar.set_description(f"bench batch {batch}")
                report["batches"].append(bench_batch(inspector, paths, batch, config.warmup, config.iters, bar.update))
        report["peak_rss_mib"] = peak_rss_mib()
        report["gpu_peak_allocated_mib"] = _gpu_peak_mib()
        if config.roofline:
            report["roofline"] = roofline_report(inspector.bundle, inspector.engine.device, engine.precision,
                                                 report["batches"])
        if config.cold_start:
            try:
                child = cold_start([sys.executable, "-c", _CHILD_CODE, _child_args(config, engine), paths[0]])
                report["cold_start"] = {"seconds_to_first_result": child.seconds, **(child.report or {})}
            except RuntimeError as err:  # the rest of the report still stands
                report["cold_start_error"] = str(err)
                print(f"warning: {err}", file=sys.stderr)
        if engine.precision != "fp32":
            inputs = _model_inputs(inspector, paths, config.fidelity_images)
            batch = max(config.batches)
            candidate = embed_and_score(inspector.embed, inspector.score, inputs, batch)
            inspector.close()
            reference = _inspector(config, _fp32_reference(engine), inspector.bundle)
            fid = fidelity(embed_and_score(reference.embed, reference.score, inputs, batch), candidate)
            report["fidelity"] = {"reference": f"{reference.engine.name} fp32 ({reference.engine.device})",
                                  **dataclasses.asdict(fid), "faithful": fid.faithful}
            reference.close()
        else:
            inspector.close()
    report["load_average_before"], report["load_average_after"] = load_before, [round(v, 2) for v in os.getloadavg()]
    return report


def roofline_report(bundle: Any, device: str, precision: str, batches: Sequence[dict]) -> dict:
    """GFLOP per image, GFLOP/s the engine achieved per batch size and its fraction of a GEMM peak measured now."""
    from .roofline import gemm_peak, model_gflop

    gflop = model_gflop(bundle.onnx_path, bundle.spec.image_size)
    if gflop is None:
        return {"summary": "not measured (counting the graph's FLOPs needs openvino: pip install 'winclip-edge[openvino]')"}
    rates = {x["batch"]: gflop / (x["stages_ms_per_image"]["engine"] / 1e3) for x in batches}
    achieved = ", ".join(f"batch {b}: {v:.0f} GFLOP/s" for b, v in rates.items())
    out = {"gflop_per_image": gflop, "achieved_gflops": rates}
    if "cpu" not in device.lower():  # the probes are CPU GEMMs
        out["summary"] = f"{gflop:.4g} GFLOP per image (MatMul + Conv); {achieved}; no GEMM peak probe for {device}"
        return out
    peak = gemm_peak(precision)
    out.update(peak=dataclasses.asdict(peak))
    if peak.gflops is None:
        out["summary"] = f"{gflop:.4g} GFLOP per image; {achieved}; no {precision} GEMM probe runs on this CPU"
        return out
    fractions = ", ".join(f"batch {b}: {v / peak.gflops:.0%}" for b, v in rates.items())
    out["fraction_of_peak"] = {b: v / peak.gflops for b, v in rates.items()}
    probes = ", ".join(f"{k} {v}" for k, v in peak.probes.items())
    out["summary"] = (f"{gflop:.4g} GFLOP per image (MatMul + Conv, counted by OpenVINO at batch 1); engine {achieved}; "
                      f"measured {precision} GEMM peak {peak.gflops:.0f} GFLOP/s (square GEMM under the run's load: "
                      f"{probes}) -> {fractions} of it")
    return out


# ---------------------------------------------------------------- Markdown
def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def render_markdown(r: dict) -> str:
    mach, b = r["machine"], r["bundle"]
    lines = [
        f"# winclip-edge bench: {b['model']} ({b['weights']} weights), {r['engine']} {r['precision']} "
        f"on {r['engine_device']}",
        "",
        f"- date (UTC): {r['date']}",
        f"- command: `{r['command']}` (in `{r['cwd']}`)",
        f"- machine: {mach['cpu']}, {mach['cores']} logical cores, {mach['ram_gib']} GiB RAM, "
        f"GPU: {', '.join(mach['gpus']) or 'none'}; {mach['os']}",
        f"- load average (1/5/15 min) before: {r['load_average_before']}, after: {r['load_average_after']}"
        + (" (the CPU was shared: numbers are pessimistic)" if r["load_average_before"][0] > 0.5 * mach["cores"] else ""),
        f"- versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}",
        f"- bundle: `{b['path']}` ({b['image_size'][0]}x{b['image_size'][1]}, scales {b['scales']}, stride "
        f"{b['stride']}), product `{r['product']}`, {r['mode']}",
        f"- images: {r['images']}, decoded from disk every iteration; engine load {r['engine_load_s']:.1f} s",
        *([f"- variant: `{r['variant']['file']}` (sha256 {r['variant']['file_sha256'][:12]}...): {r['variant']['method']}"]
          if "variant" in r else []),
        "",
        "Latency is per engine call (what every image of the batch waits), stages are sequential (no overlap).",
        "",
    ]
    rows = []
    for x in r["batches"]:
        lat, st = x["latency_ms"], x["stages_ms_per_image"]
        rows.append([x["batch"], f"{_ms(lat['p50_ms'])} / {_ms(lat['p90_ms'])} / {_ms(lat['p99_ms'])}",
                     _ms(x["ms_per_image"]), f"{x['images_per_s']:.2f}", *(_ms(st[k]) for k in STAGES),
                     f"{x['warmup']} + {x['iterations']}"])
    lines.append(markdown_table(
        ["batch", "latency p50 / p90 / p99 (ms per call)", "ms per image", "images/s", "decode+resize (ms/img)",
         "engine (ms/img)", "scoring+fusion (ms/img)", "map resize+overlay (ms/img)", "warm-up + timed calls"], rows))
    lines.append("")
    memory = f"- peak RSS of the benchmark process: {r['peak_rss_mib']:.0f} MiB"
    if r.get("gpu_peak_allocated_mib") is not None:
        memory += f"; GPU peak allocated by torch: {r['gpu_peak_allocated_mib']:.0f} MiB"
    lines.append(memory)
    if "cold_start" in r:
        c = r["cold_start"]
        total, load, first = c["seconds_to_first_result"], c["load_s"], c["first_image_s"]
        lines.append(f"- cold start (fresh process, spawn to first result, one image): {total:.1f} s (interpreter + "
                     f"imports {total - load - first:.1f} s, bundle check + engine load {load:.1f} s, first image "
                     f"{first:.1f} s); its peak RSS {c['peak_rss_mib']:.0f} MiB")
    if "cold_start_error" in r:
        lines.append(f"- cold start: FAILED ({r['cold_start_error']})")
    if "roofline" in r:
        lines.append(f"- compute: {r['roofline']['summary']}")
    if "fidelity" in r:
        f = r["fidelity"]
        emb = ", ".join(f"{k} {v:.1e}" for k, v in f["embedding_max_abs"].items())
        lines += ["", f"Fidelity against {f['reference']} on the same {f['images']} image(s) (absolute differences; "
                      "scores and maps in [0, 1], embeddings are unit vectors):", "",
                  markdown_table(["image score max / mean", "token map max / mean", "embeddings max", "faithful?"],
                                 [[f"{f['score_max_abs']:.2e} / {f['score_mean_abs']:.2e}",
                                   f"{f['map_max_abs']:.2e} / {f['map_mean_abs']:.2e}", emb,
                                   "yes" if f["faithful"] else "NO"]])]
    if b["weights"] == "none":
        lines += ["", "Random weights (timing only): speed does not depend on the weights; fidelity of a low-precision "
                      "variant may differ with pretrained weights (their activations have larger outliers)."]
    return "\n".join(lines)


def summary_table(reports: Sequence[dict]) -> str:
    """One row per (report, batch size): the comparison table of several runs (e.g. benchmarks/gpu_check.sh)."""
    rows = []
    for r in reports:
        fid = r.get("fidelity")
        static = r.get("variant", {}).get("calibration_images", 0) > 0
        for x in r["batches"]:
            rows.append([r["bundle"]["model"], r["engine"], r["precision"] + (" static" if static else ""),
                         r["engine_device"], x["batch"],
                         _ms(x["latency_ms"]["p50_ms"]), _ms(x["ms_per_image"]),
                         _ms(x["stages_ms_per_image"]["engine"]), f"{x['images_per_s']:.2f}",
                         f"{r['cold_start']['seconds_to_first_result']:.1f}" if "cold_start" in r else "-",
                         f"{r['peak_rss_mib']:.0f}",
                         f"{fid['score_max_abs']:.1e} / {fid['map_max_abs']:.1e}" if fid else "(reference)",
                         f"{r['load_average_before'][0]:.1f}"])
    return markdown_table(["model", "backend", "precision", "device", "batch", "p50 ms/call", "ms/img",
                           "engine ms/img", "img/s", "cold start s", "peak RSS MiB", "fidelity score / map max",
                           "load avg"], rows)


# ---------------------------------------------------------------- file names
def report_stem(r: dict) -> str:
    """File name (without suffix) of a report: model, engine, precision, cpu/gpu, UTC time."""
    on_cpu = r["engine_device"].lower().startswith("cpu")  # "cpu, torch fp32", "CPUExecutionProvider"
    device = "cpu" if on_cpu else "remote" if r["engine"] == "triton" else "gpu"  # triton: the server's device
    stamp = r["date"].replace("-", "").replace(":", "")[:15]
    return f"{Path(r['bundle']['model']).name}_{r['engine']}_{r['precision']}_{device}_{stamp}"


__all__ = ["BenchConfig", "BenchError", "ColdStart", "LatencyStats", "RESULT_MARKER", "bench_batch", "cold_start",
           "interleaved", "latency_stats", "machine_info", "markdown_table", "peak_rss_mib", "pipeline_once", "render_markdown",
           "report_stem", "run_bench", "software_versions", "summary_table", "synthetic_images", "time_calls", "write_report"]
