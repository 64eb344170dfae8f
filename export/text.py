"""CPE text prototypes (docs/method.md §2): encode every prompt, L2-normalise each, average per group,
L2-normalise again (CLIP's own prompt-ensembling practice; anomalib averages raw embeddings)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from winclip_edge.products import TextPrototypes
from winclip_edge.prompts import PromptSpec, build_prompts

TEXT_BATCH = 64  # prompts per text-tower call


@torch.no_grad()
def encode_prompts(model: torch.nn.Module, tokenizer: Any, prompts: list[str],
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``[P, D]`` L2-normalised text embeddings."""
    out = []
    for start in range(0, len(prompts), TEXT_BATCH):
        chunk = prompts[start:start + TEXT_BATCH]
        out.append(F.normalize(model.encode_text(tokenizer(chunk)).float(), dim=-1))
        if progress:
            progress(len(chunk))
    return torch.cat(out)


def prototype(embeddings: torch.Tensor) -> np.ndarray:
    """Normalise-average-normalise: ``[P, D]`` (already normalised rows) -> ``[D]``."""
    return F.normalize(embeddings.mean(0), dim=-1).numpy().astype(np.float32)


def text_prototypes(model: torch.nn.Module, tokenizer: Any, spec: PromptSpec, show_progress: bool = True) -> TextPrototypes:
    normal, anomalous = build_prompts(spec)
    from tqdm import tqdm

    with tqdm(total=len(normal) + len(anomalous), desc=f"encoding prompts ({spec.object_name})", unit="prompt",
              disable=not show_progress) as bar:
        t_n = prototype(encode_prompts(model, tokenizer, normal, bar.update))
        t_a = prototype(encode_prompts(model, tokenizer, anomalous, bar.update))
    return TextPrototypes(t_normal=t_n, t_anomalous=t_a, normal_prompts=tuple(normal),
                          anomalous_prompts=tuple(anomalous), prompt_spec=asdict(spec),
                          encoder={"source": "torch", "precision": "fp32"})
