"""Which bundle a Triton model was made from: the manifest ids written into the model config's ``parameters``.

A client holds text prototypes and few-shot memories computed with one set of weights and one graph contract;
embeddings from any other model would score silently wrong, so the client refuses a server model whose ids differ.
Pure Python (no tritonclient), shared by the repository writer and the ``triton`` engine.
"""
from __future__ import annotations

import hashlib
import json

from ..bundle import VISUAL_ONNX, Bundle
from ..contract import INPUT_DTYPE, INPUT_NAME, ContractError

WEIGHTS_ID = "winclip_weights_id"
CONTRACT = "winclip_contract"
ONNX_SHA256 = "winclip_onnx_sha256"
MODEL = "winclip_model"


def contract_id(bundle: Bundle) -> str:
    """``<bundle format version>:<sha256 prefix of the contract's names, dtypes and per-item shapes + patch layer>``."""
    m = bundle.manifest
    body = {"input": [INPUT_NAME, INPUT_DTYPE, list(m.spec.input_shape[1:])],
            "outputs": {name: list(shape[1:]) for name, shape in m.spec.output_shapes().items()},
            "patch_layer": m.patch_layer, "stride": m.stride}
    return f"{m.format_version}:{hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]}"


def model_parameters(bundle: Bundle) -> dict[str, str]:
    """The ``parameters`` of a Triton model made from ``bundle`` (string values, as Triton stores them)."""
    return {WEIGHTS_ID: bundle.manifest.weights_id, CONTRACT: contract_id(bundle),
            ONNX_SHA256: bundle.manifest.files[VISUAL_ONNX], MODEL: bundle.manifest.model}


def check_parameters(bundle: Bundle, parameters: dict[str, str], where: str) -> None:
    """Refuse (one line) a server model made from other weights or another contract than ``bundle``."""
    expected = model_parameters(bundle)
    if WEIGHTS_ID not in parameters:
        raise ContractError(f"{where} has no '{WEIGHTS_ID}' parameter: not made by `winclip-edge triton export`; "
                            "serve the repository export-triton writes for this bundle")
    for key, what in ((WEIGHTS_ID, "weights"), (CONTRACT, "graph contract")):
        got = parameters.get(key, "")
        if got != expected[key]:
            raise ContractError(f"{where} was made from other {what} ({key} {got[:16]}, this bundle's is "
                                f"{expected[key][:16]}); serve this bundle (winclip-edge triton export --bundle "
                                f"{bundle.root}) or point --triton-model at the model made from it")
