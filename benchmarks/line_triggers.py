#!/usr/bin/env python
"""Triggered parts on the line station: trigger -> verdict latency and deadline misses at a few trigger rates, and
what the station costs against the engine alone.

For each ``--bundle`` (on the engine ``--backend auto`` picks: the ``winclip-edge engine tune`` winner when the bundle has a
tune record for this machine), in one process and one run:

1. **engine alone**: images/s of ``bench_batch`` -- the function ``winclip-edge bench`` times with -- at ``--batch``
   over the same in-memory frames the station gets (its loop: decode, engine, scoring, map + overlay, one after the
   other), measured again after every station run: on a shared machine the load moves, so each station run is
   compared with the mean of the bench just before and just after it;
2. **station, free-running**: a camera that always has the next frame (an in-process Source, the frames above)
   into the station (``save none``): frames/s = frames / (last decision - first capture);
3. **station, triggered, as fast as it takes parts**: software-triggered cameras (the station fires the camera per
   part, as with a GenICam camera) with one and with two views per part; images/s = parts x views / elapsed;

and, for each station run, how busy its engine worker was: the time in ``Inspector.inspect_decoded`` (engine,
scoring, maps: the work bench times too) over the elapsed time. The idle rest is what the station costs the
engine -- a measure the machine's other load moves far less than images/s;
4. **trigger -> verdict** at each of ``--rates`` triggers/s (one view, ``--triggers`` parts per rate, deadline
   ``--deadline-ms``): p50 / p99 of (decided_at - triggered_at) of each part's result row (live or late), and
   the deadline misses (fail-safe rows).

The station figures come from the rows' own timestamps (results.jsonl). Run from the repository root::

    python benchmarks/line_triggers.py --bundle models/b16p --product textile --deadline-ms 3000
    python benchmarks/line_triggers.py --tiny --deadline-ms 250 --batch 1   # exports the tests' tiny model first

-> benchmarks/results/line_triggers_<model>_<stamp>.md (+ .json)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from winclip_edge.bundle import Bundle  # noqa: E402
from winclip_edge.catalog import Catalog  # noqa: E402
from winclip_edge.engines import EngineConfig  # noqa: E402
from winclip_edge.batcher import Batcher  # noqa: E402
from winclip_edge.control import Trigger  # noqa: E402
from winclip_edge.line.frames import Frame, FrameBuffer  # noqa: E402
from winclip_edge.line.parts import PartsConfig  # noqa: E402
from winclip_edge.line.station import Station, StationConfig, results_files  # noqa: E402
from winclip_edge.performance.bench import (bench_batch, machine_info, markdown_table, software_versions,  # noqa: E402
                                            write_report)

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
FRAME_SIZE = (480, 640)


@dataclass
class PartFrame(Frame):
    part_id: str | None = None


class BenchCamera:
    """An in-process camera (the station's Source protocol): ``free`` frames as fast as the station takes them, or,
    in software-trigger mode, one frame per ``trigger(part_id)`` at once (what a triggered GenICam camera does)."""

    kind = "camera"

    def __init__(self, name: str, frames: list[np.ndarray], free: int = 0):
        self.name, self.frames, self.free = name, frames, free
        self.trigger_mode = "software" if free == 0 else "off"
        self.buffer = FrameBuffer(4 if free else 64, drop_oldest=False)
        self.emitted = self.reconnects = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def check(self) -> None:
        pass

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _frame(self, part_id: str | None = None) -> PartFrame:
        with self._lock:
            index = self.emitted
            self.emitted += 1
        return PartFrame(self.name, index, time.time(), time.monotonic(), image=self.frames[index % len(self.frames)],
                         part_id=part_id)

    def _run(self) -> None:
        if self.free:
            for _ in range(self.free):
                if self._stop.is_set() or not self.buffer.put(self._frame()):
                    break
            self.buffer.close()
            return
        self._stop.wait()
        self.buffer.close()

    def trigger(self, part_id: str) -> None:
        self.buffer.put(self._frame(part_id))


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for path in results_files(out) for line in path.read_text().splitlines() if line.strip()]


def epoch(iso: str) -> float:
    return _dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Busy:
    """Time spent in an Inspector's ``inspect_decoded`` (the batcher's worker: engine, scoring, maps)."""

    def __init__(self, inspector):
        self.total, self._inner = 0.0, inspector.inspect_decoded
        inspector.inspect_decoded = self._timed

    def _timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - t0


def run_station(catalog: Catalog, product: str, out: Path, sources: list, batch: int, parts: PartsConfig,
                drive=None) -> tuple[Station, list[dict]]:
    batcher = Batcher(catalog.get(product), max_batch=batch, max_wait_ms=10.0, queue_size=max(2 * batch, 4))
    station = Station(StationConfig(station="bench", save="none", status_every_s=0, keep_running=drive is not None,
                                    parts=parts), out, batcher, sources)
    stop = threading.Event()
    runner = threading.Thread(target=station.run, args=(stop,))
    runner.start()
    try:
        if drive is not None:
            drive(station)
    finally:
        if drive is not None:
            stop.set()
        runner.join()
        batcher.close()
    return station, rows_of(out)


def free_running(catalog, product, frames, batch, n, tmp) -> dict:
    camera = BenchCamera("cam", frames, free=n)
    _, rows = run_station(catalog, product, tmp / "free", [camera], batch, PartsConfig())
    captured = [epoch(r["captured_at"]) for r in rows]
    decided = [epoch(r["decided_at"]) for r in rows]
    assert len(rows) == n and not any(r["error"] for r in rows), rows[:2]
    return {"frames": n, "elapsed_s": max(decided) - min(captured), "images_per_s": n / (max(decided) - min(captured))}


def triggered(catalog, product, frames, batch, parts, views, tmp, rate=None, deadline_ms=None) -> dict:
    """``parts`` parts at ``rate`` triggers/s (None: as fast as the station takes them, at most 4 batches in flight)."""
    cameras = [BenchCamera(f"view{v}", frames) for v in range(views)]
    config = PartsConfig(deadline_ms=deadline_ms, continuous=False, max_pending=10 * parts)
    started: list[float] = []

    def drive(station: Station) -> None:
        started.append(time.time())
        for i in range(parts):
            if rate is not None:
                wait = started[0] + i / rate - time.time()
                if wait > 0:
                    time.sleep(wait)
            else:
                while station.tracker.in_flight() >= 4 * batch:
                    time.sleep(0.005)
            station.trigger(Trigger(part_id=str(i), source="bench"))
        while station.tracker.open_parts():
            time.sleep(0.01)
        time.sleep(0.5)  # a frame named for a part closed meanwhile: its late row

    tag = f"t{views}-{rate}"
    _, rows = run_station(catalog, product, tmp / tag, cameras, batch, config, drive)
    results = {}
    for r in rows:  # each part's result: its live verdict, or the late result after its fail-safe
        if r["decision"] != "timeout":
            results[r["part_id"]] = r
    misses = sum(r["decision"] == "timeout" for r in rows)
    lost = parts - len(results)  # parts with a fail-safe but no result row at all (their view never came)
    latency = np.array([(epoch(r["decided_at"]) - epoch(r["triggered_at"])) * 1e3 for r in results.values()])
    elapsed = max(epoch(r["decided_at"]) for r in rows) - started[0]
    return {"parts": parts, "views": views, "rate": rate, "misses": misses, "lost": lost,
            "p50_ms": float(np.percentile(latency, 50)), "p99_ms": float(np.percentile(latency, 99)),
            "elapsed_s": elapsed, "images_per_s": parts * views / elapsed}


def tiny_bundle(folder: Path) -> Path:
    from winclip_edge.export.onnx_export import ExportOptions, export_bundle

    config = folder / "tiny240.json"
    config.write_text(json.dumps(TINY))
    out = folder / "tiny240"
    export_bundle(out, ExportOptions(model=str(config), pretrained="none", products=("widget",)), show_progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="bundle folder (e.g. a ViT-B-16-plus-240 export)")
    ap.add_argument("--product", default=None, help="default: the bundle's first")
    ap.add_argument("--tiny", action="store_true", help="export the tests' tiny random model and use it")
    ap.add_argument("--batch", type=int, default=1, help="--max-batch of the station and bench's batch (default 1)")
    ap.add_argument("--rates", default="1,2,5", help="trigger rates, triggers/s (default 1,2,5)")
    ap.add_argument("--triggers", type=int, default=10, help="parts per rate (default 10)")
    ap.add_argument("--frames", type=int, default=16, help="free-running frames (default 16)")
    ap.add_argument("--deadline-ms", type=float, required=True)
    ap.add_argument("--iters", type=int, default=4, help="bench iterations (default 4)")
    ap.add_argument("--tune", action="store_true", help="run `winclip-edge engine tune` on the bundle first (the tiny one: "
                                                        "its own record)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    stamp = _dt.datetime.now(_dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="line-triggers-") as tmp_name:
        tmp = Path(tmp_name)
        bundle_path = tiny_bundle(tmp) if args.tiny else Path(args.bundle)
        if args.tune:
            subprocess.run([sys.executable, "-m", "winclip_edge.cli", "engine", "tune", "--bundle", str(bundle_path),
                            "--sequential", "--fidelity-images", "2"], check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        bundle = Bundle(bundle_path)
        product = args.product or bundle.products()[0]
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (*FRAME_SIZE, 3), dtype=np.uint8) for _ in range(8)]
        report: dict = {"command": shlex.join(["python", *sys.argv]), "date": stamp.isoformat(timespec="seconds"),
                        "model": bundle.manifest.model, "machine_before": machine_info(),
                        "versions": software_versions(), "frame_size": list(FRAME_SIZE), "batch": args.batch,
                        "deadline_ms": args.deadline_ms}
        catalog = Catalog(bundle, [product], engine=EngineConfig())  # backend auto: the tune winner, if any
        report["engine"] = catalog.selection.reason
        report["engine_name"] = f"{catalog.engine.name} {catalog.selection.config.precision} ({catalog.engine.device})"
        print(f"[line_triggers] {report['engine_name']}: {catalog.selection.reason}", file=sys.stderr)
        catalog.warm_up(args.batch)
        inspector = catalog.get(product)

        def bench() -> dict:
            measured = bench_batch(inspector, frames, args.batch, 1, args.iters)
            print(f"[line_triggers] bench: {measured['images_per_s']:.3f} images/s", file=sys.stderr)
            return measured

        benches = [bench()]
        busy = Busy(inspector)  # after bench: bench calls the engine itself, not inspect_decoded

        def measured(run) -> dict:
            busy.total = 0.0
            result = run()
            result["busy"] = busy.total / result["elapsed_s"]
            benches.append(bench())
            result["bench_images_per_s"] = (benches[-2]["images_per_s"] + benches[-1]["images_per_s"]) / 2
            print(f"[line_triggers] {result}", file=sys.stderr)
            return result

        free = measured(lambda: free_running(catalog, product, frames, args.batch, args.frames, tmp))
        fast = [measured(lambda v=views: triggered(catalog, product, frames, args.batch, args.triggers, v, tmp))
                for views in (1, 2)]
        rates = [triggered(catalog, product, frames, args.batch, args.triggers, 1, tmp, rate=float(r),
                           deadline_ms=args.deadline_ms) for r in args.rates.split(",")]
        print(f"[line_triggers] rates: {rates}", file=sys.stderr)
        catalog.close()
    report.update(benches=benches, free_running=free, triggered=fast, rates=rates,
                  machine_after={"load_average": machine_info()["load_average"]})
    m = report["machine_before"]

    def row(name: str, r: dict) -> list:
        return [name, f"{r['images_per_s']:.3f}", f"{r['bench_images_per_s']:.3f}",
                f"{(1 - r['images_per_s'] / r['bench_images_per_s']) * 100:+.1f} %", f"{r['busy'] * 100:.1f} %",
                f"{(1 - r['busy']) * 100:.1f} %"]

    throughput = [row(f"free-running ({free['frames']} frames)", free)]
    throughput += [row(f"triggered parts as fast as taken, {t['views']} view{'s' if t['views'] > 1 else ''} "
                       f"({t['parts']} parts)", t) for t in fast]
    benched = ", ".join(f"{b['images_per_s']:.3f}" for b in benches)
    latency = [[f"{r['rate']:g}", r["parts"], f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", r["misses"], r["lost"]]
               for r in rates]
    md = [f"# Triggered parts on the line station — {report['model']}", "",
          f"- date: {report['date']}; command: `{report['command']}`",
          f"- machine: {m['cpu']}, {m['cores']} logical cores, {m['ram_gib']} GiB, GPUs: {m['gpus'] or 'none'}; load "
          f"average before {m['load_average']}, after {report['machine_after']['load_average']} (a shared machine)",
          f"- engine: {report['engine_name']} — {report['engine']}",
          f"- frames: {FRAME_SIZE[1]}x{FRAME_SIZE[0]} px, random; batch {args.batch}; `save none`",
          "", "## Throughput: what the station costs", "",
          f"bench (`bench_batch`, as `winclip-edge bench`), before, between and after the station runs: {benched} "
          "images/s.", "",
          markdown_table(["station run", "images/s", "bench around it, images/s", "vs bench", "engine worker busy",
                          "station cost (worker idle)"], throughput),
          "", f"## Trigger -> verdict (one view, deadline {args.deadline_ms:g} ms)", "",
          markdown_table(["triggers/s", "parts", "p50 ms", "p99 ms", "deadline misses (fail-safe rows)",
                          "parts without a result"], latency),
          "", "Latency: `decided_at - triggered_at` of each part's result row (live, or late after its fail-safe). "
          "vs bench = 1 - the run's images/s / the mean of the bench just before and just after it (negative: faster "
          "than bench's loop, which runs its stages one after the other and draws an overlay per image, while the "
          "station decodes in its submitter threads as the engine runs and draws none with `save none`). Engine "
          "worker busy = time in `Inspector.inspect_decoded` (engine, scoring, maps) / elapsed; its idle rest is what "
          "the station itself costs the engine (waiting for decoded frames, hand-offs, the fsync'd rows and trigger "
          "journal), the measure the machine's other load moves least."]
    path, _ = write_report(args.out, f"line_triggers_{report['model']}_{stamp.strftime('%Y%m%dT%H%M%S')}", report,
                           "\n".join(md))
    print("\n".join(md))
    print(f"-> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
