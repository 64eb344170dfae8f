"""The graph contract: the one place that says what the exported visual graph takes and returns.

The export builds ``input_names`` / ``output_names`` / ``dynamic_axes`` from here, and every
runtime engine checks a loaded graph against it (docs/architecture.md, "The graph contract").

Input
    ``images``: uint8 ``[N, H, W, 3]``, RGB frames already resized to the model input
    (``H x W`` = the model's image size). Normalisation (``/255``, mean, std) happens inside the
    graph, so every backend sees the same bytes.
Outputs (float32, every embedding L2-normalised, batch axis dynamic)
    ``image_embedding``          ``[N, D]``         projected CLS embedding of the whole image
    ``window_embeddings_k<k>``   ``[N, W_k, D]``    one per window scale, projected CLS per window
    ``patch_tokens``             ``[N, h*w, C]``    patch tokens of the chosen layer (width C)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import WinclipError
from .windows import window_count

INPUT_NAME = "images"
INPUT_DTYPE = "uint8"
IMAGE_EMBEDDING = "image_embedding"
PATCH_TOKENS = "patch_tokens"
BATCH_AXIS = "batch"
PATCH_LAYERS = ("penultimate", "last")


def window_output_name(k: int) -> str:
    return f"window_embeddings_k{k}"


def output_names(scales: Sequence[int]) -> list[str]:
    return [IMAGE_EMBEDDING, *(window_output_name(k) for k in scales), PATCH_TOKENS]


@dataclass(frozen=True)
class GraphSpec:
    """Shapes of the contract for one model and one window configuration."""

    image_size: tuple[int, int]  # (H, W) pixels of the model input
    grid: tuple[int, int]  # (h, w) patch tokens
    scales: tuple[int, ...]  # window sizes in tokens, e.g. (2, 3)
    stride: int  # window stride in tokens
    embed_dim: int  # D: joint image-text embedding
    width: int  # C: transformer width (patch token dim)

    @property
    def input_shape(self) -> tuple[str | int, ...]:
        return (BATCH_AXIS, self.image_size[0], self.image_size[1], 3)

    def output_shapes(self) -> dict[str, tuple[str | int, ...]]:
        shapes: dict[str, tuple[str | int, ...]] = {IMAGE_EMBEDDING: (BATCH_AXIS, self.embed_dim)}
        for k in self.scales:
            shapes[window_output_name(k)] = (BATCH_AXIS, window_count(self.grid, k, self.stride), self.embed_dim)
        shapes[PATCH_TOKENS] = (BATCH_AXIS, self.grid[0] * self.grid[1], self.width)
        return shapes

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: BATCH_AXIS} for name in [INPUT_NAME, *self.output_shapes()]}


class ContractError(WinclipError, ValueError):
    """A graph or engine does not match the contract of its bundle."""


def check_io(spec: GraphSpec, inputs: dict[str, tuple], outputs: dict[str, tuple], where: str) -> None:
    """Compare the (name -> shape) tables of a loaded graph with the contract; symbolic dims are skipped."""
    expected_in = {INPUT_NAME: spec.input_shape}
    for kind, expected, actual in (("input", expected_in, inputs), ("output", spec.output_shapes(), outputs)):
        missing = sorted(set(expected) - set(actual))
        if missing:
            raise ContractError(
                f"{where}: {kind}(s) {missing} missing (has {sorted(actual)}); "
                "the graph was exported for another configuration: re-export the bundle"
            )
        for name, shape in expected.items():
            got = tuple(actual[name])
            same = len(got) == len(shape) and all(
                isinstance(e, str) or not isinstance(g, int) or g < 0 or e == g for e, g in zip(shape, got)
            )
            if not same:
                raise ContractError(f"{where}: {kind} '{name}' has shape {got}, the bundle expects {shape}")
