"""What engine to run, as data: the one object the faces (CLI, service, Python callers) hand to the library.

Each backend reads the fields it understands and resolves its own precision (the ONNX Runtime backend finds the
``quantize`` variant, the TensorRT backend the cached plan of that precision), so a Python caller writes
``Inspector(bundle, product, engine=EngineConfig(precision="int8"))`` and gets what ``--precision int8`` gives.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

PRECISIONS = ("fp32", "fp16", "int8")
# What --precision accepts: bf16 is OpenVINO's alone (CPUs with AVX512-BF16 / AMX); the others refuse it.
ENGINE_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# What build-engine makes by default, so --backend tensorrt without --precision finds it.
DEFAULT_PRECISION = {"tensorrt": "fp16"}


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "onnxruntime"  # onnxruntime | openvino | torch | tensorrt | triton | auto (engines/auto.py)
    precision: Optional[str] = None  # fp32 | fp16 | int8; None = the backend's default (fp16 for tensorrt, else fp32)
    provider: str = "auto"  # onnxruntime: auto | cpu | cuda | tensorrt (or a full execution-provider name)
    threads: int = 0  # onnxruntime / openvino intra-op threads; 0 = its default
    device: str = "auto"  # torch: auto | cpu | cuda | cuda:<i>; openvino: auto (CPU) | cpu | gpu | npu
    cuda_graphs: bool = False  # torch on CUDA: capture the forward pass per batch size
    engine_dir: Optional[Path] = None  # tensorrt / ORT TensorRT provider: engine cache folder (default <bundle>/engines)
    max_batch: Optional[int] = None  # tensorrt: pick the plan with this profile maximum (default: the largest);
    # onnxruntime --provider tensorrt: the batch profile's maximum (default 8)
    performance_hint: str = "latency"  # openvino: latency (one request, all cores) | throughput (streams)
    triton_url: Optional[str] = None  # triton: HOST:PORT (default 127.0.0.1:8001 gRPC / 127.0.0.1:8000 HTTP)
    triton_protocol: str = "grpc"  # triton: grpc | http
    triton_model: str = "winclip_visual"  # triton: model name in the server's repository
    triton_timeout: float = 30.0  # triton: seconds per request (then retries with back-off)

    @property
    def resolved_precision(self) -> str:
        return self.precision or DEFAULT_PRECISION.get(self.backend, "fp32")

    def resolved(self) -> "EngineConfig":
        """The same config with the backend's default precision filled in (for records and comparisons)."""
        return replace(self, precision=self.resolved_precision)

    def describe(self) -> str:
        return f"{self.backend} {self.resolved_precision}"
