"""The numbers of docs/method.md §3, §5, §6 and §7 as pure, vectorised numpy functions.

Shapes: ``N`` images, ``W`` windows of one scale, ``D`` embedding dim, ``h x w`` token grid.
Every function here has a slow loop version in tests/test_scoring.py that it must equal.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from .contract import IMAGE_EMBEDDING, PATCH_TOKENS, window_output_name
from .errors import WinclipError
from .windows import Grid, window_layout

DEFAULT_TEMPERATURE = 0.07
MEANS = ("harmonic", "arithmetic")
# Harmonic means divide by scores; a score of exactly 0 (a test window identical to a reference)
# is clamped here, which makes that token's harmonic mean ~0, its mathematical limit.
SCORE_FLOOR = 1e-12


class ScoringError(WinclipError, ValueError):
    """Scoring options that cannot apply (unknown mean, T <= 0, a window scale the bundle lacks)."""


def class_scores(embeddings: np.ndarray, t_normal: np.ndarray, t_anomalous: np.ndarray,
                 temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """Two-class softmax probability of "anomalous" (section 3): ``[..., D] -> [...]``.

    ``exp(<f,t_a>/T) / (exp(<f,t_n>/T) + exp(<f,t_a>/T))`` written as a logistic for stability.
    """
    margin = (embeddings @ t_anomalous - embeddings @ t_normal) / temperature
    return (1.0 / (1.0 + np.exp(-margin))).astype(np.float32)


def _trailing_box_sum(canvas: np.ndarray, k: int) -> np.ndarray:
    """``out[..., i, j] = sum(canvas[..., i-k+1 : i+1, j-k+1 : j+1])`` (zero outside), via an integral image."""
    pad = [(0, 0)] * (canvas.ndim - 2) + [(k, 0), (k, 0)]
    integral = np.pad(canvas, pad).cumsum(-2).cumsum(-1)  # [..., h+k, w+k]
    h, w = canvas.shape[-2:]
    a = integral[..., k:, k:]
    b = integral[..., :h, k:]
    c = integral[..., k:, :w]
    d = integral[..., :h, :w]
    return a - b - c + d


def aggregate_windows(window_scores: np.ndarray, grid: Grid, k: int, stride: int = 1,
                      mean: str = "harmonic") -> np.ndarray:
    """Window scores ``[N, W]`` -> token map ``[N, h, w]`` (section 5).

    Harmonic: ``M(i) = |W(i)| / sum_{w in W(i)} 1/s_w`` over the windows ``W(i)`` covering token ``i``.
    The sum over covering windows is a k x k box filter over the window origins, O(tokens).
    """
    if mean not in MEANS:
        raise ValueError(f"mean must be one of {MEANS}, got {mean!r}")
    rows, cols = window_layout(grid, k, stride)
    n = window_scores.shape[0]
    if window_scores.shape[1] != len(rows) * len(cols):
        raise ValueError(f"{window_scores.shape[1]} window scores for scale {k}, expected {len(rows) * len(cols)}")
    scores = window_scores.astype(np.float64).reshape(n, len(rows), len(cols))
    values = 1.0 / np.maximum(scores, SCORE_FLOOR) if mean == "harmonic" else scores
    canvas = np.zeros((n, *grid))  # window values placed at their origins
    canvas[:, rows[:, None], cols[None, :]] = values
    ones = np.zeros(grid)
    ones[rows[:, None], cols[None, :]] = 1.0
    total = _trailing_box_sum(canvas, k)
    count = _trailing_box_sum(ones, k)  # |W(i)|, >= 1 for every token (windows.py covers every token)
    out = count / total if mean == "harmonic" else total / count
    return out.astype(np.float32)


def combine_maps(maps: list[np.ndarray], mean: str = "harmonic") -> np.ndarray:
    """Harmonic (or arithmetic) mean of equally weighted maps of the same shape."""
    stack = np.stack([m.astype(np.float64) for m in maps])
    if mean == "harmonic":
        out = len(maps) / (1.0 / np.maximum(stack, SCORE_FLOOR)).sum(0)
    elif mean == "arithmetic":
        out = stack.mean(0)
    else:
        raise ValueError(f"mean must be one of {MEANS}, got {mean!r}")
    return out.astype(np.float32)


def zero_shot_map(image_scores: np.ndarray, scale_maps: list[np.ndarray], use_image_scale: bool = True,
                  mean: str = "harmonic") -> np.ndarray:
    """WinCLIP map (section 6): ``Z(i) = (1 + K) / (1/s(f_img) + sum_k 1/M_k(i))``, ``[N, h, w]``.

    ``use_image_scale=False`` and leaving scales out of ``scale_maps`` are the paper's ablations.
    """
    maps = list(scale_maps)
    if use_image_scale:
        shape = maps[0].shape if maps else None
        if shape is None:
            raise ValueError("the image scale alone has no spatial map: give at least one window scale")
        maps.append(np.broadcast_to(image_scores.reshape(-1, 1, 1), shape))
    if not maps:
        raise ValueError("zero-shot map needs at least one scale")
    return combine_maps(maps, mean)


def association(queries: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """``a(F) = min_r (1 - <F, r>) / 2`` for L2-normalised rows (section 7): ``[N, Q, D] x [M, D] -> [N, Q]``."""
    n, q, d = queries.shape
    # One 2-D GEMM: numpy runs a 3-D @ 2-D product as N separate small ones.
    best = (queries.reshape(n * q, d) @ np.ascontiguousarray(memory.T)).max(-1).reshape(n, q)  # [N, Q]
    return ((1.0 - best) / 2.0).astype(np.float32)


@dataclass(frozen=True)
class ScoringOptions:
    """Knobs of sections 3 and 6-8; the defaults are the paper's."""

    temperature: float | None = None  # T of the two-class softmax; None = the bundle's (0.07 by default)
    scales: tuple[int, ...] | None = None  # window scales to use (subset of the bundle's); None = all
    use_image_scale: bool = True  # ablation: False drops s(f_img) from the zero-shot map
    mean: str = "harmonic"  # ablation: "arithmetic" instead of harmonic averaging
    use_memory: bool = True  # few-shot (WinCLIP+) when the product has a memory

    def __post_init__(self):
        if self.temperature is not None and not self.temperature > 0:
            raise ScoringError(f"temperature must be > 0, got {self.temperature}")
        if self.mean not in MEANS:
            raise ScoringError(f"mean must be one of {MEANS}, got {self.mean!r}")
        if self.scales is not None and not self.scales and not self.use_image_scale:
            raise ScoringError("no scale left: give at least one window scale or keep the image scale")

    def resolved(self, bundle_scales: tuple[int, ...], bundle_temperature: float) -> "ScoringOptions":
        """Defaults filled in from the bundle; refuses window scales the bundle does not have."""
        missing = set(self.scales or ()) - set(bundle_scales)
        if missing:
            raise ScoringError(f"window scales {sorted(missing)} are not in the bundle (it has {list(bundle_scales)})")
        return replace(self, scales=tuple(bundle_scales) if self.scales is None else tuple(self.scales),
                       temperature=bundle_temperature if self.temperature is None else self.temperature)

    def decision_record(self) -> dict:
        """What an image score depends on besides the memory: stored with a threshold, compared on load."""
        return {"temperature": self.temperature, "scales": list(self.scales) if self.scales is not None else None,
                "use_image_scale": self.use_image_scale, "mean": self.mean}


@dataclass(frozen=True)
class Scores:
    image_score: np.ndarray  # [N] final image score in [0, 1]
    token_map: np.ndarray  # [N, h, w] final map on the token grid
    zero_shot_score: np.ndarray  # [N] s(f_img)


def score_batch(outputs: Mapping[str, np.ndarray], t_normal: np.ndarray, t_anomalous: np.ndarray, grid: Grid,
                stride: int, scales: tuple[int, ...], options: ScoringOptions = ScoringOptions(),
                memory_windows: Mapping[int, np.ndarray] | None = None,
                memory_patches: np.ndarray | None = None, token_mask: np.ndarray | None = None) -> Scores:
    """Engine outputs of a batch -> image scores and token maps (zero-shot, or WinCLIP+ with a memory).

    ``memory_windows``: scale -> ``[M_k, D]`` reference window embeddings; ``memory_patches``: ``[M, C]``.
    ``token_mask``: bool ``[N, h, w]``, the tokens the image score's maximum may use (an ROI, docs/tiling.md);
    the visual map is zeroed outside it first.
    """
    used = scales if options.scales is None else options.scales
    missing = set(used) - set(scales)
    if missing:
        raise ScoringError(f"window scales {sorted(missing)} are not in the bundle (it has {list(scales)})")
    n = outputs[IMAGE_EMBEDDING].shape[0]
    h, w = grid
    t = DEFAULT_TEMPERATURE if options.temperature is None else options.temperature
    s_img = class_scores(outputs[IMAGE_EMBEDDING], t_normal, t_anomalous, t)  # [N]
    zs_maps = [
        aggregate_windows(class_scores(outputs[window_output_name(k)], t_normal, t_anomalous, t),
                          grid, k, stride, options.mean)
        for k in used
    ]
    z = zero_shot_map(s_img, zs_maps, options.use_image_scale, options.mean)  # [N, h, w]
    if memory_patches is None or not options.use_memory:
        return Scores(image_score=s_img, token_map=z, zero_shot_score=s_img)
    visual = [association(outputs[PATCH_TOKENS], memory_patches).reshape(n, h, w)]
    for k in used:
        a = association(outputs[window_output_name(k)], memory_windows[k])  # [N, W_k]
        visual.append(aggregate_windows(a, grid, k, stride, options.mean))
    v = np.mean(np.stack(visual), axis=0)  # V = mean(A_patch, M_2, M_3, ...)
    final = (z + v) / 2.0
    inside = v if token_mask is None else np.where(token_mask, v, 0.0)
    image = (s_img + inside.reshape(n, -1).max(-1)) / 2.0
    return Scores(image_score=image.astype(np.float32), token_map=final.astype(np.float32), zero_shot_score=s_img)
