"""A CPU Triton server for a bundle (``winclip-edge triton-serve``): PyTriton's bundled ``tritonserver`` on a
repository written by repository.py with platform ``python`` — same model name, inputs, outputs, batching and
``parameters`` as the repository a GPU server runs, the graph executed by ONNX Runtime in Triton's Python backend.

For a CPU server or a quick trial; production GPU servers run the ``export-triton`` repository with Triton's own
onnxruntime/TensorRT backends (docs/triton.md).
"""
from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..bundle import Bundle
from ..errors import WinclipError
from .repository import RepositoryConfig, write_repository


class ServerError(WinclipError, RuntimeError):
    """The Triton server cannot be started here."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    threads: int = 0  # ONNX Runtime intra-op threads per model instance; 0 = its default
    repository: RepositoryConfig = RepositoryConfig(platform="python", device="cpu")
    startup_timeout_s: float = 120.0
    log_verbose: int = 0  # tritonserver's --log-verbose level
    log_file: Path | None = None  # tritonserver's log (default: inside the server's temporary folder)


def python_library_env(env: dict[str, str]) -> dict[str, str]:
    """Put this interpreter's ``libpython`` first on LD_LIBRARY_PATH. Triton's Python stub links ``libpython3.X.so``;
    from a pyenv/conda/venv-of-a-built-Python interpreter it would otherwise load the system's copy, whose
    ``sys.prefix`` lacks this environment's numpy and onnxruntime."""
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir or not (Path(libdir) / soname).exists():
        return env
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    return {**env, "LD_LIBRARY_PATH": ":".join([libdir, *[p for p in paths if p != libdir]])}


class TritonServer:
    """``with TritonServer(bundle, ServeConfig(...)) as server: ...`` — started and ready, stopped on exit."""

    def __init__(self, bundle: str | os.PathLike | Bundle, config: ServeConfig = ServeConfig()):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.config = replace(config, repository=replace(config.repository, platform="python"))
        self._triton = None
        self._workdir: Path | None = None

    @property
    def model_name(self) -> str:
        return self.config.repository.name

    def urls(self) -> dict[str, str]:
        c = self.config
        return {"http": f"{c.host}:{c.http_port}", "grpc": f"{c.host}:{c.grpc_port}",
                "metrics": f"http://{c.host}:{c.metrics_port}/metrics"}

    def start(self) -> "TritonServer":
        try:
            from pytriton.triton import Triton, TritonConfig
        except ImportError as err:
            raise ServerError(f"nvidia-pytriton is not installed ({err}); pip install 'winclip-edge[triton]'") from None
        c = self.config
        self._workdir = Path(tempfile.mkdtemp(prefix="winclip-triton-"))
        repo = self._workdir / "repository"
        write_repository(self.bundle, repo, c.repository, link_model=True)
        os.environ.update(python_library_env(dict(os.environ)))  # PyTriton hands its environment to tritonserver
        if c.threads:
            os.environ["WINCLIP_TRITON_THREADS"] = str(c.threads)
        logging.getLogger("pytriton").setLevel(logging.INFO if c.log_verbose else logging.WARNING)
        triton_config = TritonConfig(
            model_repository=repo, http_address=c.host, http_port=c.http_port, grpc_address=c.host,
            grpc_port=c.grpc_port, metrics_address=c.host, metrics_port=c.metrics_port, allow_metrics=True,
            allow_gpu_metrics=False, exit_timeout_secs=5, log_verbose=c.log_verbose or None,
            log_file=self.log_path)
        self._triton = Triton(config=triton_config, workspace=self._workdir / "workspace")
        try:
            self._triton.run()
            self._wait_ready()
        except Exception as err:
            log = self.log_tail()
            self.stop()
            raise ServerError(f"Triton did not start ({type(err).__name__}: {str(err).strip().splitlines()[:1]}); "
                              f"last server log line: {log}") from None
        return self

    @property
    def log_path(self) -> Path | None:
        if self.config.log_file is not None:
            return Path(self.config.log_file)
        return self._workdir / "tritonserver.log" if self._workdir is not None else None

    def log_tail(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except (OSError, AttributeError):
            return "(none)"
        return lines[-1] if lines else "(none)"

    def _wait_ready(self) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.urls()["http"])
        deadline = time.monotonic() + self.config.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                try:
                    if client.is_model_ready(self.model_name):
                        return
                except Exception:
                    pass
                time.sleep(0.2)
        finally:
            client.close()
        raise ServerError(f"model {self.model_name!r} not ready after {self.config.startup_timeout_s:.0f} s")

    def serve_forever(self) -> None:
        """Block until the server exits or SIGINT/SIGTERM."""
        import signal

        stop = {"now": False}

        def handler(signum, frame):  # noqa: ARG001 - signal handler signature
            stop["now"] = True

        signal.signal(signal.SIGTERM, handler)
        try:
            while not stop["now"] and self._triton is not None and self._triton.is_alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass

    def stop(self) -> None:
        if self._triton is not None:
            self._triton.stop()
            self._triton = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
