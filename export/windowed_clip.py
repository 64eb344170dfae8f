"""The windowed CLIP visual module (docs/method.md §0, §4, §7): one forward call returns the image,
window and patch embeddings of a batch. Used for the ONNX export and as the torch reference/backend.

Windows "mask everything outside" by *dropping* those tokens: a window's sequence is
``[CLS + pos_0]`` followed by its ``k*k`` patch tokens (patch embedding + own positional embedding).
All windows of one scale and all images of the batch run through the transformer as one batch of
short sequences. The residual blocks are open_clip's own weights with their maths written out for
many short sequences (export/blocks.py); attention runs inside each sequence, so windows never
attend to each other (the flat-map bug of anomalib 2.7, docs/method.md §4.4, cannot happen here).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from winclip_edge.export.blocks import Block, ClsBlock, plain_block_problem
from winclip_edge.contract import IMAGE_EMBEDDING, PATCH_LAYERS, PATCH_TOKENS, GraphSpec, window_output_name
from winclip_edge.errors import WinclipError
from winclip_edge.windows import window_token_index


class UnsupportedModelError(WinclipError, ValueError):
    """The open_clip model is not a plain ViT with a CLS token and a projection."""


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _check_supported(visual: nn.Module) -> None:
    problems = []
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        problems.append("not an open_clip VisionTransformer (timm / ModifiedResNet towers are not supported)")
    else:
        if getattr(visual, "attn_pool", None) is not None:
            problems.append("attentional pooling (CoCa) is not supported")
        if getattr(visual, "pool_type", "tok") != "tok":
            problems.append(f"pool_type={visual.pool_type!r}; WinCLIP needs the CLS token ('tok')")
        if getattr(visual, "final_ln_after_pool", False):
            problems.append("final_ln_after_pool=True is not supported")
        if getattr(visual, "proj", None) is None:
            problems.append("the vision tower has no projection to the joint embedding")
        if not getattr(visual.transformer, "batch_first", True):
            problems.append("sequence-first transformers (open_clip < 2.26) are not supported")
        blocks = list(visual.transformer.resblocks)
        if len(blocks) < 2:
            problems.append("a vision tower needs at least two residual blocks")
        problems += sorted({p for p in map(plain_block_problem, blocks) if p})
    if problems:
        raise UnsupportedModelError("; ".join(problems))


class WindowedVisual(nn.Module):
    """images uint8 [N, H, W, 3] RGB -> the graph contract's outputs (winclip_edge/contract.py).

    Used for ONNX export and as the torch reference; the optional parts (patch layer, the exact savings
    below) are decided here, at build time, so the traced graph has no dead branches:

    - ``cls_only_last_block``: the last block computes only the CLS output (:class:`ClsBlock`);
    - ``shared_first_projections``: the first block's query/key/value rows are per token, so the windows
      gather them from the full image's instead of projecting their copies of the same tokens again.
    """

    def __init__(
        self,
        visual: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        scales: Sequence[int] = (2, 3),
        stride: int = 1,
        patch_layer: str = "penultimate",
        cls_only_last_block: bool = True,
        shared_first_projections: bool = True,
    ):
        super().__init__()
        _check_supported(visual)
        if patch_layer not in PATCH_LAYERS:
            raise ValueError(f"patch_layer must be one of {PATCH_LAYERS}, got {patch_layer!r}")
        self.visual = visual
        self.scales = tuple(int(k) for k in scales)
        self.stride = int(stride)
        self.patch_layer = patch_layer
        self.cls_only_last_block = bool(cls_only_last_block)
        self.shared_first_projections = bool(shared_first_projections)
        self.image_size = _pair(visual.image_size)
        self.grid = _pair(visual.grid_size)
        width = visual.class_embedding.shape[-1]
        self.spec = GraphSpec(
            image_size=self.image_size, grid=self.grid, scales=self.scales, stride=self.stride,
            embed_dim=int(visual.proj.shape[1]), width=int(width),
        )
        # Pixel statistics scaled to uint8 input: x = (pixels - 255*mean) / (255*std).
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        for k in self.scales:  # [W_k, 1 + k*k]: each window's sequence as rows of [CLS, patches], a graph constant
            index = torch.from_numpy(window_token_index(self.grid, k, self.stride)) + 1
            sequence = torch.cat([torch.zeros_like(index[:, :1]), index], dim=1)
            self.register_buffer(f"window_sequence_k{k}", sequence, persistent=False)
        blocks = list(visual.transformer.resblocks)
        self.body = nn.ModuleList(Block(b) for b in blocks[:-1])
        self.last_block = Block(blocks[-1])
        self.last_block_cls = ClsBlock(blocks[-1])

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[CLS, patches] with positions, after ln_pre: [N, 1 + h*w, C]."""
        v = self.visual
        # Cast before any other op: TensorRT's ONNX parser accepts uint8 only as a graph input feeding a Cast
        # (tests/test_graph_dtypes.py checks that no other tensor of the graph is uint8).
        x = images.float().permute(0, 3, 1, 2)  # [N, 3, H, W]
        x = (x - self.pixel_mean) / self.pixel_std
        x = v.conv1(x)  # [N, C, h, w]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        # ln_pre is per token: applying it before the windows gather their tokens is exact.
        return v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))

    def _run_body(self, x: torch.Tensor, length: int, first_qkv: torch.Tensor | None = None) -> torch.Tensor:
        """All blocks but the last on [sequences * length, C] rows; ``first_qkv``: the first block's projections."""
        for i, block in enumerate(self.body):
            x = block(x, length, first_qkv if i == 0 else None)
        return x

    def _last_cls(self, x: torch.Tensor, length: int) -> torch.Tensor:  # [S * length, C] -> [S, C]
        if self.cls_only_last_block:
            return self.last_block_cls(x, length)
        return self.last_block(x, length).reshape(-1, length, x.shape[-1])[:, 0]

    def _project(self, cls: torch.Tensor) -> torch.Tensor:  # [B, C] -> [B, D], L2-normalised
        return F.normalize(self.visual.ln_post(cls) @ self.visual.proj, dim=-1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self._tokens(images)  # [N, L, C]
        n, length, c = tokens.shape
        rows = tokens.reshape(-1, c)
        qkv = self.body[0].qkv(rows, length)  # [N, L, 3C]: the full image's first projections, per token
        full = self._run_body(rows, length, qkv)  # [N * L, C]
        if self.patch_layer == "penultimate":
            image_cls = self._last_cls(full, length)  # [N, C]
            patch_tokens = full.reshape(n, length, c)[:, 1:]  # output of block L-1 = input of the last block
        else:
            last = self.last_block(full, length).reshape(n, length, c)
            image_cls = last[:, 0]
            patch_tokens = self.visual.ln_post(last[:, 1:])
        out = {IMAGE_EMBEDDING: self._project(image_cls)}
        for k in self.scales:
            sequence = getattr(self, f"window_sequence_k{k}")  # [W, 1 + k*k]
            n_windows, window_length = sequence.shape
            flat = sequence.reshape(-1)
            windows = tokens[:, flat].reshape(-1, c)  # [N * W * (1 + k*k), C]
            window_qkv = qkv[:, flat].reshape(-1, window_length, 3 * c) if self.shared_first_projections else None
            window_cls = self._last_cls(self._run_body(windows, window_length, window_qkv), window_length)
            out[window_output_name(k)] = self._project(window_cls).reshape(n, n_windows, -1)
        out[PATCH_TOKENS] = F.normalize(patch_tokens, dim=-1)
        return out
