#!/usr/bin/env python
"""GenICam capture through Aravis from the simulated camera: frames/s and capture -> verdict latency.

Starts ``arv-fake-gv-camera-0.8 -i 127.0.0.1`` (Debian aravis-tools) — real discovery, GVCP control and GVSP
streaming over loopback — and measures, per run of ``--seconds``:

- ``capture``: the camera layer alone (``GenicamSource``, free-running at ``AcquisitionFrameRate`` =
  ``--fps``): complete frames/s delivered as RGB, per pixel format (the conversion included), incomplete ones;
- ``capture+score``: the same frames scored one at a time by the Inspector (what the station's batcher calls,
  batch 1, ONNX Runtime fp32), the source keeping only the newest frame (``drop oldest``, buffer 1):
  frames/s scored and latency from the frame's arrival on the host to its score (p50 / p99);
- ``software trigger``: one software trigger, wait for its frame, score it, next: trigger -> verdict latency;
- ``station``: the whole line station, ``winclip-edge serve --config`` with one ``genicam:`` source
  free-running from the camera (default station settings: buffer 8, drop oldest, batches up to 8), once with
  the camera at ``--fps`` (the station takes what it can, the rest is dropped) and once at ``--station-fps``
  (a rate it keeps up with): decisions/s written to results.jsonl and capture -> verdict latency (the rows'
  ``latency_ms``: from the frame's arrival on the host to its row), after the first decision (engine warm).

Without ``--bundle`` the tiny random-weight model of the tests (``tiny240``: 240 px, 15x15 tokens) is exported
into a temporary folder first (needs the export stage: torch + open_clip). Run from the repository root::

    python benchmarks/genicam.py [--bundle DIR --product P] [--seconds 5] [--size 640x480] [--fps 200]
                                 [--station-fps 10] [--station-seconds 20]
    # -> benchmarks/results/genicam_<model>_<stamp>.md + .json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from winclip_edge import Inspector  # noqa: E402
from winclip_edge.bundle import Bundle  # noqa: E402
from winclip_edge.line.genicam import GenicamOptions, GenicamSource, list_cameras  # noqa: E402
from winclip_edge.performance.bench import machine_info, markdown_table, software_versions, write_report  # noqa: E402

PACKAGES = ("onnxruntime", "numpy", "opencv-python-headless", "opencv-python", "PyGObject")
FAKE = "arv-fake-gv-camera-0.8"


def aravis_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libaravis-0.8-0"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def tiny_bundle(folder: Path) -> tuple[str, str]:
    """The tests' tiny240 model exported into ``folder`` (random weights, product 'widget')."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_CONFIGS  # the one definition of the tiny models

    from winclip_edge.export.onnx_export import ExportOptions, export_bundle

    config = folder / "tiny240.json"
    config.write_text(json.dumps(TINY_CONFIGS["tiny240"]))
    out = folder / "tiny240"
    export_bundle(out, ExportOptions(model=str(config), pretrained="none", products=("widget",)), show_progress=False)
    return str(out), "widget"


def start_fake(serial: str) -> subprocess.Popen:
    if shutil.which(FAKE) is None:
        raise SystemExit(f"{FAKE} not found: apt-get install aravis-tools")
    _take_turn()
    others = [c.line() for c in list_cameras() if c.address == "127.0.0.1"]
    if others:
        raise SystemExit(f"a camera already answers on 127.0.0.1 ({others[0]}): stop it first")
    process = subprocess.Popen([FAKE, "-i", "127.0.0.1", "-s", serial], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not any(c.serial == serial for c in list_cameras()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{FAKE} did not come up")
    return process


_TURN: list = []


def _take_turn() -> None:
    """Wait for the lock tests/test_genicam.py takes: one fake camera on 127.0.0.1 at a time on this machine."""
    import fcntl

    handle = open(Path(tempfile.gettempdir()) / "winclip-edge-fake-gv-camera.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)  # held until the process ends
    _TURN.append(handle)


def percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return round(float(np.percentile(values, 50)), 1), round(float(np.percentile(values, 99)), 1)


def run_capture(serial: str, features: dict, seconds: float) -> dict:
    source = GenicamSource(serial, "bench", GenicamOptions(features=features, buffer=4))
    source.start()
    try:
        if not source.connected.wait(20):
            raise SystemExit("the fake camera did not start acquiring")
        got, t0 = 0, time.monotonic()
        start_emitted, start_incomplete = source.emitted, source.incomplete
        while time.monotonic() - t0 < seconds:
            if source.buffer.get() is not None:
                got += 1
        elapsed = time.monotonic() - t0
        return {"frames": source.emitted - start_emitted, "fps": round((source.emitted - start_emitted) / elapsed, 1),
                "incomplete": source.incomplete - start_incomplete, "dropped": source.buffer.dropped}
    finally:
        source.stop()
        source.join(10)


def run_scored(serial: str, features: dict, seconds: float, inspector: Inspector) -> dict:
    source = GenicamSource(serial, "bench", GenicamOptions(features=features, buffer=1))
    source.start()
    try:
        if not source.connected.wait(20):
            raise SystemExit("the fake camera did not start acquiring")
        inspector.inspect([source.buffer.get().image], batch_size=1)  # warm-up
        latencies, t0 = [], time.monotonic()
        while time.monotonic() - t0 < seconds:
            frame = source.buffer.get()
            result = inspector.inspect([frame.image], batch_size=1)[0]
            assert result.error is None, result.error
            latencies.append((time.monotonic() - frame.captured_mono) * 1e3)
        elapsed = time.monotonic() - t0
        p50, p99 = percentiles(latencies)
        return {"frames": len(latencies), "fps": round(len(latencies) / elapsed, 2), "p50_ms": p50, "p99_ms": p99,
                "camera_frames": source.captured, "dropped": source.buffer.dropped}
    finally:
        source.stop()
        source.join(10)


def run_triggered(serial: str, features: dict, seconds: float, inspector: Inspector) -> dict:
    options = GenicamOptions(features={**features, "TriggerMode": "On", "TriggerSource": "Software"},
                             buffer=4)
    source = GenicamSource(serial, "bench", options)
    source.start()
    try:
        if not source.connected.wait(20):
            raise SystemExit("the fake camera did not start acquiring")
        latencies, to_frame, t0 = [], [], time.monotonic()
        while time.monotonic() - t0 < seconds:
            sent = time.monotonic()
            source.trigger(f"part-{len(latencies)}")
            frame = source.buffer.get()
            to_frame.append((frame.captured_mono - sent) * 1e3)
            inspector.inspect([frame.image], batch_size=1)
            latencies.append((time.monotonic() - sent) * 1e3)
        p50, p99 = percentiles(latencies)
        f50, f99 = percentiles(to_frame)
        return {"frames": len(latencies), "fps": round(len(latencies) / (time.monotonic() - t0), 2),
                "p50_ms": p50, "p99_ms": p99, "trigger_to_frame_p50_ms": f50, "trigger_to_frame_p99_ms": f99}
    finally:
        source.stop()
        source.join(10)


def run_station(serial: str, features: dict, seconds: float, bundle: str, product: str, folder: Path) -> dict:
    """``winclip-edge serve --config`` with one genicam: source; decisions/s and latency over ``seconds``."""
    folder.mkdir(parents=True)
    table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in features.items())
    (folder / "station.toml").write_text(
        f'station = "bench"\nbundle = "{bundle}"\nproducts = ["{product}"]\n\n[outputs]\nout = "out"\n'
        f'save = "none"\nstatus_every = 0\n\n[[sources]]\nname = "cam"\nspec = "genicam:{serial}"\n\n'
        f"[sources.features]\n{table}")
    results = folder / "out" / "results.jsonl"

    def decided() -> list[dict]:
        return [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(folder / "serve.log", "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "winclip_edge.cli", "serve", "--config", "station.toml"],
                                 cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not decided():
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve made no decision:\n{(folder / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.1)
        first, t0 = len(decided()), time.monotonic()
        time.sleep(seconds)
        rows, elapsed = decided(), time.monotonic() - t0
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    measured = rows[first:]
    stopped = re.search(r"stopped: captured (\d+), .*dropped (\d+), incomplete (\d+), reconnects (\d+)",
                        (folder / "serve.log").read_text())
    p50, p99 = percentiles([r["latency_ms"] for r in measured])
    return {"frames": len(measured), "fps": round(len(measured) / elapsed, 2), "p50_ms": p50, "p99_ms": p99,
            "errors": sum(r["error"] is not None for r in measured),
            "captured": int(stopped.group(1)) if stopped else None, "dropped": int(stopped.group(2)) if stopped else None,
            "incomplete": int(stopped.group(3)) if stopped else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="bundle folder (default: the tests' tiny model, exported now)")
    ap.add_argument("--product", help="product (default: the bundle's first)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each run (default 5)")
    ap.add_argument("--size", default="640x480", help="camera Width x Height (default 640x480)")
    ap.add_argument("--fps", type=float, default=200.0, help="the camera's AcquisitionFrameRate (default 200)")
    ap.add_argument("--formats", default="Mono8,BayerRG8,RGB8", help="pixel formats of the capture runs")
    ap.add_argument("--station-fps", type=float, default=10.0,
                    help="the camera's rate for the paced station run (default 10; the other runs at --fps)")
    ap.add_argument("--station-seconds", type=float, default=20.0, help="length of each station run (default 20)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    stamp = _dt.datetime.now(_dt.timezone.utc)
    serial = f"BENCH{stamp.strftime('%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="genicam-bench-") as tmp:
        bundle, product = (args.bundle, args.product) if args.bundle else tiny_bundle(Path(tmp))
        model = Bundle(bundle).manifest.model
        inspector = Inspector(bundle, product or Bundle(bundle).products()[0])
        report: dict = {"command": shlex.join(["python", *sys.argv]), "date": stamp.isoformat(timespec="seconds"),
                        "model": model, "machine_before": machine_info(),
                        "versions": {**software_versions(PACKAGES), "libaravis-0.8-0": aravis_version()}}
        fake = start_fake(serial)
        rows = []
        try:
            base = {"Width": width, "Height": height, "AcquisitionFrameRate": args.fps}
            for fmt in args.formats.split(","):
                r = run_capture(serial, {**base, "PixelFormat": fmt}, args.seconds)
                rows.append({"run": "capture", "pixel_format": fmt, **r})
            fmt = args.formats.split(",")[0]
            rows.append({"run": "capture+score", "pixel_format": fmt,
                         **run_scored(serial, {**base, "PixelFormat": fmt}, args.seconds, inspector)})
            rows.append({"run": "software trigger", "pixel_format": fmt,
                         **run_triggered(serial, {**base, "PixelFormat": fmt}, args.seconds, inspector)})
            inspector.close()  # the station loads its own engine: one at a time on the CPU
            for rate in (args.fps, args.station_fps):
                features = {**base, "PixelFormat": fmt, "AcquisitionFrameRate": rate}
                rows.append({"run": f"station (serve), camera at {rate:g} fps", "pixel_format": fmt,
                             **run_station(serial, features, args.station_seconds, bundle,
                                           product or Bundle(bundle).products()[0], Path(tmp) / f"station-{rate:g}")})
        finally:
            fake.terminate()
            fake.wait(10)
            inspector.close()  # closing twice is harmless
    report["rows"] = rows
    report["machine_after"] = {"load_average": machine_info()["load_average"]}
    m = report["machine_before"]
    table = markdown_table(
        ["run", "pixel format", "frames", "frames/s", "latency p50 ms", "latency p99 ms", "incomplete", "notes"],
        [[r["run"], r["pixel_format"], r["frames"], r["fps"], r.get("p50_ms", "-"), r.get("p99_ms", "-"),
          r.get("incomplete", "-"),
          (f"trigger -> frame p50 {r['trigger_to_frame_p50_ms']} ms, p99 {r['trigger_to_frame_p99_ms']} ms"
           if "trigger_to_frame_p50_ms" in r else
           f"{r['captured']} camera frames, {r['dropped']} dropped, {r['errors']} errors (whole run)"
           if "captured" in r else
           f"{r['camera_frames']} camera frames, {r['dropped']} dropped (buffer 1: newest kept)"
           if "camera_frames" in r else f"{r['dropped']} dropped")] for r in rows])
    md = [f"# GenICam capture from the simulated camera — {model}", "",
          f"- date: {report['date']}; command: `{report['command']}`",
          f"- machine: {m['cpu']}, {m['cores']} logical cores, {m['ram_gib']} GiB, GPUs: {m['gpus'] or 'none'}; "
          f"load average before {m['load_average']}, after {report['machine_after']['load_average']} "
          "(a shared machine: other jobs ran beside it; the fake camera's process shares the same cores)",
          f"- versions: {report['versions']}",
          f"- camera: `{FAKE} -i 127.0.0.1` (GigE Vision over loopback, packet socket on), {width}x{height}, "
          f"AcquisitionFrameRate {args.fps}; {args.seconds} s per run; engine: ONNX Runtime fp32 CPU, batch 1",
          "- latency: capture+score from the frame's arrival on the host (Aravis's system timestamp) to its score; "
          "software trigger from the trigger command to the score; station from the frame's arrival to its row "
          f"(`latency_ms`), {args.station_seconds} s per station run after its first decision, default station "
          "settings (buffer 8, drop oldest, max batch 8)", "",
          table]
    path, _ = write_report(args.out, f"genicam_{model}_{stamp.strftime('%Y%m%dT%H%M%S')}", report, "\n".join(md))
    print("\n".join(md))
    print(f"-> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
