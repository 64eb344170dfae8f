#!/usr/bin/env python
"""Triton on loopback vs local ONNX Runtime, in the same run: requests/s and latency p50/p99 for 1, 4 and 16
concurrent clients (one image per request), and bytes on the wire per image with fp32 vs fp16 outputs.

The server is `winclip-edge triton serve`'s (PyTriton's tritonserver, ONNX Runtime in Triton's Python backend, on
this machine's CPU): the numbers show what the protocol, the server's dynamic batching and the client cost next to
in-process inference on the same cores, not what a GPU server does. Local ONNX Runtime: one session shared by the
same number of client threads. Bounded: ``--requests`` per client count (default 48), ``--frames`` distinct images (16).

Without ``--bundle`` a tiny random-weight bundle (tests/conftest.py "tiny240": the default model's 15x15 grid) is
exported in a subprocess (needs the export extra). Run from the repository root::

    python benchmarks/triton_loopback.py [--bundle DIR --product P] [--requests 48] [--clients 1,4,16]
    # -> benchmarks/results/triton_<model>_<UTC stamp>.md + .json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from winclip_edge.performance.bench import machine_info, markdown_table, software_versions, write_report  # noqa: E402
from winclip_edge.bundle import Bundle  # noqa: E402
from winclip_edge.engines import EngineConfig, create_engine  # noqa: E402
from winclip_edge.engines.triton import TritonOptions  # noqa: E402
from winclip_edge.preprocess import read_image, resize_to_model  # noqa: E402
from winclip_edge.triton.repository import RepositoryConfig  # noqa: E402
from winclip_edge.triton.server import ServeConfig, TritonServer  # noqa: E402

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PACKAGES = ("onnxruntime", "numpy", "tritonclient", "nvidia-pytriton", "grpcio")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tiny_bundle(folder: Path) -> Path:
    config = folder / "tiny240.json"
    config.write_text(json.dumps(TINY_CONFIG))
    out = folder / "bundle"
    subprocess.run([sys.executable, "-m", "winclip_edge.cli", "export", "--model", str(config), "--pretrained", "none",
                    "--products", "textile", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def textile_frames(bundle: Bundle, n: int) -> np.ndarray:
    from winclip_edge.evaluation.datasets import textile_root

    files = sorted((textile_root() / "nominal").glob("*"))[:n]
    return np.stack([resize_to_model(read_image(f), bundle.spec.image_size) for f in files])


def load(make_engine, clients: int, requests: int, frames: np.ndarray) -> dict:
    """``clients`` threads, each with its engine from ``make_engine()``, send ``requests`` one-image calls in all."""
    engines = [make_engine() for _ in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    barrier = threading.Barrier(clients + 1)

    def client(engine) -> None:
        barrier.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                engine.run(frames[i % len(frames)][None])
            except Exception as err:  # counted, reported
                errors.append(str(err))
                continue
            with lock:
                latencies.append((time.perf_counter() - t0) * 1e3)

    threads = [threading.Thread(target=client, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for e in engines:
        if e is not engines[0]:
            e.close()
    engines[0].close()
    lat = np.array(latencies)
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "wall_s": round(wall, 3),
            "req_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None}


def metric(port: int, name: str) -> float:
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


def wire_bytes(engine, frames: np.ndarray) -> dict:
    """Serialized gRPC request/response message sizes of one-image requests (mean over the frames)."""
    responses, outputs = [], []
    for f in frames:
        result = engine.infer_raw(f[None])
        responses.append(result.get_response().ByteSize())
        outputs.append(sum(result.as_numpy(n).nbytes for n in engine.output_names))
    return {"request_payload": int(frames[0].nbytes), "response_message": round(float(np.mean(responses))),
            "output_tensors": round(float(np.mean(outputs)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle (default: export a tiny random-weight one)")
    ap.add_argument("--product", default="textile")
    ap.add_argument("--requests", type=int, default=48, help="requests per client count (default 48)")
    ap.add_argument("--clients", default="1,4,16", help="client counts (default 1,4,16)")
    ap.add_argument("--frames", type=int, default=16,
                    help="distinct textile frames (cycled by the requests; also the fidelity and wire-size probes)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    stamp = _dt.datetime.now(_dt.timezone.utc)
    report: dict = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
                    "date": stamp.isoformat(timespec="seconds"), "machine_before": machine_info(),
                    "versions": software_versions(PACKAGES)}
    with tempfile.TemporaryDirectory(prefix="triton-bench-") as tmp:
        bundle = Bundle(args.bundle or tiny_bundle(Path(tmp)))
        frames = textile_frames(bundle, args.frames)
        report["model"] = bundle.manifest.model
        rows = []
        local_cfg = EngineConfig(backend="onnxruntime")
        for protocol_fp16 in (False, True):
            http, grpc, metrics = free_ports(3)
            serve = ServeConfig(http_port=http, grpc_port=grpc, metrics_port=metrics,
                                repository=RepositoryConfig(platform="python", device="cpu", outputs_fp16=protocol_fp16))
            with TritonServer(bundle, serve):
                remote_cfg = EngineConfig(backend="triton", options=TritonOptions(url=f"127.0.0.1:{grpc}", timeout=120))
                probe = create_engine(bundle, remote_cfg)
                key = "fp16" if protocol_fp16 else "fp32"
                report[f"wire_{key}"] = wire_bytes(probe, frames)
                got = probe.run(frames)
                probe.close()
                if not protocol_fp16:
                    report["fp32_outputs"] = got
                    local = create_engine(bundle, local_cfg)
                    ref = local.run(frames)
                    local.close()
                    report["max_abs_diff_fp32_vs_local"] = max(float(np.abs(got[n] - ref[n]).max()) for n in ref)
                    for c in clients:
                        print(f"[triton] {c} client(s): Triton ...", file=sys.stderr, flush=True)
                        before = metric(metrics, "nv_inference_request_success"), metric(metrics, "nv_inference_exec_count")
                        r = load(lambda: create_engine(bundle, remote_cfg), c, args.requests, frames)
                        r["executions"] = int(metric(metrics, "nv_inference_exec_count") - before[1])
                        rows.append({"engine": "triton gRPC (loopback)", **r})
                        print(f"[triton] {c} client(s): local ONNX Runtime ...", file=sys.stderr, flush=True)
                        shared = create_engine(bundle, local_cfg)
                        r = load(lambda: _Shared(shared), c, args.requests, frames)
                        shared.close()
                        rows.append({"engine": "local ONNX Runtime (one session)", **r, "executions": r["requests"]})
                else:
                    fp32 = report.pop("fp32_outputs")
                    report["max_abs_diff_fp16_vs_fp32_outputs"] = max(float(np.abs(got[n] - fp32[n]).max()) for n in fp32)
                    report["fp16_score_check"] = _score_diff(bundle, args.product, got, fp32)
        report["rows"] = rows
    report["machine_after"] = {"load_average": machine_info()["load_average"]}
    m = report["machine_before"]
    w32, w16 = report["wire_fp32"], report["wire_fp16"]
    md = [f"# Triton (loopback, CPU server) vs local ONNX Runtime — {report['model']}", "",
          f"- date: {report['date']}; command: `{report['command']}`",
          f"- machine: {m['cpu']}, {m['cores']} logical cores, {m['ram_gib']} GiB; load average before "
          f"{m['load_average']}, after {report['machine_after']['load_average']} (shared machine: other jobs ran)",
          f"- versions: {report['versions']}",
          "- server: `winclip-edge triton serve` (PyTriton's tritonserver, Python backend, ONNX Runtime CPU, 1 instance, "
          "dynamic batching max 32, queue delay 2000 us) on the same cores as the clients; one image per request",
          f"- Triton fp32 outputs vs local ONNX Runtime, max abs difference: {report['max_abs_diff_fp32_vs_local']:.2e}", "",
          markdown_table(["engine", "clients", "requests", "errors", "server executions", "req/s", "p50 ms", "p99 ms"],
                         [[r["engine"], r["clients"], r["requests"], r["errors"], r["executions"], r["req_per_s"],
                           r["p50_ms"], r["p99_ms"]] for r in rows]), "",
          "## Bytes on the wire per image (gRPC, one image per request)", "",
          markdown_table(["outputs", "request payload (uint8 image)", "response message", "output tensors"],
                         [["fp32", w32["request_payload"], w32["response_message"], w32["output_tensors"]],
                          ["fp16", w16["request_payload"], w16["response_message"], w16["output_tensors"]]]), "",
          f"fp16 outputs vs fp32 outputs: max abs difference of the embeddings "
          f"{report['max_abs_diff_fp16_vs_fp32_outputs']:.2e}; {report['fp16_score_check']}"]
    path, _ = write_report(args.out, f"triton_{report['model']}_{stamp.strftime('%Y%m%dT%H%M%S')}", report, "\n".join(md))
    print("\n".join(md))
    print(f"-> {path}", file=sys.stderr)


class _Shared:
    """A local engine shared by several client threads (ONNX Runtime sessions are thread-safe); close is a no-op."""

    def __init__(self, engine):
        self.engine = engine

    def run(self, images):
        return self.engine.run(images)

    def close(self):
        pass


def _score_diff(bundle: Bundle, product: str, fp16: dict, fp32: dict) -> str:
    """Image scores of the same frames from fp16 and fp32 outputs (zero-shot, the product's text prototypes)."""
    from winclip_edge.inspector import Inspector

    inspector = Inspector(bundle, product, engine=_Shared(None), with_threshold=False)
    a = inspector.score(fp16, memory=None).image_score
    b = inspector.score(fp32, memory=None).image_score
    return f"zero-shot image scores, max abs difference {float(np.abs(a - b).max()):.2e} over {len(a)} images"


if __name__ == "__main__":
    main()
