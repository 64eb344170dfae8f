#!/usr/bin/env python
"""The line station on a video: frames/s and capture-to-decision latency of ``winclip-edge serve``.

A video (MJPG .avi, written with OpenCV) of ``--frames`` textile images of the ``conformal-clip-data``
package is served by ``winclip-edge serve`` subprocesses, as a user runs it, at ``--max-batch 1`` and
``--max-batch 8``, each in two modes:

- ``throughput``: the file is read as fast as the station takes frames (``--buffer 1``, the engine queue
  one batch deep): frames/s is the station's capacity; the latency includes the wait behind the frames
  ahead (a frame is stamped when read, then waits for room in the buffer and the queue: a few engine calls);
- ``paced``: the file is replayed at 70% of that capacity (``--fps-limit``), like a camera the station keeps
  up with: the latency is capture -> decision without a backlog.

Numbers come from the rows of results.jsonl (``captured_at`` and ``latency_ms``): frames/s = frames /
(last decision - first capture). Run from the repository root (bounded: ``--frames`` per run, default 16)::

    python benchmarks/line.py --bundle /path/to/b16p --product textile   # -> benchmarks/results/line_<model>_<stamp>.md
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
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from winclip_edge.performance.bench import machine_info, markdown_table, software_versions, write_report  # noqa: E402
from winclip_edge.bundle import Bundle  # noqa: E402
from winclip_edge.evaluation.datasets import textile_root  # noqa: E402

PACKAGES = ("onnxruntime", "numpy", "opencv-python-headless", "opencv-python", "paho-mqtt", "watchdog")
PACED_FRACTION = 0.7


def write_video(path: Path, frames: int) -> tuple[int, int]:
    files = sorted((textile_root() / "nominal").glob("*"))[:frames]
    first = cv2.imread(str(files[0]))
    h, w = first.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    for f in files:
        writer.write(cv2.resize(cv2.imread(str(f)), (w, h)))
    writer.release()
    return h, w


def parse_iso(text: str) -> float:
    return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=_dt.timezone.utc).timestamp()


def serve(args: argparse.Namespace, video: Path, out: Path, max_batch: int, extra: list[str]) -> dict:
    """One ``serve`` run to the end of the video; frames/s and latency percentiles from its rows."""
    command = [sys.executable, "-m", "winclip_edge.cli", "serve", "--bundle", args.bundle, "--product", args.product,
               "--source", str(video), "--out", str(out), "--max-batch", str(max_batch), "--save", "none",
               "--status-every", "0", *extra]
    print(f"[line] {shlex.join(command[3:])}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    errors = [r["error"] for r in rows if r["error"]]
    if errors or len(rows) != args.frames:
        raise SystemExit(f"{len(rows)} rows for {args.frames} frames, errors: {errors[:3]}")
    captured = np.array([parse_iso(r["captured_at"]) for r in rows])
    latency = np.array([r["latency_ms"] for r in rows])
    decided = captured + latency / 1e3
    return {"frames": len(rows), "fps": round(len(rows) / float(decided.max() - captured.min()), 3),
            "p50_ms": round(float(np.percentile(latency, 50)), 1), "p99_ms": round(float(np.percentile(latency, 99)), 1),
            "command": shlex.join(["winclip-edge", *command[4:]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, help="bundle folder (e.g. ViT-B-16-plus-240)")
    ap.add_argument("--product", required=True)
    ap.add_argument("--frames", type=int, default=16, help="frames in the video (default 16)")
    ap.add_argument("--batches", default="1,8", help="--max-batch values (default 1,8)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    stamp = _dt.datetime.now(_dt.timezone.utc)
    model = Bundle(args.bundle).manifest.model
    report: dict = {"command": shlex.join(["python", *sys.argv]), "date": stamp.isoformat(timespec="seconds"),
                    "model": model, "machine_before": machine_info(), "versions": software_versions(PACKAGES)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="line-bench-") as tmp:
        video = Path(tmp) / "textile.avi"
        report["frame_size"] = list(write_video(video, args.frames))
        for max_batch in (int(b) for b in args.batches.split(",")):
            full = serve(args, video, Path(tmp) / f"b{max_batch}-throughput", max_batch,
                         ["--buffer", "1", "--queue-size", str(max_batch)])
            rows.append({"mode": f"throughput (--buffer 1 --queue-size {max_batch})", "max_batch": max_batch, **full})
            rate = round(full["fps"] * PACED_FRACTION, 3)
            paced = serve(args, video, Path(tmp) / f"b{max_batch}-paced", max_batch, ["--fps-limit", str(rate)])
            rows.append({"mode": f"paced (--fps-limit {rate})", "max_batch": max_batch, **paced})
    report["rows"] = rows
    report["machine_after"] = {"load_average": machine_info()["load_average"]}
    m = report["machine_before"]
    md = [f"# Line station on a video — {model}", "",
          f"- date: {report['date']}; command: `{report['command']}`",
          f"- machine: {m['cpu']}, {m['cores']} logical cores, {m['ram_gib']} GiB, GPUs: {m['gpus'] or 'none'}; "
          f"load average before {m['load_average']}, after {report['machine_after']['load_average']} "
          "(a shared machine: other jobs ran beside it)",
          f"- versions: {report['versions']}",
          f"- video: {args.frames} textile images, {report['frame_size'][1]}x{report['frame_size'][0]} px, MJPG; "
          "engine: ONNX Runtime fp32 CPU (the default); frames/s = frames / (last decision - first capture)", "",
          markdown_table(["mode", "--max-batch", "frames", "frames/s", "latency p50 ms", "latency p99 ms"],
                         [[r["mode"], r["max_batch"], r["frames"], r["fps"], r["p50_ms"], r["p99_ms"]] for r in rows]),
          "", "Each row is `winclip-edge serve --bundle B --product P --source VIDEO --out DIR --max-batch N --save none` "
          "plus the flags in its mode (the full command lines are in the .json)."]
    path, _ = write_report(args.out, f"line_{model}_{stamp.strftime('%Y%m%dT%H%M%S')}", report, "\n".join(md))
    print("\n".join(md))
    print(f"-> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
