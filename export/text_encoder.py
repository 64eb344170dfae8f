"""The text side of a bundle: the text tower as ``text.onnx`` and open_clip's tokenizer as ``tokenizer.json``.

The graph is verified like the visual one: ONNX Runtime (CPU) and torch encode the same prompts, and a graph
that differs by more than the tolerance is refused and not left behind. The tokenizer file is built from the
loaded open_clip tokenizer's own vocabulary and merges, and checked against it on the verification prompts.
Both files are written before the manifest that lists them (atomically), so a failure leaves the bundle as it was.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from winclip_edge.bundle import MANIFEST, Bundle
from winclip_edge.errors import WinclipError
from winclip_edge.fileio import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_file
from winclip_edge.prompts import PromptSpec, build_prompts
from winclip_edge.text_encoder import TEXT_INPUT, TEXT_ONNX, TEXT_OUTPUT, TextEncoder
from winclip_edge.tokenizer import END_OF_TEXT, START_OF_TEXT, TOKENIZER_JSON

from .models import LoadedModel

TEXT_TOLERANCE = 1e-4  # max abs difference ONNX Runtime vs torch (unit vectors), as for the visual graph
EXPORT_BATCH = 2  # dummy batch for tracing (the batch axis is dynamic)
# Verification texts: a product's prompts (a batch size other than the trace's) and one longer than the context.
VERIFY_SPEC = PromptSpec(object_name="metal nut", extra_normal_states=("{o} 👍 “clean”, Café № 5",))
LONG_TEXT = "a photo of a scratched, dented and discoloured widget " * 12
TMP_PREFIX = ".text-encoder-"  # the folder inside the bundle where add_text_encoder makes its files


class TextExportError(WinclipError):
    """The text tower or its tokenizer cannot be exported faithfully."""


class TextTower(torch.nn.Module):
    """Token ids ``int64 [N, L]`` -> L2-normalised text embeddings ``float32 [N, D]`` (open_clip's encode_text)."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)


def _log(message: str) -> None:
    print(f"[text-encoder] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- tokenizer file
def _split_pattern(specials: list[str]) -> str:
    """open_clip's pre-tokenizer regex (its SimpleTokenizer.pat), case-insensitive as open_clip compiles it."""
    return "(?i)" + "|".join(specials) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def tokenizer_json(tokenizer) -> str:
    """A HuggingFace ``tokenizers`` file equal to an open_clip ``SimpleTokenizer`` on cleaned text."""
    from open_clip.tokenizer import SimpleTokenizer

    if not isinstance(tokenizer, SimpleTokenizer):
        raise TextExportError(f"the model's tokenizer is {type(tokenizer).__name__}; only open_clip's CLIP BPE "
                              "tokenizer (SimpleTokenizer) can be put in a bundle")
    if tokenizer.reduction_fn is not None or getattr(tokenizer.clean_fn, "__name__", "") != "_clean_lower":
        raise TextExportError("the model's tokenizer uses a clean-up or reduction other than open_clip's default "
                              "('lower', truncation); it cannot be put in a bundle")
    specials = [START_OF_TEXT, END_OF_TEXT]
    ids = [tokenizer.encoder[s] for s in specials]
    if ids != [tokenizer.sot_token_id, tokenizer.eot_token_id]:
        raise TextExportError(f"unexpected control tokens {tokenizer.all_special_ids} in the model's tokenizer")
    length = int(tokenizer.context_length)
    special = [{"SpecialToken": {"id": s, "type_id": 0}} for s in specials]
    sequence = [{"Sequence": {"id": "A", "type_id": 0}}]
    config = {
        "version": "1.0",
        # open_clip truncates [SOT] + tokens + [EOT] to the context length and puts EOT back last: the same as
        # truncating the tokens to length - 2 before the post-processor adds the two.
        "truncation": {"direction": "Right", "max_length": length, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": length}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                    "pad_type_id": 0, "pad_token": tokenizer.decoder[0]},
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": True, "special": True} for s, i in zip(specials, ids)],
        "normalizer": None,  # the clean-up is open_clip's own, run by winclip_edge/tokenizer.py (ftfy)
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _split_pattern(specials)}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": {"type": "TemplateProcessing", "single": special[:1] + sequence + special[1:],
                           "pair": special[:1] + sequence + [{"Sequence": {"id": "B", "type_id": 0}}] + special[1:],
                           "special_tokens": {s: {"id": s, "ids": [i], "tokens": [s]} for s, i in zip(specials, ids)}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": "</w>", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": tokenizer.encoder,
                  "merges": [list(pair) for pair in sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)]},
    }
    return json.dumps(config, ensure_ascii=False)


# ---------------------------------------------------------------- graph
def export_text_onnx(tower: TextTower, path: Path, sample: np.ndarray, opset: int) -> None:
    """Trace on ``sample`` token ids (real ones: the pooling looks for the end token)."""
    dummy = torch.from_numpy(sample[:EXPORT_BATCH])
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX symbolic
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
            torch.onnx.export(tower, (dummy,), str(path), dynamo=False, input_names=[TEXT_INPUT],
                              output_names=[TEXT_OUTPUT], dynamic_axes={TEXT_INPUT: {0: "batch"}, TEXT_OUTPUT: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def verification_texts() -> list[str]:
    normal, anomalous = build_prompts(VERIFY_SPEC)
    return normal[::5] + anomalous[::7] + [LONG_TEXT]


def verify_text_onnx(tower: TextTower, path: Path, tokens: np.ndarray) -> float:
    """Max abs difference between ONNX Runtime (CPU) and torch on the same token ids."""
    import onnxruntime as ort

    with torch.no_grad():
        expected = tower(torch.from_numpy(tokens)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run([TEXT_OUTPUT], {TEXT_INPUT: tokens})
    return float(np.abs(actual - expected).max())


# ---------------------------------------------------------------- into a bundle
def write_text_encoder(root: Path, loaded: LoadedModel, opset: int, tolerance: float = TEXT_TOLERANCE) -> dict:
    """Write ``text.onnx`` and ``tokenizer.json`` into the bundle folder ``root`` (verified) and return the
    manifest's ``text_encoder`` section; the caller writes the manifest."""
    import ftfy
    import onnx
    import onnxruntime
    import open_clip
    import tokenizers

    from winclip_edge.tokenizer import ClipTokenizer

    tokenizer = loaded.tokenizer
    length = int(tokenizer.context_length)
    texts = verification_texts()
    reference = tokenizer(texts).numpy()
    tokenizer_path = root / TOKENIZER_JSON
    atomic_write_bytes(tokenizer_path, tokenizer_json(tokenizer).encode())
    ours = ClipTokenizer(tokenizer_path, length)(texts)
    if not np.array_equal(ours, reference):
        bad = [t for t, a, b in zip(texts, ours, reference) if not np.array_equal(a, b)]
        raise TextExportError(f"the tokenizer file disagrees with open_clip on {len(bad)} text(s), e.g. {bad[0]!r}")
    onnx_path = root / TEXT_ONNX
    tower = TextTower(loaded.model).eval()
    _log("exporting the text tower ...")
    export_text_onnx(tower, onnx_path, reference, opset)
    diff = verify_text_onnx(tower, onnx_path, reference)
    _log(f"text.onnx ({onnx_path.stat().st_size / 2**20:.0f} MiB): max abs difference ONNX Runtime vs torch {diff:.2e} "
         f"on {len(texts)} prompts")
    if not diff <= tolerance:
        raise TextExportError(f"text.onnx differs from torch by {diff:.3e} > tolerance {tolerance:.1e}")
    return {
        "onnx": TEXT_ONNX, "tokenizer": TOKENIZER_JSON, "context_length": length, "weights_id": loaded.weights["id"],
        "files": {TEXT_ONNX: sha256_file(onnx_path), TOKENIZER_JSON: sha256_file(tokenizer_path)},
        "input": TEXT_INPUT, "output": TEXT_OUTPUT, "opset": opset,
        "clean": "open_clip 'lower': ftfy.fix_text, html.unescape twice, whitespace collapsed, lower case",
        "verification": {"max_abs_diff": diff, "tolerance": tolerance, "texts": len(texts)},
        "versions": {"open_clip": open_clip.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__,
                     "ftfy": ftfy.__version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def add_text_encoder(bundle: Bundle, loaded: LoadedModel, opset: int | None = None, force: bool = False,
                     tolerance: float = TEXT_TOLERANCE) -> Bundle:
    """Put the text encoder of ``loaded`` (the bundle's own weights, else refused) into an existing bundle.

    The files are made and verified in a temporary folder inside the bundle, moved into place, and only then
    listed in the manifest: a failure leaves the bundle as it was (a kill between the moves and the manifest
    leaves files the manifest's sha256 refuses, never a silently different encoder)."""
    if loaded.weights["id"] != bundle.manifest.weights_id:
        raise TextExportError("the loaded model's weights differ from the bundle's; cannot add its text encoder")
    if bundle.manifest.text_encoder and not force:
        raise TextExportError(f"{bundle.root} already has a text encoder; pass --force to export it again")
    for stale in bundle.root.glob(f"{TMP_PREFIX}*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=bundle.root) as tmp:
        section = write_text_encoder(Path(tmp), loaded, opset or bundle.manifest.opset, tolerance)
        for name in section["files"]:
            os.replace(Path(tmp) / name, bundle.root / name)
    fsync_dir(bundle.root)
    atomic_write_json(bundle.root / MANIFEST, {**bundle.manifest.to_dict(), "text_encoder": section})
    result = Bundle(bundle.root)
    TextEncoder(result).close()  # the runtime loads what was written (checksums, graph contract)
    return result
