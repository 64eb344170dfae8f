"""open_clip's residual attention block, written out for WinCLIP's many short sequences (docs/method.md §4.3).

The maths of ``ResidualAttentionBlock.forward``, arranged for the exported graph (docs/performance.md §5):

- the residual stream is 2-D ``[sequences * length, width]``, so the output projection and the MLP export as
  ``Gemm`` with the bias fused (a 3-D ``Linear`` exports as ``MatMul`` + ``Add``, one more pass over memory);
- attention needs two transposes per block (torch's ``MultiheadAttention`` trace has about eight);
- :meth:`Block.qkv` is per token, so the first block's query/key/value rows can be computed once for an
  image's tokens and gathered for every window (``WindowedVisual`` does that);
- :class:`ClsBlock` computes the last block for the CLS query only (keys and values still see every token).

Every change only reorders exact arithmetic: tests/test_windowed_clip.py compares the result with open_clip's
own transformer run on each window alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def plain_block_problem(block: nn.Module) -> str | None:
    """Why ``block`` is not a plain open_clip ``ResidualAttentionBlock`` this module can write out, or None."""
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention):
        return f"{type(block).__name__} has no nn.MultiheadAttention (custom attention blocks are not supported)"
    if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None:
        return "attention with separate query/key/value weights or extra key/value biases is not supported"
    if hasattr(block, "ln_1_kv"):
        return "cross-attention blocks are not supported"
    mlp = getattr(block, "mlp", None)
    if not all(hasattr(mlp, name) for name in ("c_fc", "gelu", "c_proj")):
        return f"{type(block).__name__} has no c_fc -> gelu -> c_proj MLP"
    return None


class Block(nn.Module):
    """One residual block on ``[sequences * length, width]`` rows; ``length`` tokens per sequence."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        attn: nn.MultiheadAttention = block.attn
        self.width = int(attn.embed_dim)
        self.heads = int(attn.num_heads)
        self.head_dim = self.width // self.heads
        self.scale = self.head_dim ** -0.5

    def qkv(self, x: torch.Tensor, length: int) -> torch.Tensor:  # [S*L, C] -> [S, L, 3C], per token
        # Projected on [S, L, C] (MatMul + Add, not Gemm): OpenVINO's low-precision pass cannot move an int8
        # model's per-channel scales through a reshape from [S*L, 3C] to [S, L, 3, h, d] (tests/test_openvino.py).
        attn = self.block.attn
        return F.linear(self.block.ln_1(x).reshape(-1, length, self.width), attn.in_proj_weight, attn.in_proj_bias)

    def attend(self, qkv: torch.Tensor, length: int) -> torch.Tensor:  # [S, L, 3C] -> [S*L, C]
        q, k, v = qkv.reshape(-1, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [S, h, L, d]
        weights = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1)  # [S, h, L, L]
        return (weights @ v).transpose(1, 2).reshape(-1, self.width)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:  # residuals, output projection, MLP
        blk = self.block
        x = x + blk.ls_1(F.linear(attended, blk.attn.out_proj.weight, blk.attn.out_proj.bias))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def forward(self, x: torch.Tensor, length: int, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """``qkv``: this block's :meth:`qkv` of ``x`` when already computed (gathered from shared tokens)."""
        return self.finish(x, self.attend(self.qkv(x, length) if qkv is None else qkv, length))


class ClsBlock(Block):
    """The last block for the CLS output only: queries = CLS, keys/values = all tokens.

    Exact (no other output of the last block reaches a window or image embedding) and saves about 1/L of
    the transformer work. ``forward`` returns ``[sequences, width]``.
    """

    def forward(self, x: torch.Tensor, length: int) -> torch.Tensor:  # type: ignore[override]
        attn, c = self.block.attn, self.width
        y = self.block.ln_1(x).reshape(-1, length, c)  # [S, L, C]
        q = F.linear(y[:, 0], attn.in_proj_weight[:c], attn.in_proj_bias[:c])  # [S, C]
        kv = F.linear(y, attn.in_proj_weight[c:], attn.in_proj_bias[c:])  # [S, L, 2C] (3-D: see Block.qkv)
        k, v = kv.reshape(-1, length, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 2 x [S, h, L, d]
        q = q.reshape(-1, self.heads, 1, self.head_dim)  # [S, h, 1, d]
        weights = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1)  # [S, h, 1, L]
        attended = (weights @ v).reshape(-1, c)  # [S, C]
        cls = x.reshape(-1, length, c)[:, 0]
        return self.finish(cls, attended)
