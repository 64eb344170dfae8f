"""PyTorch backend: the export module itself (the reference), on CPU or CUDA, fp32 or fp16, optionally
replayed from CUDA graphs.

Imports torch and the export stage lazily: only this backend needs them. The model is re-created
from the bundle manifest (same weights id, checked), so its fp32 outputs are the ONNX graph's reference.

fp16: the vision tower's weights are cast to half, except every LayerNorm, which keeps fp32 weights
and computes in fp32 (its input is cast up and its output back down by forward hooks): LayerNorm's
variance overflows easily in half (docs/method.md §11). The pixel normalisation also stays fp32; the patch
embedding's input is cast to half. Autocast is not used: it would re-cast the fp32 weights on every
call and it disables nn.MultiheadAttention's fused inference path.

CUDA graphs: the first call with a batch size captures the whole forward pass for that size; a later,
smaller batch is padded to the smallest captured size (one graph serves the last, partial batch of a
folder), a larger one captures a new graph. Replays cost one launch instead of hundreds.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..bundle import Bundle
from .base import EngineError
from .config import PRECISIONS, EngineConfig
from .registry import BackendRecord, installed, option

TORCH_PRECISIONS = PRECISIONS[:2]  # int8 is an ONNX Runtime variant
# Eager passes on a side stream before a capture: cuBLAS/cuDNN allocate their workspaces and pick
# their kernels there, not inside the graph (the PyTorch CUDA-graphs documentation asks for this).
GRAPH_WARMUP_ITERS = 3


@dataclass(frozen=True)
class TorchOptions:
    """What only the torch backend takes (EngineConfig.options)."""

    cuda_graphs: bool = option(False, flag="--cuda-graphs",
                               help="on CUDA: capture the forward pass per batch size, replay it (first call slower)")


def graph_batch_size(n: int, captured: Iterable[int]) -> int | None:
    """The smallest captured batch size that holds ``n`` images (the batch is padded to it), or None:
    capture a new graph for ``n``."""
    fits = [size for size in captured if size >= n]
    return min(fits) if fits else None


@dataclass
class _Graph:
    """One captured forward pass: its static input (device + pinned host staging) and static outputs."""

    graph: Any  # torch.cuda.CUDAGraph
    host: Any  # pinned uint8 [B, H, W, 3]
    device_input: Any  # uint8 [B, H, W, 3] on the GPU
    outputs: dict  # name -> float32 [B, ...] on the GPU


class TorchEngine:
    name = "torch"

    def __init__(self, bundle: Bundle, config: EngineConfig = EngineConfig(backend="torch")):
        """``config.device``: auto (cuda when available) | cpu | cuda | cuda:<i>; ``config.precision``: fp32 | fp16
        (LayerNorm stays fp32); ``TorchOptions.cuda_graphs``: capture the forward pass per batch size (CUDA only)."""
        options = config.options if config.options is not None else TorchOptions()
        device, precision, cuda_graphs = config.device, config.precision or "fp32", options.cuda_graphs
        if precision not in TORCH_PRECISIONS:
            raise EngineError(f"the torch backend runs precision {TORCH_PRECISIONS}, got {precision!r}; "
                              "int8 is an ONNX Runtime variant (`winclip-edge engine quantize`, then --backend onnxruntime)")
        try:
            import torch

            from ..export.models import load_from_manifest
            from ..export.windowed_clip import WindowedVisual
        except ImportError as err:
            raise EngineError(f"the torch backend needs the export extra ({err}); pip install 'winclip-edge[export]'") from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.torch_device = torch.device(device)
        except RuntimeError as err:
            raise EngineError(f"torch device {device!r} is not valid ({err}); use cpu, cuda or cuda:<index>") from None
        is_cuda = self.torch_device.type == "cuda"
        if is_cuda and not torch.cuda.is_available():
            raise EngineError(f"torch device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU; "
                              "use --device cpu or install a CUDA build of torch")
        if cuda_graphs and not is_cuda:
            raise EngineError(f"CUDA graphs need a CUDA device, got device {device!r}; drop --cuda-graphs or use --device cuda")
        self.torch = torch
        self.precision = precision
        self.cuda_graphs = cuda_graphs
        m = bundle.manifest
        loaded = load_from_manifest(m)
        module = WindowedVisual(loaded.model.visual, mean=m.mean, std=m.std, scales=m.scales, stride=m.stride,
                                patch_layer=m.patch_layer).eval()
        if precision == "fp16":
            _half_keeping_layernorm_fp32(torch, module.visual)
        self.module = module.to(self.torch_device)
        self._graphs: dict[int, _Graph] = {}
        where = f"{torch.cuda.get_device_name(self.torch_device)}, {self.torch_device}" if is_cuda else "cpu"
        self.device = f"{where}, torch {precision}{', CUDA graphs' if cuda_graphs else ''}"

    # ------------------------------------------------------------ running
    @contextlib.contextmanager
    def _flags(self) -> Iterator[None]:
        """A process-wide torch switch for the duration of a call, restored afterwards: no TF32 convolutions in
        fp32 (cuDNN allows them by default; fp32 here means fp32)."""
        torch = self.torch
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = tf32 and self.precision != "fp32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = tf32

    def _forward(self, images: Any) -> dict:
        return {name: value.float() for name, value in self.module(images).items()}

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if self.cuda_graphs:
            return self._run_graph(images)
        torch = self.torch
        with torch.inference_mode(), self._flags():
            out = self._forward(torch.from_numpy(images).to(self.torch_device))
        return {name: value.cpu().numpy() for name, value in out.items()}

    def _run_graph(self, images: np.ndarray) -> dict[str, np.ndarray]:
        n = images.shape[0]
        size = graph_batch_size(n, self._graphs)
        if size is None:
            size = n
            self._graphs[size] = self._capture(size, images.shape[1:])
        g = self._graphs[size]
        # Rows n..size keep the previous call's pixels: images never interact, so the padding only costs time.
        g.host[:n].copy_(self.torch.from_numpy(images))
        with self.torch.cuda.device(self.torch_device):  # the graph's device, whatever device is current
            g.device_input.copy_(g.host, non_blocking=True)
            g.graph.replay()
        return {name: value[:n].cpu().numpy() for name, value in g.outputs.items()}

    def _capture(self, batch: int, image_shape: tuple[int, ...]) -> _Graph:
        """Capture on ``self.torch_device`` (``--device cuda:1``): torch.cuda.graph and its memory pool use the
        current device, which is GPU 0 unless made the configured one here."""
        with self.torch.cuda.device(self.torch_device):
            return self._capture_here(batch, image_shape)

    def _capture_here(self, batch: int, image_shape: tuple[int, ...]) -> _Graph:
        torch = self.torch
        host = torch.zeros((batch, *image_shape), dtype=torch.uint8).pin_memory()
        device_input = host.to(self.torch_device)
        side = torch.cuda.Stream(self.torch_device)
        side.wait_stream(torch.cuda.current_stream(self.torch_device))
        with torch.no_grad(), self._flags():
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_ITERS):
                    self._forward(device_input)
            torch.cuda.current_stream(self.torch_device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self._forward(device_input)
        return _Graph(graph=graph, host=host, device_input=device_input, outputs=outputs)

    @property
    def captured_batch_sizes(self) -> list[int]:
        return sorted(self._graphs)

    def close(self) -> None:
        self._graphs = {}
        self.module = None


def _half_keeping_layernorm_fp32(torch: Any, visual: Any) -> None:
    """Cast ``visual`` to fp16 in place; every LayerNorm keeps fp32 weights and computes in fp32, and the
    patch embedding casts its (fp32, normalised) input to half."""
    visual.half()
    for module in visual.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
            module.register_forward_pre_hook(lambda _m, args: (args[0].float(), *args[1:]))
            module.register_forward_hook(lambda _m, _args, out: out.half())
    visual.conv1.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype), *args[1:]))


# ---------------------------------------------------------------- its record: tune, roofline, the registry
def _candidates(tune) -> tuple[list[EngineConfig], list[tuple[EngineConfig, str]]]:
    """fp32 on the CPU (the reference module), fp16 on CUDA where torch sees a GPU."""
    if not (installed("torch") and installed("open_clip")):
        return [], [(EngineConfig(backend="torch", precision="fp32"),
                     "torch / open_clip are not installed (the export extra)")]
    tries = [EngineConfig(backend="torch", precision="fp32", device="cpu")]
    skipped = [(EngineConfig(backend="torch", precision="bf16", device="cpu"),
                "the torch backend runs fp32 / fp16 only; bf16 on the CPU is OpenVINO's")]
    import torch

    if torch.cuda.is_available():
        tries.append(EngineConfig(backend="torch", precision="fp16", device="cuda"))
    return tries, skipped


def gemm_probe(precision: str, n: int) -> Callable[[], Any] | None:
    """An n x n GEMM in torch's CPU kernels for the roofline, only where torch is loaded already (importing it
    for a probe would cost more than the probe); None otherwise."""
    if "torch" not in sys.modules or precision not in ("fp32", "bf16"):
        return None
    torch = sys.modules["torch"]
    a = torch.randn(n, n).to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    return lambda: a @ a


BACKEND = BackendRecord(
    name="torch", create=TorchEngine, precisions=TORCH_PRECISIONS, options=TorchOptions, takes=("device",),
    devices=("cpu", "cuda", "cuda:<i>"), candidates=_candidates, gemm_probe=gemm_probe,
    packages=("torch",), install="pip install 'winclip-edge[export]'",
    summary="PyTorch: the export module itself (the reference), CPU or CUDA, fp32 / fp16, CUDA graphs")
