"""``triton export``, ``triton serve``: a Triton model repository from a bundle, and a CPU Triton server for it."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .commands import Commands
from .common import EXIT_OK, CliError, csv_ints


def _repository_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle folder made by `winclip-edge export`")
    p.add_argument("--name", default="winclip_visual", help="Triton model name (default winclip_visual)")
    p.add_argument("--max-batch", type=int, default=32, help="Triton max_batch_size (default 32)")
    p.add_argument("--preferred-batch", type=csv_ints, default=(8, 16),
                   help="dynamic batcher's preferred batch sizes, e.g. 8,16 (default)")
    p.add_argument("--queue-delay-us", type=int, default=2000,
                   help="dynamic batcher: how long a request may wait for others, microseconds (default 2000)")
    p.add_argument("--instances", type=int, default=1, help="model instances (per GPU for kind gpu; default 1)")
    p.add_argument("--outputs-fp16", action="store_true",
                   help="send the outputs as fp16 (half the bytes on the wire; scores differ slightly from fp32)")


def _repository_config(args: argparse.Namespace, **fields):
    from ..triton.repository import RepositoryConfig

    return RepositoryConfig(name=args.name, max_batch=args.max_batch, preferred_batch=tuple(args.preferred_batch),
                            queue_delay_us=args.queue_delay_us, instances=args.instances,
                            outputs_fp16=args.outputs_fp16, **fields)


def run_export_triton(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..triton.repository import write_repository

    bundle = Bundle(args.bundle)
    cfg = _repository_config(args, platform=args.platform, device=args.instance_kind,
                             plan=Path(args.plan) if args.plan else None)
    folder = write_repository(bundle, args.out, cfg)
    print(f"Triton model repository {args.out}: model {cfg.name!r} ({args.platform}) in {folder}")
    if args.platform == "tensorrt":
        print("note: a TensorRT plan runs only on the GPU model and TensorRT version that built it "
              "(see the winclip_plan_built_for parameter); the server's Triton must ship that TensorRT", file=sys.stderr)
    print(f"serve it: docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 "
          f"-v {Path(args.out).resolve()}:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 "
          f"tritonserver --model-repository=/models   (docs/triton.md)")
    return EXIT_OK


def run_triton_serve(args: argparse.Namespace) -> int:
    from ..triton.server import ServeConfig, TritonServer

    config = ServeConfig(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                         metrics_port=args.metrics_port, threads=args.threads,
                         repository=_repository_config(args, platform="python", device="cpu"),
                         log_verbose=args.log_verbose, log_file=Path(args.log_file) if args.log_file else None)
    print(f"starting Triton for {args.bundle} (model {args.name!r}, CPU, ONNX Runtime) ...", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    with TritonServer(args.bundle, config) as server:
        urls = server.urls()
        print(f"ready: gRPC {urls['grpc']}, HTTP {urls['http']}, metrics {urls['metrics']}; server log "
              f"{server.log_path}; client flags: --backend triton --triton-url {urls['grpc']} "
              f"--triton-model {args.name}; Ctrl-C stops", flush=True)
        try:
            stopped = server.serve_forever(stop)
        except KeyboardInterrupt:
            stopped = True
        if not stopped:
            raise CliError(f"tritonserver exited by itself; last log line: {server.log_tail()}")
    print("Triton stopped", file=sys.stderr)
    return EXIT_OK


def register(commands: Commands) -> None:
    def _export_args(p: argparse.ArgumentParser) -> None:
        _repository_options(p)
        p.add_argument("--out", required=True, help="repository folder (REPO/<name>/config.pbtxt + 1/model.*)")
        p.add_argument("--platform", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                       help="Triton backend: onnxruntime (model.onnx, default) or tensorrt (model.plan from build-engine)")
        p.add_argument("--plan", default=None,
                       help="--platform tensorrt: the plan (default: the one build-engine cached in <bundle>/engines)")
        p.add_argument("--instance-kind", choices=("auto", "gpu", "cpu"), default="auto",
                       help="instance_group kind (default auto: gpu)")
        p.set_defaults(run=run_export_triton)

    commands.add("triton export", _export_args, old="export-triton",
                 help="write a Triton Inference Server model repository for a bundle")

    def _serve_args(p: argparse.ArgumentParser) -> None:
        _repository_options(p)
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
        p.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP port (default 8000)")
        p.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC port (default 8001)")
        p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
        p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per instance (0 = default)")
        p.add_argument("--log-file", default=None, help="tritonserver log file (default: in its temporary folder)")
        p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level (default 0)")
        p.set_defaults(run=run_triton_serve)

    commands.add("triton serve", _serve_args, old="triton-serve",
                 help="run a CPU Triton server for a bundle (PyTriton's tritonserver, ONNX Runtime in Triton's "
                      "Python backend)")
