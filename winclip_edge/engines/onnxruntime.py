"""ONNX Runtime backend: CPU everywhere; CUDA / TensorRT execution providers with onnxruntime-gpu.

``device`` says where the graph runs: ``auto`` (CUDA when onnxruntime-gpu sees a GPU, else the CPU), ``cpu``,
``cuda`` / ``cuda:<i>``; ``OnnxRuntimeOptions.provider`` (``--provider``) picks the execution provider by name and
must agree with it (``--provider cpu --device cuda`` is refused).

ONNX Runtime's TensorRT provider builds a TensorRT engine when a session starts (minutes for ViT-B), so it is
configured like ``engine build``: fp16 is TensorRT's own flag on the fp32 graph (``trt_fp16_enable``; the ONNX fp16
variant is for the CUDA provider), one optimisation profile over the batch axis (``trt_profile_*_shapes``: a
later, larger batch does not rebuild the engine; larger batches are split), and its engine and timing caches
in ``onnxruntime-tensorrt-<machine key>/`` under the engine folder (``--engine-dir``, default ``<bundle>/engines``):
ONNX Runtime asks for them to be cleaned when its, TensorRT's or the GPU's version changes, so they are keyed by the
machine and bounded like the other caches (caches.py). int8 needs TensorRT's own calibration: that is the native
backend's (``engine build --precision int8``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..bundle import Bundle
from ..contract import INPUT_NAME, check_io, output_names
from . import caches
from .base import EngineError
from .cache_dir import engine_dir
from .config import EngineConfig
from .onnx_variants import VariantError, load_variant
from .registry import BackendRecord, option

# Preference order for provider="auto". ONNX Runtime's TensorRT provider is used only when asked for: it
# builds an engine when a session starts (minutes for ViT-B), so it needs its engine cache (below).
AUTO_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
ORT_TRT_MAX_BATCH = 8  # the profile's maximum when OnnxRuntimeOptions.max_batch is not set (the runtime's default --batch)
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TRT_PROVIDER = "TensorrtExecutionProvider"
PROVIDER_ALIASES = {"cpu": CPU_PROVIDER, "cuda": CUDA_PROVIDER, "tensorrt": TRT_PROVIDER}


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """What only the ONNX Runtime backend takes (EngineConfig.options)."""

    provider: str = option("auto", flag="--provider",
                           help="ONNX Runtime execution provider: auto|cpu|cuda|tensorrt or a full provider name "
                                "(default auto: as --device says)")
    max_batch: Optional[int] = None  # provider tensorrt: the batch profile's maximum (default ORT_TRT_MAX_BATCH)


def execution_provider(provider: str, device: str) -> Optional[str]:
    """The execution provider asked for by ``provider`` and ``device`` together; None = ONNX Runtime's preference
    (AUTO_PROVIDERS). A provider that contradicts the device is refused."""
    if provider == "auto":
        if device == "auto":
            return None
        if device.lower() == "cpu":
            return CPU_PROVIDER
        gpu_index(device)  # cuda | cuda:<i>, else the error naming the device
        return CUDA_PROVIDER
    wanted = PROVIDER_ALIASES.get(provider, provider)
    if wanted == CPU_PROVIDER and device.lower() not in ("auto", "cpu"):
        raise EngineError(f"ONNX Runtime provider cpu runs on the CPU, not on device {device!r}; leave the device "
                          "out or choose the cuda provider")
    return wanted


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, config: EngineConfig = EngineConfig(backend="onnxruntime"),
                 model_path: str | Path | None = None):
        """``config.device`` + ``options.provider``: where it runs (above); ``config.threads``: intra-op threads,
        0 = ORT's default; ``config.precision`` fp16/int8 runs the bundle's ``engine quantize`` variant (sha256-checked).
        ``model_path``: another ONNX file with the same contract (a variant being made)."""
        opts = config.options if config.options is not None else OnnxRuntimeOptions()
        threads, precision = config.threads, config.precision or "fp32"
        wanted = execution_provider(opts.provider, config.device)
        self.max_batch: int | None = None  # set with the TensorRT provider: larger batches are split
        trt_cache = None  # with the TensorRT provider: its cache folder, whether it is new, the bound
        if model_path is None and precision != "fp32" and wanted != TRT_PROVIDER:
            model_path = load_variant(bundle, precision)
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise EngineError(f"onnxruntime is not installed ({err}); pip install onnxruntime") from None
        available = ort.get_available_providers()
        if wanted is None:
            providers: list = [p for p in AUTO_PROVIDERS if p in available]
        else:
            if wanted not in available:
                raise EngineError(f"ONNX Runtime provider {wanted} is not available here (available: {available}); "
                                  "install onnxruntime-gpu (desktop) or the Jetson Zoo wheel for CUDA/TensorRT")
            providers = [wanted] + ([CPU_PROVIDER] if wanted != CPU_PROVIDER else [])
            if wanted == CUDA_PROVIDER:
                providers[0] = (wanted, {"device_id": gpu_index(config.device)})
            if wanted == TRT_PROVIDER:
                trt_cache = tensorrt_cache(bundle, config)
                providers[0] = (wanted, tensorrt_provider_options(bundle, config, trt_cache[0]))
                self.max_batch = opts.max_batch or ORT_TRT_MAX_BATCH
                if CUDA_PROVIDER in available:  # for the nodes TensorRT does not take
                    providers.insert(1, (CUDA_PROVIDER, {"device_id": gpu_index(config.device)}))

        def session_options():
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads:
                options.intra_op_num_threads = threads
            return options

        options, path = session_options(), str(model_path or bundle.onnx_path)
        self.graph_cache = None
        if model_path is None and providers == [CPU_PROVIDER]:  # the fp32 graph on the CPU: cached optimised
            from .ort_cache import OptimizedGraphCache

            self.graph_cache = OptimizedGraphCache(bundle, config)
            path = self.graph_cache.prepare(options)
        try:
            try:
                self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
            except Exception:
                if self.graph_cache is None:
                    raise
                # the cache went mid-start (another process's bound removed this key's folder): run without it
                self.graph_cache.abandon()
                self.graph_cache, path = None, str(bundle.onnx_path)
                self.session = ort.InferenceSession(path, sess_options=session_options(), providers=providers)
        except Exception as err:
            raise EngineError(f"ONNX Runtime cannot load {path}: {err}") from None
        if self.graph_cache is not None:
            self.graph_cache.commit()
        if trt_cache is not None:  # the TensorRT provider built its engine into a new folder, or reused one
            folder, fresh, bound = trt_cache
            if fresh:
                caches.prune(folder.parent, caches.ORT_TENSORRT, bound)
            else:
                caches.touch(folder)
        self.device = self.session.get_providers()[0]  # the provider actually in use, not the one asked for
        inputs = {i.name: tuple(i.shape) for i in self.session.get_inputs()}
        outputs = {o.name: tuple(o.shape) for o in self.session.get_outputs()}
        check_io(bundle.spec, inputs, outputs, where=path)
        self.output_names = output_names(bundle.spec.scales)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if self.max_batch is not None and len(images) > self.max_batch:  # beyond the TensorRT profile
            parts = [self.run(images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
            return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}
        values = self.session.run(self.output_names, {INPUT_NAME: images})
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.output_names, values)}

    def close(self) -> None:
        self.session = None


def gpu_index(device: str) -> int:
    """``EngineConfig.device`` for the CUDA / TensorRT providers: auto | cuda -> 0, cuda:<i> -> i."""
    match = re.fullmatch(r"(?:auto|cuda)(?::(\d+))?", device.lower())
    if match is None:
        raise EngineError(f"device {device!r} is not a CUDA device for ONNX Runtime's GPU providers; use cuda or cuda:<i>")
    return int(match.group(1) or 0)


def tensorrt_cache(bundle: Bundle, config: EngineConfig) -> tuple[Path, bool, caches.CacheBound]:
    """The TensorRT provider's cache folder for this machine, made (-> folder, fresh: it was new or empty, the engine
    is about to be built; the bound); refused where it cannot be written: without it every start builds the engine."""
    _check_trt_precision(bundle, config.precision or "fp32")
    bound = caches.CacheBound.from_env()
    folder = caches.folder_for(engine_dir(bundle, config.engine_dir), caches.ORT_TENSORRT)
    try:
        folder, fresh = caches.make_folder(folder.parent, caches.ORT_TENSORRT, bound)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"no write permission on {folder}")
    except OSError as err:
        raise EngineError(f"ONNX Runtime's TensorRT provider cannot keep its engine cache in {folder} ({err.strerror or err}); "
                          "pass --engine-dir DIR (a writable folder) when the bundle is read-only") from None
    return folder, fresh, bound


def _check_trt_precision(bundle: Bundle, precision: str) -> None:
    if precision not in ("fp32", "fp16"):
        raise EngineError(f"ONNX Runtime's TensorRT provider runs fp32 or fp16 here, not {precision}: TensorRT int8 needs "
                          f"its own calibration; use `winclip-edge engine build --bundle {bundle.root} --precision int8 "
                          "--calibration-images DIR` and --backend tensorrt")


def tensorrt_provider_options(bundle: Bundle, config: EngineConfig, folder: Path) -> dict:
    """ONNX Runtime TensorRT provider options for ``config``: precision flag, batch profile, engine + timing caches
    in ``folder`` (:func:`tensorrt_cache`)."""
    precision = config.precision or "fp32"
    _check_trt_precision(bundle, precision)
    h, w = bundle.spec.image_size
    opts = config.options if config.options is not None else OnnxRuntimeOptions()
    max_batch = opts.max_batch or ORT_TRT_MAX_BATCH

    def shape(n: int) -> str:
        return f"{INPUT_NAME}:{n}x{h}x{w}x3"

    return {"device_id": gpu_index(config.device), "trt_fp16_enable": precision == "fp16",
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(folder),
            "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(max_batch),
            "trt_profile_max_shapes": shape(max_batch)}


# ---------------------------------------------------------------- its record: tune, quantize, the registry
def _candidates(tune) -> tuple[list[EngineConfig], list[tuple[EngineConfig, str]]]:
    """int8 on the CPU per thread count (the fp32 reference is tune's own), fp32 + fp16 on CUDA where it runs."""
    tries = [EngineConfig(backend="onnxruntime", precision="int8", threads=t) for t in tune.threads]
    skipped = []
    import onnxruntime as ort

    cuda = OnnxRuntimeOptions(provider="cuda")
    if CUDA_PROVIDER in ort.get_available_providers():
        tries += [EngineConfig(backend="onnxruntime", precision=p, options=cuda) for p in ("fp32", "fp16")]
    else:
        skipped.append((EngineConfig(backend="onnxruntime", precision="fp16", options=cuda),
                        "no CUDA execution provider (onnxruntime-gpu + an NVIDIA GPU)"))
    return tries, skipped


def _prepare(bundle: Bundle, config: EngineConfig, product: str | None, log: Callable[[str], None],
             build: bool = True) -> None:
    """The int8 variant a candidate needs, made when missing (dynamic quantisation, once per bundle)."""
    if config.precision != "int8" or not build:
        return
    try:
        load_variant(bundle, "int8")
    except VariantError:
        from ..builders.variants import make_variant

        log("making the ONNX Runtime int8 variant (dynamic quantisation) ...")
        make_variant(bundle, "int8")


BACKEND = BackendRecord(
    name="onnxruntime", create=OnnxRuntimeEngine, precisions=("fp32", "fp16", "int8"), options=OnnxRuntimeOptions,
    takes=("threads", "device", "engine_dir"), devices=("cpu", "cuda", "cuda:<i>"),
    candidates=_candidates, prepare=_prepare,
    builds="fp16 / int8 ONNX variants of the visual (and text) graph", build_command="quantize",
    packages=("onnxruntime", "onnxruntime-gpu"), install="pip install onnxruntime (GPU: 'winclip-edge[gpu]')",
    summary="ONNX Runtime: CPU everywhere; CUDA / TensorRT execution providers with onnxruntime-gpu (the reference)")
