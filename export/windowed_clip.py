"""The windowed CLIP visual module (docs/method.md §0, §4, §7): one forward call returns the image,
window and patch embeddings of a batch. Used for the ONNX export and as the torch reference/backend.

Windows "mask everything outside" by *dropping* those tokens: a window's sequence is
``[CLS + pos_0]`` followed by its ``k*k`` patch tokens (patch embedding + own positional embedding).
All windows of one scale and all images of the batch run through the transformer as one batch of
short sequences. open_clip >= 2.26 builds batch-first transformers; this module calls the
residual blocks directly on ``[batch, sequence, width]`` tensors, so windows never attend to each
other (the flat-map bug of anomalib 2.7, docs/method.md §4.4, cannot happen here).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

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
    if problems:
        raise UnsupportedModelError("; ".join(problems))


class CLSOnlyLastBlock(nn.Module):
    """The last residual block computing only the CLS output: queries = CLS, keys/values = all tokens.

    Exact (the other outputs of the last block are never used for a window or image embedding) and
    saves about 1/L of the transformer work (docs/method.md §4.3).
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, 1, C]
        blk = self.block
        kv = blk.ln_1(x)
        q = kv[:, :1]
        y = x[:, :1] + blk.ls_1(blk.attn(q, kv, kv, need_weights=False)[0])
        return y + blk.ls_2(blk.mlp(blk.ln_2(y)))


class FullLastBlock(nn.Module):
    """The plain last block, returning only the CLS row (reference for CLSOnlyLastBlock)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, 1, C]
        return self.block(x)[:, :1]


class WindowedVisual(nn.Module):
    """images uint8 [N, H, W, 3] RGB -> the graph contract's outputs (winclip_edge/contract.py).

    Used for ONNX export and as the torch reference; the optional parts (patch layer, CLS-only last
    block) are decided here, at build time, so the traced graph has no dead branches.
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
    ):
        super().__init__()
        _check_supported(visual)
        if patch_layer not in PATCH_LAYERS:
            raise ValueError(f"patch_layer must be one of {PATCH_LAYERS}, got {patch_layer!r}")
        self.visual = visual
        self.scales = tuple(int(k) for k in scales)
        self.stride = int(stride)
        self.patch_layer = patch_layer
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
        for k in self.scales:  # [W_k, k*k] token indices of every window, a constant of the graph
            index = torch.from_numpy(window_token_index(self.grid, k, self.stride))
            self.register_buffer(f"window_index_k{k}", index, persistent=False)
        blocks = list(visual.transformer.resblocks)
        self.body = nn.ModuleList(blocks[:-1])
        self.last_block = blocks[-1]
        self.last_block_cls = CLSOnlyLastBlock(blocks[-1]) if cls_only_last_block else FullLastBlock(blocks[-1])

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens with positions, after ln_pre, and the CLS token: ([N, h*w, C], [1, 1, C])."""
        v = self.visual
        # Cast before any other op: TensorRT's ONNX parser accepts uint8 only as a graph input feeding a Cast
        # (tests/test_graph_dtypes.py checks that no other tensor of the graph is uint8).
        x = images.float().permute(0, 3, 1, 2)  # [N, 3, H, W]
        x = (x - self.pixel_mean) / self.pixel_std
        x = v.conv1(x)  # [N, C, h, w]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
        pos = v.positional_embedding.to(x.dtype)  # [1 + h*w, C]
        patches = v.ln_pre(x + pos[1:])  # ln_pre is per token: applying it before gathering is exact
        cls = v.ln_pre(v.class_embedding.to(x.dtype) + pos[0]).view(1, 1, -1)
        return patches, cls

    def _run_body(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.body:
            x = block(x)
        return x

    def _project(self, cls: torch.Tensor) -> torch.Tensor:  # [B, C] -> [B, D], L2-normalised
        return F.normalize(self.visual.ln_post(cls) @ self.visual.proj, dim=-1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        patches, cls = self._tokens(images)
        n, hw, c = patches.shape
        full = self._run_body(torch.cat([cls.expand(n, 1, c), patches], dim=1))  # [N, 1 + h*w, C]
        if self.patch_layer == "penultimate":
            image_cls = self.last_block_cls(full)[:, 0]  # [N, C]
            patch_tokens = full[:, 1:]  # output of block L-1 = input of the last block
        else:
            last = self.last_block(full)
            image_cls = last[:, 0]
            patch_tokens = self.visual.ln_post(last[:, 1:])
        out = {IMAGE_EMBEDDING: self._project(image_cls)}
        for k in self.scales:
            index = getattr(self, f"window_index_k{k}")  # [W, k*k]
            n_windows = index.shape[0]
            tokens = patches[:, index.reshape(-1)].reshape(n * n_windows, k * k, c)  # [N*W, k*k, C]
            seq = torch.cat([cls.expand(n * n_windows, 1, c), tokens], dim=1)  # [N*W, 1 + k*k, C]
            window_cls = self.last_block_cls(self._run_body(seq))[:, 0]  # [N*W, C]
            out[window_output_name(k)] = self._project(window_cls).reshape(n, n_windows, -1)
        out[PATCH_TOKENS] = F.normalize(patch_tokens, dim=-1)
        return out
