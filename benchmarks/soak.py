#!/usr/bin/env python
"""Soak test: a long stream of images through one ``winclip-edge infer`` must not grow its memory.

A tiny random-weight bundle (exported, registered and calibrated in subprocesses, so this process stays
torch-free) inspects ``--images`` inputs (default 2,400) cycling the textile images of the
``conformal-clip-data`` package, with a bad file (empty, truncated JPEG, text named .png) every
``--bad-every`` inputs; maps and overlays are written as in production. A sampler thread reads this
process's resident memory (VmRSS, /proc/self/status) and the number of results written, every
``--interval`` seconds. Pass: after the warm-up (first ``--warmup`` fraction of the inputs) the RSS never
rises more than ``--max-growth`` (5%) above its level at the end of the warm-up, every good image has a
result and every bad one an error line. Run from the repository root (Linux, ~3-6 min on 2 cores)::

    python benchmarks/soak.py                       # -> benchmarks/results/soak_<date>.md + .json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from itertools import cycle
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from winclip_edge import cli  # noqa: E402
from winclip_edge.performance.bench import machine_info, markdown_table, software_versions, write_report  # noqa: E402
from winclip_edge.evaluation.datasets import textile_root  # noqa: E402

PRODUCT = "textile"
TINY_CONFIG = {  # tests/conftest.py "tiny240": the default model's 15x15 grid at a fraction of its cost
    "embed_dim": 32,
    "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
REFERENCES = 4  # nominal images in the few-shot memory
PROCESS_STATUS = Path("/proc/self/status")
KIB_PER_MIB = 1024.0
REFERENCE_SAMPLES = 5  # samples right after the warm-up whose median is the reference level
STEPS_IN_REPORT = 20  # rows of the RSS-over-time table


def rss_kib() -> int:
    for line in PROCESS_STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in {PROCESS_STATUS}")


class Sampler(threading.Thread):
    """Every ``interval`` s: (seconds since start, results written so far, RSS in KiB); ``after``: one more sample
    once ``infer`` has returned (its Inspector freed), kept apart from the run's samples."""

    def __init__(self, results: Path, interval: float):
        super().__init__(daemon=True, name="soak-sampler")
        self.results, self.interval = results, interval
        self.samples: list[tuple[float, int, int]] = []
        self.after: tuple[float, int, int] | None = None
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def measure(self) -> tuple[float, int, int]:
        done = self.results.read_bytes().count(b"\n") if self.results.is_file() else 0
        return round(time.monotonic() - self._t0, 3), done, rss_kib()

    def sample(self) -> None:
        self.samples.append(self.measure())

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.after = self.measure()


def cli_step(*args: str) -> None:
    """One CLI command in a subprocess (export/register/calibrate: keeps torch out of the measured process)."""
    run = subprocess.run([sys.executable, "-m", "winclip_edge.cli", *args, "--quiet"], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"soak set-up failed: winclip-edge {' '.join(args)}\n{run.stderr}")


def make_bundle(work: Path, references: list[str]) -> Path:
    config = work / "tiny240.json"
    config.write_text(json.dumps(TINY_CONFIG))
    bundle = work / "bundle"
    cli_step("export", "--model", str(config), "--pretrained", "none", "--products", PRODUCT, "--out", str(bundle))
    cli_step("register", "--bundle", str(bundle), "--product", PRODUCT, *references)
    cli_step("calibrate", "--bundle", str(bundle), "--product", PRODUCT)
    return bundle


def bad_files(folder: Path) -> list[str]:
    """Inputs that must each give an error line and nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    good = next(textile_root().rglob("*.jpg")).read_bytes()
    files = {"empty.png": b"", "truncated.jpg": good[: len(good) // 2], "notes.png": b"not an image\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in files]


def stream(n: int, bad_every: int, bad: list[str]) -> list[str]:
    """``n`` inputs cycling the textile images (sorted, all classes) with a bad file every ``bad_every``."""
    good, wrong = cycle(sorted(str(p) for p in textile_root().rglob("*.jpg"))), cycle(bad)
    return [next(wrong) if bad_every and (i + 1) % bad_every == 0 else next(good) for i in range(n)]


def analyse(samples: list[tuple[float, int, int]], total: int, warmup_fraction: float) -> dict:
    warm = [s for s in samples if s[1] >= warmup_fraction * total]
    if len(warm) < REFERENCE_SAMPLES + 1:
        raise SystemExit(f"only {len(warm)} samples after the warm-up: lower --interval or raise --images")
    reference = float(np.median([s[2] for s in warm[:REFERENCE_SAMPLES]]))
    peak = max(s[2] for s in warm)
    final = warm[-1][2]
    done = np.array([s[1] for s in warm], np.float64)
    rss = np.array([s[2] for s in warm], np.float64)
    slope = float(np.polyfit(done, rss, 1)[0]) * 1000 if np.ptp(done) > 0 else 0.0  # KiB per 1,000 images
    return {"warmup_images": int(warmup_fraction * total), "reference_rss_mib": reference / KIB_PER_MIB,
            "peak_rss_after_warmup_mib": peak / KIB_PER_MIB, "final_rss_mib": final / KIB_PER_MIB,
            "peak_growth": peak / reference - 1.0, "final_growth": final / reference - 1.0,
            "slope_kib_per_1000_images": slope,
            "rss_at_start_mib": samples[0][2] / KIB_PER_MIB, "samples_after_warmup": len(warm)}


def render(report: dict) -> str:
    a, m = report["analysis"], report["machine"]
    verdict = "PASS" if report["passed"] else "FAIL"
    steps = report["samples"][:: max(1, len(report["samples"]) // STEPS_IN_REPORT)] + report["samples"][-1:]
    rows = [(f"{t:.1f}", done, f"{kib / KIB_PER_MIB:.1f}") for t, done, kib in steps]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    v = TINY_CONFIG["vision_cfg"]
    model = f"{v['image_size']} px, patch {v['patch_size']}, {v['layers']} layers, width {v['width']}"
    return f"""# winclip-edge soak: {report['inputs']} inputs through one `infer` -- {verdict}

- date (UTC): {report['date']}
- command: `{report['command']}` (in `{report['cwd']}`)
- machine: {m['cpu']}, {m['cores']} logical cores, {m['ram_gib']} GiB RAM; {m['os']}; load average before {m['load_average']}, after {report['load_average_after']}
- versions: {versions}
- bundle: tiny random-weight ViT ({model}), product `{PRODUCT}`, few-shot K={REFERENCES}, calibrated threshold; ONNX Runtime CPU, batch {report['batch']}
- inputs: {report['inputs']} = {report['good']} textile images (conformal-clip-data, {report['distinct_images']} distinct, cycled) + {report['bad']} bad files (empty, truncated JPEG, text named .png) every {report['bad_every']}th; maps (.npy) and overlays (.png) written
- outcome: exit code {report['exit_code']}, {report['results_ok']} results, {report['results_error']} error lines, {report['seconds']:.0f} s ({report['seconds'] * 1000 / report['inputs']:.1f} ms per input end to end)

Resident memory (VmRSS of the process running `infer`), sampled every {report['interval_s']} s:

| | |
|---|---|
| at start (before the bundle loads) | {a['rss_at_start_mib']:.1f} MiB |
| reference: end of warm-up (first {a['warmup_images']} inputs), median of {REFERENCE_SAMPLES} samples | {a['reference_rss_mib']:.1f} MiB |
| peak after warm-up | {a['peak_rss_after_warmup_mib']:.1f} MiB (**{a['peak_growth']:+.2%}**, limit {report['max_growth']:+.0%}) |
| at the end of the stream | {a['final_rss_mib']:.1f} MiB ({a['final_growth']:+.2%}) |
| after `infer` returned (Inspector freed) | {report['rss_after_infer_mib']:.1f} MiB |
| linear trend after warm-up | {a['slope_kib_per_1000_images']:+.0f} KiB per 1,000 inputs |

RSS over time:

{markdown_table(["s", "results written", "RSS (MiB)"], rows)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2400, help="inputs to stream (default 2400)")
    parser.add_argument("--bad-every", type=int, default=100, help="a bad file every N inputs (0 = none; default 100)")
    parser.add_argument("--batch", type=int, default=8, help="infer --batch (default 8)")
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the inputs (default 0.1)")
    parser.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up (default 0.05)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples (default 0.5)")
    parser.add_argument("--out", default="benchmarks/results", help="folder of the report (default benchmarks/results)")
    parser.add_argument("--work", help="working folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args(argv)
    if not PROCESS_STATUS.is_file():
        raise SystemExit("the soak test reads /proc/self/status: Linux only")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="winclip-soak-"))
    try:
        textile = sorted(str(p) for p in textile_root().rglob("*.jpg"))
        nominal = sorted(str(p) for p in (textile_root() / "nominal").glob("*.jpg"))
        print(f"[soak] set-up: tiny bundle + {REFERENCES} references in {work}", file=sys.stderr)
        bundle = make_bundle(work, nominal[:REFERENCES])
        inputs = stream(args.images, args.bad_every, bad_files(work / "bad"))
        n_bad = args.images // args.bad_every if args.bad_every else 0
        out = work / "infer"
        machine = machine_info()
        sampler = Sampler(out / "results.jsonl", args.interval)
        sampler.sample()
        sampler.start()
        print(f"[soak] streaming {len(inputs)} inputs through infer ...", file=sys.stderr)
        t0 = time.monotonic()
        code = cli.main(["infer", "--bundle", str(bundle), "--product", PRODUCT, "--out", str(out), "--quiet",
                         "--batch", str(args.batch), *inputs])
        seconds = time.monotonic() - t0
        sampler.stop()  # the run's samples end with the thread's last one (Inspector alive); then one "after"
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    errors = sum(r["error"] is not None for r in records)
    analysis = analyse(sampler.samples, len(inputs), args.warmup)
    passed = (analysis["peak_growth"] < args.max_growth and len(records) == len(inputs) and errors == n_bad
              and code == (cli.EXIT_SOME_FAILED if n_bad else cli.EXIT_OK))
    now = _dt.datetime.now(_dt.timezone.utc)
    report = {
        "date": now.isoformat(timespec="seconds"), "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": str(Path.cwd()), "machine": machine, "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "versions": software_versions(), "inputs": len(inputs), "good": len(inputs) - n_bad, "bad": n_bad,
        "bad_every": args.bad_every, "distinct_images": len(textile), "batch": args.batch, "interval_s": args.interval,
        "max_growth": args.max_growth, "exit_code": code, "results_ok": len(records) - errors, "results_error": errors,
        "seconds": seconds, "analysis": analysis, "rss_after_infer_mib": sampler.after[2] / KIB_PER_MIB,
        "passed": passed, "samples": sampler.samples,
    }
    md, js = write_report(args.out, f"soak_{now:%Y%m%d}", report, render(report))
    print(f"[soak] {'PASS' if passed else 'FAIL'}: RSS after warm-up peak {analysis['peak_growth']:+.2%}, end "
          f"{analysis['final_growth']:+.2%} (limit {args.max_growth:+.0%}); {len(records) - errors} results, "
          f"{errors} error lines; report {md} and {js}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
