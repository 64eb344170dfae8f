"""Triton backend: the visual graph runs on a Triton Inference Server (KServe v2 protocol, gRPC or HTTP).

Stations keep decoding and scoring; the server batches the ViT calls of many stations. Before the first request the
server's model is checked against the bundle: contract names/dtypes/shapes (model metadata) and the weights id +
contract id that ``triton export`` writes into the model config's ``parameters`` (engines/triton_identity.py) — text
prototypes and memories computed with other weights would score silently wrong. Requests have a timeout; transient
failures are retried with exponential back-off; then the call fails as an :class:`EngineError` (the Inspector turns
it into error results for that batch's images).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..bundle import Bundle
from ..contract import INPUT_NAME, ContractError, check_io, output_names
from .base import EngineError
from .config import EngineConfig
from .registry import BackendRecord, option
from .triton_identity import check_parameters

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
DEFAULT_MODEL = "winclip_visual"
RETRIES = 3  # after the first attempt; a server that stayed down gets one attempt per call until it answers again
BACKOFF_S = 0.25  # first wait; doubles per retry
WIRE_DTYPES = ("FP32", "FP16")  # outputs as served (export-triton --outputs-fp16); returned as float32


@dataclass(frozen=True)
class TritonOptions:
    """What only the Triton client backend takes (EngineConfig.options)."""

    url: Optional[str] = option(None, flag="--triton-url",
                                help="HOST:PORT of the Triton server (default 127.0.0.1:8001 gRPC, :8000 HTTP)")
    protocol: str = option("grpc", flag="--triton-protocol", choices=PROTOCOLS, help="grpc or http (default grpc)")
    model: str = option(DEFAULT_MODEL, flag="--triton-model", help=f"model name (default {DEFAULT_MODEL})")
    timeout: float = option(30.0, flag="--triton-timeout", type=float,
                            help="seconds per request before it is retried (default 30)")


def default_url(protocol: str) -> str:
    return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _timed_out(err: BaseException) -> bool:
    from tritonclient.utils import InferenceServerException

    if isinstance(err, InferenceServerException):
        return "DEADLINE_EXCEEDED" in str(err.status() or "")
    return isinstance(err, TimeoutError) or type(err).__name__ == "Timeout"  # socket / gevent (HTTP client)


def _retryable(err: BaseException) -> bool:
    """Server down or restarting: retry. A request the server refuses (bad input, unknown model) or one that timed
    out (the server is still working on it: a retry would only add load): do not."""
    from tritonclient.utils import InferenceServerException

    if _timed_out(err):
        return False
    if not isinstance(err, InferenceServerException):
        return True  # connection refused / reset
    status = str(err.status() or "")
    return any(s in status for s in ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "502", "503", "504"))


class TritonEngine:
    name = "triton"

    def __init__(self, bundle: Bundle, config: EngineConfig = EngineConfig(backend="triton")):
        if config.precision not in (None, "fp32"):
            raise EngineError("--precision does not apply to --backend triton: the server's model decides "
                              "(export-triton --outputs-fp16, or --platform tensorrt with a plan of that precision)")
        options = config.options if config.options is not None else TritonOptions()
        protocol = options.protocol
        if protocol not in PROTOCOLS:
            raise EngineError(f"--triton-protocol {protocol!r} unknown; choose one of {PROTOCOLS}")
        self.protocol, self.model = protocol, options.model or DEFAULT_MODEL
        self.url = options.url or default_url(protocol)
        self.timeout = float(options.timeout)
        self.output_names = output_names(bundle.spec.scales)
        try:
            if protocol == "grpc":
                import tritonclient.grpc as client_module
            else:
                import tritonclient.http as client_module
        except ImportError as err:
            raise EngineError(f"tritonclient is not installed ({err}); pip install 'winclip-edge[triton]'") from None
        self._api = client_module
        try:
            if protocol == "grpc":
                self.client = client_module.InferenceServerClient(self.url)
            else:
                self.client = client_module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout, network_timeout=self.timeout)
        except Exception as err:
            raise EngineError(f"--triton-url {self.url!r}: {_first_line(err)}") from None
        self.where = f"triton model '{self.model}' at {self.protocol}://{self.url}"
        self._down = False
        self._check(bundle)

    # ------------------------------------------------------------ calls with timeout + retries
    def _call(self, what: str, fn, *args, **kwargs):
        """``fn`` with the timeout, retried with exponential back-off while the failure looks transient. After a
        server stayed down through all retries, later calls try once (no back-off) until one succeeds: the
        remaining inputs of a run become error results at once instead of each waiting out the retries."""
        wait = BACKOFF_S
        retries = 0 if self._down else RETRIES
        for attempt in range(retries + 1):
            try:
                if self.protocol == "grpc":
                    kwargs["client_timeout"] = self.timeout
                result = fn(*args, **kwargs)
                self._down = False
                return result
            except Exception as err:
                if attempt == retries or not _retryable(err):
                    self._down = self._down or _retryable(err)
                    if _timed_out(err):
                        raise EngineError(f"{self.where}: {what} timed out after {self.timeout:g} s (--triton-timeout; "
                                          "a busy server or a slow CPU model needs more)") from None
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise EngineError(f"{self.where}: {what} failed{tries} ({_first_line(err)})") from None
                time.sleep(wait)
                wait *= 2

    def _check(self, bundle: Bundle) -> None:
        """Metadata + config of the served model against the bundle, before any image is sent."""
        json_kw = {"as_json": True} if self.protocol == "grpc" else {}
        try:
            ready = self._call("model ready check", self.client.is_model_ready, self.model)
        except EngineError as err:
            raise EngineError(f"{err}: server not reachable or not answering; start it (winclip-edge triton serve --bundle "
                              f"{bundle.root}, or Triton on the export-triton repository) or fix --triton-url") from None
        if not ready:
            raise EngineError(f"{self.where} is not ready (unknown name: see --triton-model; or not loaded, or "
                              "its loading failed: see the server's log)")
        meta = self._call("model metadata", self.client.get_model_metadata, self.model, **json_kw)
        config = self._call("model config", self.client.get_model_config, self.model, **json_kw)
        config = config.get("config", config)  # gRPC's JSON wraps it
        shapes = {t["name"]: tuple(int(d) for d in t["shape"]) for t in meta.get("inputs", []) + meta.get("outputs", [])}
        dtypes = {t["name"]: t["datatype"] for t in meta.get("inputs", []) + meta.get("outputs", [])}
        check_io(bundle.spec, {n: shapes[n] for n in (t["name"] for t in meta.get("inputs", []))},
                 {n: shapes[n] for n in (t["name"] for t in meta.get("outputs", []))}, where=self.where)
        if dtypes.get(INPUT_NAME) != "UINT8":
            raise ContractError(f"{self.where}: input '{INPUT_NAME}' is {dtypes.get(INPUT_NAME)}, the contract is UINT8")
        wire = {dtypes[n] for n in self.output_names}
        if not wire <= set(WIRE_DTYPES) or len(wire) != 1:
            raise ContractError(f"{self.where}: output dtypes {sorted(wire)}; expected all FP32 or all FP16")
        self.output_dtype = wire.pop()
        self.max_batch = int(config.get("max_batch_size", 0))
        if self.max_batch < 1:
            raise ContractError(f"{self.where}: max_batch_size {self.max_batch}; the batch axis must be Triton's "
                                "(re-create it with winclip-edge triton export)")
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        check_parameters(bundle, parameters, self.where)
        self.device = f"triton {self.protocol}://{self.url} '{self.model}' ({meta.get('platform', '?')}, " \
                      f"{self.output_dtype} outputs)"

    # ------------------------------------------------------------ the engine interface
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        parts = [self._infer(images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}

    def infer_raw(self, images: np.ndarray):
        """One request (``len(images) <= max_batch``) -> tritonclient's result (benchmarks read its size)."""
        api = self._api
        inp = api.InferInput(INPUT_NAME, list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        if self.protocol == "grpc":
            outputs = [api.InferRequestedOutput(n) for n in self.output_names]
        else:
            outputs = [api.InferRequestedOutput(n, binary_data=True) for n in self.output_names]
        return self._call(f"inference of {len(images)} image(s)", self.client.infer, self.model, [inp], outputs=outputs)

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        result = self.infer_raw(images)
        return {n: np.asarray(result.as_numpy(n), dtype=np.float32) for n in self.output_names}

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a client whose server is gone: nothing left to release
            pass


BACKEND = BackendRecord(
    name="triton", create=TritonEngine, precisions=("fp32",), options=TritonOptions,
    packages=(), install="pip install 'winclip-edge[triton]'",
    summary="Triton client: a Triton Inference Server runs the graph (checked against the bundle first)")
