#!/usr/bin/env python
"""Verdict -> live through the HTTP face: how long an operator's correction takes to serve, and what drift watching
costs per decision and per verdict.

A station (`winclip-edge serve --http`, a subprocess started as users start it) serves a product registered on
``--references`` goods and calibrated leave-one-out. Each round, a new part the memory does not know (a textured
part with a bright patch: flagged, a false alarm to teach) is posted to ``/v1/inspect``; an operator's good verdict
goes to ``POST /v1/results/{id}/verdict`` (committed to SQLite with the exact pixels), ``POST
/v1/products/{p}/teach`` makes a new version on the station's engine and switches the station to it (teach +
catalog reload + batcher swap), and the round ends when the next ``/v1/inspect`` of the same part answers, decided
by the new version. Reported per round (HTTP round trips, ms): verdict, teach, first inspection; the total is
verdict -> live. A part that is not flagged cannot be taught (the store keeps the lossless pixels of flagged results
only): that round is counted as skipped. Then the cost of drift watching: one DriftTracker update and one
DriftWatch call (the station's per-decision and per-verdict path) for several window sizes.

The tiny random-weight model is exported when neither ``--bundle`` nor ``--model`` is given; ``--model NAME``
exports that open_clip model with random weights (``--pretrained none``; timings do not depend on the weights);
``--bundle DIR --product P`` measures a bundle (on a copy: it is not changed). Exports run in a subprocess (torch
stays out of the measuring process). Run from the repository root::

    python benchmarks/teach.py [--rounds 5] [--references 8] [--model ViT-B-16-plus-240 | --bundle B --product P]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from winclip_edge.performance.bench import machine_info, markdown_table, software_versions, write_report  # noqa: E402

TINY_CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16,
                                               "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
READY_TIMEOUT_S = 900


def part(seed: int, size: tuple[int, int], patch: bool = False) -> np.ndarray:
    """A synthetic part: smooth random texture (the same statistics for every seed), RGB uint8; ``patch``: with a
    structured square in the middle, its stripes drawn per seed (one the memory has never seen: flagged)."""
    import cv2

    rng = np.random.default_rng(seed)
    base = rng.normal(128, 40, (size[0] // 8, size[1] // 8, 3)).clip(0, 255).astype(np.uint8)
    image = cv2.resize(base, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    image = cv2.add(image, rng.integers(0, 12, image.shape, dtype=np.uint8))
    if patch:
        h, w = size[0] // 4, size[1] // 4
        t, l = size[0] * 3 // 8, size[1] * 3 // 8
        yy, xx = np.mgrid[0:h, 0:w]
        a, b, c, d = rng.integers(5, 120, 4)
        image[t:t + h, l:l + w] = np.stack([(yy * a + xx * b) % 256, (xx * c) % 256, (yy * d) % 256], -1)
    return image


def png(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def export(work: Path, model: str | None) -> tuple[Path, str]:
    if model is None:
        config = work / "tiny240.json"
        config.write_text(json.dumps(TINY_CONFIG))
        model = str(config)
    bundle = work / "bundle"
    run = subprocess.run([sys.executable, "-m", "winclip_edge.cli", "export", "--model", model, "--pretrained",
                          "none", "--products", "widget", "--out", str(bundle), "--quiet"], capture_output=True,
                         text=True)
    if run.returncode != 0:
        raise SystemExit(f"export failed:\n{run.stderr}")
    return bundle, "widget"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_station(bundle: Path, product: str, out: Path) -> tuple[subprocess.Popen, str, str]:
    import httpx

    port = free_port()
    log = out.with_suffix(".log")
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("WINCLIP_TOKEN", "WINCLIP_TOKENS")}
    proc = subprocess.Popen([sys.executable, "-m", "winclip_edge.cli", "serve", "--http", f"127.0.0.1:{port}",
                             "--bundle", str(bundle), "--product", product, "--out", str(out), "--max-batch", "1",
                             "--status-every", "0"], stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            ready = httpx.get(url + "/readyz", timeout=5)
            if ready.status_code == 200:
                return proc, url, f"{ready.json()['engine']} ({ready.json()['device']})"
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"serve not ready in {READY_TIMEOUT_S} s")
        time.sleep(0.2)


def http_rounds(url: str, product: str, rounds: int, size: tuple[int, int], max_tries: int) -> tuple[list, int]:
    import httpx

    client = httpx.Client(base_url=url, timeout=900)

    def inspect(data: bytes, name: str) -> tuple[dict, float]:
        t0 = time.perf_counter()
        r = client.post("/v1/inspect", params={"product": product}, files={"image": (name, data)})
        if r.status_code != 200:
            raise SystemExit(f"inspect: {r.status_code} {r.text}")
        return r.json(), (time.perf_counter() - t0) * 1e3

    inspect(png(part(999, size)), "warm.png")  # the first request of a fresh process
    done, skipped, seed = [], 0, 1000
    while len(done) < rounds and seed < 1000 + max_tries:
        data = png(part(seed, size, patch=True))
        seed += 1
        before, inspect_ms = inspect(data, f"part{seed}.png")
        if not before["anomalous"]:
            skipped += 1  # passed: nothing to teach (only flagged results keep their lossless pixels)
            continue
        t0 = time.perf_counter()
        r = client.post(f"/v1/results/{before['id']}/verdict", json={"verdict": "good", "note": "bench"})
        t1 = time.perf_counter()
        if r.status_code != 200 or not r.json()["teachable"]:
            raise SystemExit(f"verdict: {r.status_code} {r.text}")
        r = client.post(f"/v1/products/{product}/teach", json={"note": "bench"})
        t2 = time.perf_counter()
        if r.status_code != 200:
            raise SystemExit(f"teach: {r.status_code} {r.text}")
        taught = r.json()
        after, after_ms = inspect(data, f"part{seed}.png")
        if after["version"] != taught["version"]:
            raise SystemExit(f"the inspection after teach was decided by version {after['version']}, "
                             f"not {taught['version']}")
        done.append({"round": len(done) + 1, "version": taught["version"], "references": taught["references"],
                     "score_before": before["score"], "score_after": after["score"],
                     "flagged_after": bool(after["anomalous"]), "inspect_before_ms": inspect_ms,
                     "verdict_ms": (t1 - t0) * 1e3, "teach_ms": (t2 - t1) * 1e3, "inspect_ms": after_ms,
                     "total_ms": (t1 - t0) * 1e3 + (t2 - t1) * 1e3 + after_ms})
    client.close()
    return done, skipped


def drift_cost(windows: list[int], calls: int = 5000) -> list[dict]:
    """Per observation: DriftTracker.add_score / add_verdict, and DriftWatch.observe / verdict (the station's path:
    its lock, the served version's check, the tracker)."""
    from winclip_edge.drift import DriftTracker
    from winclip_edge.line.drift_watch import DriftWatch
    from winclip_edge.products import Threshold

    import logging

    logging.getLogger("winclip_edge.line").setLevel(logging.ERROR)  # the alerts the random scores raise
    rng = np.random.default_rng(0)
    calibration = rng.normal(0.4, 0.02, 50)
    rows = []
    for window in windows:
        tracker = DriftTracker(calibration, threshold=0.46, window=window)
        inspector = SimpleNamespace(version=1, threshold=Threshold(0.46, 0.0, 0.0, 50, "few-shot", "", {},
                                                                    scores=list(calibration)))
        watch = DriftWatch(SimpleNamespace(products=["p"], get=lambda p: inspector), window=window)
        scores = rng.normal(0.41, 0.02, calls)
        for s in scores[:window]:  # a full window first
            tracker.add_score(s)
            tracker.add_verdict("good", bool(s > 0.46))
            watch.observe({"product": "p", "version": 1, "score": float(s), "error": None})
            watch.verdict("p", 1, "good", bool(s > 0.46))
        rowed = [{"product": "p", "version": 1, "score": float(s), "error": None} for s in scores]
        t0 = time.perf_counter()
        for s in scores:
            tracker.add_score(s)
        t1 = time.perf_counter()
        for s in scores:
            tracker.add_verdict("good", bool(s > 0.46))
        t2 = time.perf_counter()
        for row in rowed:
            watch.observe(row)
        t3 = time.perf_counter()
        for s in scores:
            watch.verdict("p", 1, "good", bool(s > 0.46))
        t4 = time.perf_counter()
        rows.append({"window": window, "calibration_scores": len(calibration), "score_us": (t1 - t0) / calls * 1e6,
                     "verdict_us": (t2 - t1) / calls * 1e6, "watch_score_us": (t3 - t2) / calls * 1e6,
                     "watch_verdict_us": (t4 - t3) / calls * 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="a bundle to measure (copied; default: the tiny model)")
    parser.add_argument("--product", default=None, help="its product (with --bundle)")
    parser.add_argument("--model", default=None, help="export this open_clip model with random weights and measure it")
    parser.add_argument("--rounds", type=int, default=5, help="teach rounds (default 5)")
    parser.add_argument("--references", type=int, default=8, help="references registered first (default 8)")
    parser.add_argument("--size", type=int, default=480, help="part images are SIZE x SIZE pixels (default 480)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder of the tables")
    args = parser.parse_args()
    command = shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv])

    from winclip_edge import Inspector
    from winclip_edge.bundle import Bundle
    from winclip_edge.calibration import calibrate
    from winclip_edge.products import save_threshold
    from winclip_edge.registration import register
    from winclip_edge.scoring import ScoringOptions

    load_before = machine_info()["load_average"]
    with tempfile.TemporaryDirectory(prefix="winclip-teach-bench-") as tmp:
        work = Path(tmp)
        if args.bundle is None:
            t0 = time.perf_counter()
            bundle, product = export(work, args.model)
            export_s = time.perf_counter() - t0
        else:
            if not args.product:
                raise SystemExit("--bundle needs --product")
            bundle, product, export_s = work / "bundle", args.product, None
            shutil.copytree(args.bundle, bundle, ignore=shutil.ignore_patterns("engines", "variants", "tuning"))
        size = (args.size, args.size)
        refs = [part(s, size) for s in range(args.references)]
        register(Inspector(bundle, product, options=ScoringOptions(use_memory=False), with_threshold=False), refs)
        threshold, _ = calibrate(Inspector(bundle, product, with_threshold=False))
        save_threshold(Bundle(bundle), product, threshold)
        model = Bundle(bundle).manifest.model
        proc, url, engine = start_station(bundle, product, work / "station")
        try:
            rounds, skipped = http_rounds(url, product, args.rounds, size, max_tries=25 * args.rounds)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    if not rounds:
        raise SystemExit(f"no part was flagged in {skipped} tries: nothing could be taught")
    drift = drift_cost([50, 200, 1000])
    machine = machine_info()
    machine["load_average_before"] = load_before
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    keys = ("verdict_ms", "teach_ms", "inspect_ms", "total_ms")
    med = {k: statistics.median(r[k] for r in rounds) for k in keys}
    report = {"command": command, "date": stamp, "machine": machine, "versions": software_versions(), "model": model,
              "engine": engine, "export_s": export_s, "image_size": list(size), "references_first": args.references,
              "rounds": rounds, "skipped": skipped, "median": med, "drift": drift, "through": "http"}
    stage_rows = [[r["round"], r["version"], r["references"], f"{r['score_before']:.4f} -> {r['score_after']:.4f}",
                   f"yes -> {'yes' if r['flagged_after'] else 'no'}", f"{r['verdict_ms']:.1f}", f"{r['teach_ms']:.0f}",
                   f"{r['inspect_ms']:.0f}", f"{r['total_ms']:.0f}"] for r in rounds]
    stage_rows.append(["median", "", "", "", "", f"{med['verdict_ms']:.1f}",
                       *(f"{med[k]:.0f}" for k in ("teach_ms", "inspect_ms", "total_ms"))])
    md = "\n\n".join([
        f"# Verdict -> live through the HTTP face ({model}, {engine})",
        f"Date (UTC): {stamp}. Machine: {machine['cpu']}, {machine['cores']} logical cores, {machine['ram_gib']} GiB; "
        f"load average before {load_before}, after {machine['load_average']} (shared machine: numbers are slower "
        f"under load). Command: `{command}`.",
        f"`winclip-edge serve --http` in a subprocess (max batch 1). Parts {size[0]}x{size[1]} px; the product starts "
        f"with {args.references} references (leave-one-out threshold); each round a new flagged part gets a good "
        "verdict, is taught and served. HTTP round trips in ms: verdict = `POST /v1/results/{id}/verdict` (committed "
        "to SQLite, WAL, synchronous=FULL, with the exact pixels); teach = `POST /v1/products/{p}/teach` (embed, "
        "leave-one-out calibration, version written and verified, pointer moved, catalog reload, batcher swap, on "
        "the station's engine); inspect = the first `POST /v1/inspect` of the part, decided by the new version."
        + (f" Parts not flagged (nothing to teach): {skipped}." if skipped else ""),
        markdown_table(["round", "version", "references", "score before -> after", "flagged", "verdict", "teach",
                        "inspect", "verdict -> live"], stage_rows),
        "Drift watching per observation (50 calibration scores; the KS statistic recomputed on every score), "
        "microseconds: the tracker alone, and the station's DriftWatch (lock, served-version check, tracker):",
        markdown_table(["window", "tracker add_score", "tracker add_verdict", "watch observe (per decision)",
                        "watch verdict (per verdict)"],
                       [[d["window"], f"{d['score_us']:.1f}", f"{d['verdict_us']:.1f}", f"{d['watch_score_us']:.1f}",
                         f"{d['watch_verdict_us']:.1f}"] for d in drift]),
    ])
    slug = model.replace("/", "_")
    paths = write_report(args.out, f"teach_http_{slug}_{stamp}", report, md)
    print(md)
    print(f"\nwritten: {paths[0]}, {paths[1]}")


if __name__ == "__main__":
    main()
