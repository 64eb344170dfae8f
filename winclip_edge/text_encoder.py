"""Text prototypes on the runtime: the bundle's ``text.onnx`` + ``tokenizer.json``, no torch.

Same prompts and the same maths as the export stage (winclip_edge/export/text.py, docs/method.md): every
prompt embedded and L2-normalised (inside the graph), averaged per state, L2-normalised again. The two files
are listed with their sha256 in the manifest's ``text_encoder`` section and checked when the encoder is
loaded (not on every bundle load: inspecting never reads them). models/README.md documents the files.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .bundle import Bundle, BundleError
from .fileio import sha256_file
from .names import check_new_name
from .products import TextPrototypes, save_text
from .prompts import PromptSpec, build_prompts
from .tokenizer import ClipTokenizer

TEXT_ONNX = "text.onnx"
TEXT_INPUT = "tokens"  # int64 [N, context_length]
TEXT_OUTPUT = "text_embeddings"  # float32 [N, D], L2-normalised
TEXT_BATCH = 64  # prompts per graph call (as the export stage)
# ONNX Runtime 1.32's NCHWc layout pass crashes the process (segfault) while loading the fp16 text graph of
# ViT-B-16-plus-240 on the CPU; it only rewrites convolutions, of which the text graph has none.
DISABLED_OPTIMIZERS = ("NchwcTransformer",)


def _remedy(bundle: Bundle) -> str:
    return f"copy the bundle again or re-create it with `winclip-edge add-text-encoder --bundle {bundle.root} --force`"


def has_text_encoder(bundle: Bundle) -> bool:
    return bool(bundle.manifest.text_encoder)


def verified_files(bundle: Bundle) -> tuple[Path, Path, int]:
    """(text.onnx, tokenizer.json, context length) of the bundle, each file checked against the manifest's sha256."""
    section = bundle.manifest.text_encoder
    if not section:
        raise BundleError(f"bundle {bundle.root} has no text encoder; add one on the workstation with "
                          f"`winclip-edge add-text-encoder --bundle {bundle.root}` (needs the export extra)")
    try:
        files, onnx_name, tokenizer_name = section["files"], section["onnx"], section["tokenizer"]
        length = int(section["context_length"])
        expected = [files[onnx_name], files[tokenizer_name]]
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"the manifest's text_encoder section is malformed ({err!r}); {_remedy(bundle)}") from None
    if section.get("weights_id") != bundle.manifest.weights_id:
        raise BundleError(f"the bundle's text encoder was made with other model weights; {_remedy(bundle)}")
    paths = [bundle.root / onnx_name, bundle.root / tokenizer_name]
    for path, sha in zip(paths, expected):
        if not path.is_file():
            raise BundleError(f"{path} is missing; {_remedy(bundle)}")
        if sha256_file(path) != sha:
            raise BundleError(f"{path} fails its sha256 check (damaged or changed after export); {_remedy(bundle)}")
    return paths[0], paths[1], length


class TextEncoder:
    """Prompts -> L2-normalised text embeddings ``float32 [P, D]`` with ONNX Runtime on the CPU."""

    def __init__(self, bundle: Bundle, precision: str = "fp32", model_path: str | Path | None = None, threads: int = 0):
        """``precision``: fp32 (text.onnx) or a variant made by ``engine quantize --graph text``; ``model_path``: a graph
        file to check against the contract instead (used when making a variant)."""
        import onnxruntime as ort

        from .engines.onnx_variants import load_variant

        onnx_path, tokenizer_path, length = verified_files(bundle)
        self.tokenizer = ClipTokenizer(tokenizer_path, length)
        self.precision = precision
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        path = Path(model_path or load_variant(bundle, precision, "text"))
        try:
            self.source = path.relative_to(bundle.root).as_posix()  # recorded in the product's text.npz
        except ValueError:
            self.source = str(path)
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                                 disabled_optimizers=list(DISABLED_OPTIMIZERS))
        except Exception as err:  # ORT raises its own exception types for unreadable graphs
            raise BundleError(f"{path} cannot be loaded by ONNX Runtime ({str(err)[:200]}); {_remedy(bundle)}") from None
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        dim = bundle.manifest.embed_dim
        if list(inputs) != [TEXT_INPUT] or outputs != [TEXT_OUTPUT] or inputs[TEXT_INPUT].shape[1] != length \
                or self._session.get_outputs()[0].shape[1] != dim:
            raise BundleError(f"{path} does not have the text graph contract ({TEXT_INPUT} int64 [N, {length}] -> "
                              f"{TEXT_OUTPUT} float32 [N, {dim}]); {_remedy(bundle)}")

    def encode(self, prompts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        out = []
        for start in range(0, len(prompts), TEXT_BATCH):
            chunk = list(prompts[start:start + TEXT_BATCH])
            (embeddings,) = self._session.run([TEXT_OUTPUT], {TEXT_INPUT: self.tokenizer(chunk)})
            out.append(embeddings.astype(np.float32))
            if progress:
                progress(len(chunk))
        return np.concatenate(out)

    def close(self) -> None:
        self._session = None


def prototype(embeddings: np.ndarray) -> np.ndarray:
    """Normalise-average-normalise: ``[P, D]`` (rows already L2-normalised) -> ``[D]`` (docs/method.md)."""
    mean = embeddings.astype(np.float64).mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


def text_prototypes(encoder: TextEncoder, spec: PromptSpec, show_progress: bool = True) -> TextPrototypes:
    normal, anomalous = build_prompts(spec)
    from tqdm import tqdm

    with tqdm(total=len(normal) + len(anomalous), desc=f"encoding prompts ({spec.object_name})", unit="prompt",
              disable=not show_progress) as bar:
        t_n = prototype(encoder.encode(normal, bar.update))
        t_a = prototype(encoder.encode(anomalous, bar.update))
    return TextPrototypes(t_normal=t_n, t_anomalous=t_a, normal_prompts=tuple(normal),
                          anomalous_prompts=tuple(anomalous), prompt_spec=asdict(spec),
                          encoder={"source": encoder.source, "precision": encoder.precision})


class ProductExistsError(BundleError):
    """The product is in the bundle already and replacing it was not asked for."""


def add_product(bundle: Bundle, product: str, spec: PromptSpec, precision: str = "fp32", force: bool = False,
                show_progress: bool = False) -> TextPrototypes:
    """Encode ``spec``'s prompts with the bundle's text encoder and write ``products/<product>/text.npz``
    (atomically, self-verifying); the torch-free twin of the export stage's add_product."""
    check_new_name(product, bundle.products())  # a bad name fails before anything is loaded
    if product in bundle.products() and not force:
        raise ProductExistsError(f"product {product!r} is already in {bundle.root}; pass --force to re-encode it")
    build_prompts(spec)  # bad states / templates too
    text = text_prototypes(TextEncoder(bundle, precision), spec, show_progress)
    save_text(bundle, product, text)
    return text
