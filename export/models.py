"""Loading an open_clip model from a name or a config JSON, with pretrained, local or random weights.

The weights source is recorded in the bundle and identified by ``weights_id`` (sha256 over every
parameter), so text prototypes and few-shot memories made with other weights are refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from winclip_edge.errors import WinclipError
from winclip_edge.fileio import sha256_file

DEFAULT_MODEL = "ViT-B-16-plus-240"
DEFAULT_PRETRAINED = "laion400m_e31"
NO_WEIGHTS = "none"
# Model configs shipped with the package, named ``winclip-<file stem>`` (the name a config JSON gets anyway):
# ``winclip-tiny`` has the default model's 240 px input and 15x15 grid but 2 narrow layers, for trying the faces
# (serve, the HTTP API, the review page) in seconds with random weights (README "Try it in a minute").
SHIPPED_CONFIGS = Path(__file__).with_name("configs")
SHIPPED_PREFIX = "winclip-"


class ModelNotFoundError(WinclipError, ValueError):
    """Not an open_clip model name, nor an open_clip model-config JSON."""


class WeightsUnavailableError(WinclipError, RuntimeError):
    """Pretrained weights cannot be obtained (offline, unknown tag, missing file)."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # the open_clip CLIP model, eval mode, fp32, CPU
    tokenizer: Any  # open_clip tokenizer for its text tower
    model_name: str  # open_clip name, or the config file's stem
    model_config: dict | None  # the config, when it came from a JSON file (recorded in the manifest)
    weights: dict = field(default_factory=dict)  # manifest "weights": source, tag/path/sha256/seed, id
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


def weights_id(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_hub_logs():
    """The hub client logs every retry of a failed download; the error raised afterwards says it once."""
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _register_config(name: str, config: dict) -> None:
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


def shipped_models() -> list[str]:
    return sorted(SHIPPED_PREFIX + p.stem for p in SHIPPED_CONFIGS.glob("*.json"))


def resolve_model(model: str) -> tuple[str, dict | None]:
    """An open_clip model name, a shipped config's name (``winclip-tiny``), or a path to an open_clip model-config
    JSON -> (name, config or None)."""
    import open_clip

    if model in shipped_models():
        model = str(SHIPPED_CONFIGS / f"{model[len(SHIPPED_PREFIX):]}.json")
    if model.endswith(".json") or os.path.sep in model:
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        config = json.loads(path.read_text())
        if "vision_cfg" not in config or "embed_dim" not in config:
            raise ModelNotFoundError(f"{path} is not an open_clip model config (needs 'embed_dim' and 'vision_cfg')")
        name = f"winclip-{path.stem}"
        _register_config(name, config)
        return name, config
    if model not in open_clip.list_models():
        raise ModelNotFoundError(f"unknown open_clip model {model!r}; pass a name from open_clip.list_models(), "
                                 f"{' or '.join(shipped_models())} (shipped, tiny), or a config JSON path")
    return model, None


def load_model(
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    seed: int = 0,
    model_config: dict | None = None,
) -> LoadedModel:
    """Create the model. ``pretrained``: an open_clip tag, a local checkpoint path, or ``none`` (random, seeded).

    ``model_config`` re-creates a model recorded in a bundle manifest (``model`` is then its name).
    """
    import open_clip

    if model_config is not None:
        _register_config(model, model_config)
        name, config = model, model_config
    else:
        name, config = resolve_model(model)

    if pretrained == NO_WEIGHTS:
        torch.manual_seed(seed)
        with _quiet_hub_logs():  # open_clip warns that no weights were loaded: that is the point here
            clip = open_clip.create_model(name, pretrained=None)
        weights = {"source": "none", "seed": seed}
    elif Path(pretrained).is_file():
        path = Path(pretrained).resolve()
        clip = open_clip.create_model(name, pretrained=str(path))
        weights = {"source": "checkpoint", "path": str(path), "sha256": sha256_file(path)}
    else:
        tags = open_clip.list_pretrained_tags_by_model(name) if config is None else []
        if pretrained not in tags:
            raise WeightsUnavailableError(
                f"--pretrained {pretrained!r} is neither a pretrained tag of {name} (known: {tags or 'none'}) "
                "nor an existing checkpoint file; pass a tag, --pretrained PATH to a local open_clip checkpoint, "
                "or --pretrained none for random weights (tests and timing only)"
            )
        print(f"[export] fetching pretrained weights {name}/{pretrained} (from the local hub cache, or downloaded; "
              "offline, this fails after the hub client's retries, about a minute: set HF_HUB_OFFLINE=1 to fail at once)",
              file=sys.stderr, flush=True)
        try:
            with _quiet_hub_logs():
                clip = open_clip.create_model(name, pretrained=pretrained)
        except Exception as err:  # hub/network errors come in many types; all mean the same to a user
            raise WeightsUnavailableError(
                f"could not obtain pretrained weights {name}/{pretrained} ({type(err).__name__}: {str(err)[:200]}). "
                "Offline? Download the open_clip checkpoint on a connected machine and pass --pretrained PATH "
                "(or --pretrained none for random weights, tests and timing only)"
            ) from None
        weights = {"source": "pretrained", "tag": pretrained}
    clip.eval()
    weights["id"] = weights_id(clip)
    cfg = open_clip.get_model_preprocess_cfg(clip)
    return LoadedModel(
        model=clip,
        tokenizer=open_clip.get_tokenizer(name),
        model_name=name,
        model_config=config,
        weights=weights,
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
    )


def load_from_manifest(manifest: Any) -> LoadedModel:
    """Re-create the exact model of a bundle (for add-product and the torch backend); checks the weights id."""
    w = manifest.weights
    if w["source"] == "none":
        pretrained = NO_WEIGHTS
    elif w["source"] == "checkpoint":
        pretrained = w["path"]
        if not Path(pretrained).is_file():
            raise WeightsUnavailableError(
                f"the bundle was exported from the checkpoint {pretrained}, which is not on this machine; "
                "copy it there (same sha256) to add products"
            )
    else:
        pretrained = w["tag"]
    loaded = load_model(manifest.model, pretrained, seed=w.get("seed", 0), model_config=manifest.model_config)
    if loaded.weights["id"] != w["id"]:
        raise WeightsUnavailableError(
            f"the re-created weights (id {loaded.weights['id'][:12]}) differ from the bundle's (id {w['id'][:12]}); "
            "another open_clip/torch version or checkpoint? Re-export the bundle on this machine"
        )
    return loaded
