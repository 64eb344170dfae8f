"""How close a faster engine's answers are to the fp32 reference on the same images, and when that is close
enough: a decision threshold calibrated in fp32 stays meaningful (image scores and token maps, both in [0, 1],
within the tolerances below on every image). Used by ``bench`` and by the variant builders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..scoring import Scores

FAITHFUL_SCORE_MAX_ABS = 5e-3
FAITHFUL_MAP_MAX_ABS = 2e-2


@dataclass(frozen=True)
class Fidelity:
    """A variant against its fp32 reference on the same images (max / mean absolute differences)."""

    images: int
    score_max_abs: float  # final image score, [0, 1]
    score_mean_abs: float
    map_max_abs: float  # final token map, [0, 1]
    map_mean_abs: float
    embedding_max_abs: dict  # graph output -> max abs difference (unit vectors)

    @property
    def faithful(self) -> bool:
        return self.score_max_abs <= FAITHFUL_SCORE_MAX_ABS and self.map_max_abs <= FAITHFUL_MAP_MAX_ABS


def embed_and_score(embed: Callable[[np.ndarray], dict], score: Callable[[dict], Scores], images: np.ndarray,
                    batch: int) -> tuple[dict[str, np.ndarray], Scores]:
    """Outputs and scores of model-size uint8 ``images`` (e.g. ``Inspector.embed`` / ``Inspector.score``)."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch):
        for name, value in embed(images[start:start + batch]).items():
            parts.setdefault(name, []).append(value)
    outputs = {name: np.concatenate(v) for name, v in parts.items()}
    return outputs, score(outputs)


def fidelity(reference: tuple[dict, Scores], candidate: tuple[dict, Scores]) -> Fidelity:
    """Compare the (outputs, scores) of a variant with those of the fp32 graph on the same images."""
    (ref_out, ref), (cand_out, cand) = reference, candidate
    score = np.abs(cand.image_score.astype(np.float64) - ref.image_score)
    maps = np.abs(cand.token_map.astype(np.float64) - ref.token_map)
    return Fidelity(
        images=int(len(ref.image_score)), score_max_abs=float(score.max()), score_mean_abs=float(score.mean()),
        map_max_abs=float(maps.max()), map_mean_abs=float(maps.mean()),
        embedding_max_abs={name: float(np.abs(cand_out[name] - ref_out[name]).max()) for name in ref_out},
    )
