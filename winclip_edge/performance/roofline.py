"""How close an engine runs to what this machine can do: the graph's FLOPs per image and a measured GEMM peak.

``model_gflop`` counts the multiply-adds of every MatMul and Convolution in the bundle's graph at batch 1
(OpenVINO reads the ONNX file and makes every shape static; 2 FLOP per multiply-add). ``gemm_peak`` times a
short square GEMM in the engine's precision with the libraries installed (numpy/OpenBLAS, and every backend whose
record has a GEMM probe: OpenVINO's oneDNN kernels in f32 / bf16 / int8 via FakeQuantize, torch when it is
already loaded) and keeps the best: the measured ceiling for dense matrix maths on this machine, at its current
load. Achieved GFLOP/s = model GFLOP / engine
seconds per image; the fraction of the peak says how much a faster kernel could still gain (attention,
LayerNorm and memory traffic keep a real model below 1).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROBE_SECONDS = 0.4  # per probe, after one warm-up call
PROBE_SIZE = 1536  # square GEMM: large enough for the blocked kernels, small enough for a short probe


def model_gflop(onnx_path: str | Path, image_size: tuple[int, int]) -> float | None:
    """GFLOP of one image through the graph (MatMul + Convolution), or None without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return None
    model = ov.Core().read_model(str(onnx_path))
    model.reshape({model.inputs[0].get_any_name(): [1, image_size[0], image_size[1], 3]})
    total = 0.0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "MatMul":
            a = list(op.input(0).get_shape())
            k = a[-2] if op.get_attributes()["transpose_a"] else a[-1]
            total += 2.0 * float(np.prod(list(op.output(0).get_shape()))) * k
        elif kind == "Convolution":
            w = list(op.input(1).get_shape())
            total += 2.0 * float(np.prod(list(op.output(0).get_shape()))) * float(np.prod(w[1:]))
    return total / 1e9


def _rate(call, flop: float) -> float:
    call()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < PROBE_SECONDS:
        call()
        n += 1
    return flop * n / (time.perf_counter() - t0) / 1e9


def _numpy_fp32(n: int) -> float:
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return _rate(lambda: a @ a, 2.0 * n ** 3)


@dataclass(frozen=True)
class Peak:
    precision: str
    gflops: float | None  # best probe, None when no probe runs this precision here
    probes: dict  # library -> GFLOP/s (or the reason it did not run)


def gemm_peak(precision: str, n: int = PROBE_SIZE) -> Peak:
    """The best dense-GEMM rate of ``precision`` (fp32 | bf16 | int8; fp16 on a CPU: none) this machine shows now."""
    from ..engines.registry import backends

    probes: dict = {}
    if precision == "fp32":
        probes["numpy"] = round(_numpy_fp32(n), 1)
    for name, record in backends().items():  # each backend's own kernels, where its record has a probe
        if record.gemm_probe is None:
            continue
        try:
            call = record.gemm_probe(precision, n)
            if call is not None:
                probes[name] = round(_rate(call, 2.0 * n ** 3), 1)
        except (ImportError, RuntimeError) as err:
            probes[name] = f"not run: {err}"
    rates = [v for v in probes.values() if isinstance(v, float)]
    return Peak(precision=precision, gflops=max(rates) if rates else None, probes=probes)


__all__ = ["Peak", "gemm_peak", "model_gflop"]
