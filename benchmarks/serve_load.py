#!/usr/bin/env python
"""Load test of the HTTP face: N concurrent loopback clients x M requests against `winclip-edge serve --http`.

Starts the station as users do (a subprocess, uvicorn inside, 127.0.0.1 on a free port), waits for /readyz,
warms it up with ``--warmup`` requests per client (other images), then every client posts its M textile images (multipart, like
`curl -F image=@a.jpg`) one after another. Reported: requests/s, p50/p99 latency seen by the clients,
errors (must be 0), the engine's average batch size over the load (from /metrics), the station's resident
memory (VmRSS) after start, after the warm-up and after the load (growth after warm-up must stay < 5%),
and, measured first in this same run, batch-1 throughput of the `infer` path (Inspector.inspect with
batch size 1, the call `winclip-edge infer --batch 1` makes) on the same images. Bounded: at most
``--clients * --requests`` requests and ``--deadline`` seconds. Run from the repository root::

    python benchmarks/serve_load.py --bundle /work/models/b16p --product textile --clients 4 --requests 4 --max-batch 4
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from winclip_edge.performance.bench import machine_info, markdown_table, software_versions, write_report  # noqa: E402
from winclip_edge.evaluation.datasets import textile_root  # noqa: E402

MAX_RSS_GROWTH = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def metric(client, name: str, labels: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def infer_batch1(bundle: str, product: str, paths: list[Path]) -> dict:
    """Throughput of the infer path at batch 1 on ``paths`` (after one warm-up image), in this process."""
    from winclip_edge import Inspector

    inspector = Inspector(bundle, product)
    try:
        inspector.inspect([str(paths[0])], batch_size=1)
        t0 = time.perf_counter()
        results = inspector.inspect([str(p) for p in paths], batch_size=1)
        seconds = time.perf_counter() - t0
    finally:
        inspector.close()
    assert all(r.error is None for r in results)
    return {"images": len(paths), "seconds": round(seconds, 3), "images_per_s": round(len(paths) / seconds, 4),
            "scores": {str(p): r.score for p, r in zip(paths, results)}}  # by path: nominal/ and local/ share names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="/work/models/b16p")
    ap.add_argument("--product", default="textile")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--warmup", type=int, default=4, help="requests per client before the measured load (memory and "
                    "engine reach their working level: ONNX Runtime's arena settles after a few batches of mixed sizes)")
    ap.add_argument("--baseline-images", type=int, default=4, help="images of the batch-1 infer measurement")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=50.0)
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole load phase")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    import httpx

    started = _dt.datetime.now(_dt.timezone.utc)
    machine = machine_info()
    n = args.clients * args.requests
    nominal = sorted((textile_root() / "nominal").glob("*.jpg"))
    local = sorted((textile_root() / "local").glob("*.jpg"))
    pool = [p for pair in zip(nominal, local) for p in pair]
    paths, warmup_paths = pool[:n], pool[n:n + args.clients * args.warmup]
    print(f"batch-1 infer on {args.baseline_images} images ...", file=sys.stderr)
    baseline = infer_batch1(args.bundle, args.product, paths[:args.baseline_images])

    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    command = [sys.executable, "-m", "winclip_edge.cli", "serve", "--http", f"127.0.0.1:{port}", "--bundle", args.bundle,
               "--product", args.product, "--out", str(work / "out"), "--max-batch", str(args.max_batch),
               "--max-wait-ms", str(args.max_wait_ms)]
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited with {proc.returncode}: {(work / 'serve.log').read_text()[-2000:]}")
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("serve was not ready within 300 s")
            time.sleep(0.5)
        rss_ready = rss_mib(proc.pid)

        latencies: list[float] = []
        errors: list[str] = []
        mismatches: list[str] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.deadline

        def run_client(mine: list[Path]) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
                for path in mine:
                    if time.monotonic() > stop_at:
                        with lock:
                            errors.append(f"{path.name}: deadline passed, not sent")
                        continue
                    t0 = time.perf_counter()
                    try:
                        r = c.post("/v1/inspect", params={"product": args.product},
                                   files={"image": (path.name, path.read_bytes(), "image/jpeg")})
                        ok = r.status_code == 200
                        detail = r.text[:200]
                    except httpx.HTTPError as err:
                        ok, detail = False, repr(err)
                    with lock:
                        if not ok:
                            errors.append(f"{path.name}: {detail}")
                            continue
                        latencies.append(time.perf_counter() - t0)
                        expected = baseline["scores"].get(str(path))
                        if expected is not None and abs(r.json()["score"] - expected) > 1e-4:
                            mismatches.append(str(path))

        def wave(groups: list[list[Path]]) -> float:
            threads = [threading.Thread(target=run_client, args=(g,)) for g in groups]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - t0

        print(f"warm-up: {args.clients} clients x {args.warmup} requests ...", file=sys.stderr)
        wave([warmup_paths[c::args.clients] for c in range(args.clients)])
        warmup_errors = len(errors)
        latencies.clear()
        rss_warm = rss_mib(proc.pid)
        labels = f'product="{args.product}"'
        batches0 = metric(client, "winclip_engine_batch_size_count", labels)
        items0 = metric(client, "winclip_engine_batch_size_sum", labels)
        print(f"load: {args.clients} clients x {args.requests} requests ...", file=sys.stderr)
        seconds = wave([paths[c::args.clients] for c in range(args.clients)])
        rss_after = rss_mib(proc.pid)
        batches = metric(client, "winclip_engine_batch_size_count", labels) - batches0
        items = metric(client, "winclip_engine_batch_size_sum", labels) - items0
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = proc.wait()
        log.close()

    lat_ms = np.array(latencies) * 1e3
    growth = (rss_after - rss_warm) / rss_warm
    ok = not errors and not mismatches and growth < MAX_RSS_GROWTH and exit_code == 0
    report = {
        "date": started.isoformat(timespec="seconds"), "command": shlex.join([sys.executable, *sys.argv]),
        "serve_command": shlex.join(command), "machine": machine, "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "versions": software_versions(), "bundle": args.bundle, "product": args.product,
        "clients": args.clients, "requests_per_client": args.requests, "requests": n, "completed": len(latencies),
        "errors": errors, "warmup_errors": warmup_errors, "score_mismatches_vs_infer": mismatches,
        "seconds": round(seconds, 3), "requests_per_s": round(len(latencies) / seconds, 4),
        "latency_ms": {"p50": round(float(np.percentile(lat_ms, 50)), 1) if len(lat_ms) else None,
                       "p99": round(float(np.percentile(lat_ms, 99)), 1) if len(lat_ms) else None,
                       "max": round(float(lat_ms.max()), 1) if len(lat_ms) else None},
        "engine_batches": batches, "average_engine_batch": round(items / batches, 2) if batches else None,
        "rss_mib": {"ready": round(rss_ready, 1), "after_warmup": round(rss_warm, 1), "after_load": round(rss_after, 1),
                    "growth_after_warmup": round(growth, 4)},
        "infer_batch1": {k: v for k, v in baseline.items() if k != "scores"}, "serve_exit_code": exit_code, "pass": ok,
    }
    speedup = report["requests_per_s"] / baseline["images_per_s"]
    rows = [
        ["`serve --http`, %d clients x %d requests" % (args.clients, args.requests), report["requests_per_s"],
         report["latency_ms"]["p50"], report["latency_ms"]["p99"], len(errors), report["average_engine_batch"]],
        [f"`infer --batch 1` path, {baseline['images']} of the images, same run "
         f"({1e3 / baseline['images_per_s']:.0f} ms per image)", baseline["images_per_s"], "", "", 0, 1],
    ]
    md = "\n".join([
        f"# winclip-edge serve --http: loopback load test -- {'PASS' if ok else 'FAIL'}", "",
        f"- date (UTC): {report['date']}",
        f"- command: `{report['command']}`; station: `{report['serve_command']}`",
        f"- machine: {machine['cpu']}, {machine['cores']} logical cores, {machine['ram_gib']} GiB RAM; {machine['os']}",
        f"- load average before {machine['load_average']}, after {report['load_average_after']} "
        "(the machine is shared with other jobs: compare only numbers of this run)",
        f"- bundle `{args.bundle}` (product `{args.product}`), ONNX Runtime CPU fp32; batcher max batch {args.max_batch}, "
        f"max wait {args.max_wait_ms:g} ms; images: textile JPEGs (conformal-clip-data), nominal and local defects",
        "",
        markdown_table(["what", "requests/s", "p50 ms", "p99 ms", "errors", "avg engine batch"], rows), "",
        f"- throughput vs batch-1 infer: **x{speedup:.2f}**; HTTP scores of the {len(baseline['scores'])} images measured "
        f"with infer equal infer's ({len(mismatches)} differ by more than 1e-4)",
        f"- station RSS: {rss_ready:.0f} MiB ready, {rss_warm:.0f} MiB after warm-up, {rss_after:.0f} MiB after the load "
        f"(**{growth * 100:+.2f}%**, limit +5%); exit code after SIGTERM: {exit_code}",
        f"- warm-up before the measurement: {args.clients} clients x {args.warmup} requests (other images)",
        f"- errors: {len(errors)} (warm-up: {warmup_errors})" + ("".join(f"\n  - {e}" for e in errors[:10])),
    ])
    stem = f"serve_load_{started.strftime('%Y%m%dT%H%M%S')}"
    md_path, _ = write_report(args.out, stem, report, md)
    print(md)
    print(f"\nwritten: {md_path}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
