"""A CPU Triton server for a bundle (``winclip-edge triton serve``): PyTriton's bundled ``tritonserver`` on a
repository written by repository.py with platform ``python`` — same model name, inputs, outputs, batching and
``parameters`` as the repository a GPU server runs, the graph executed by ONNX Runtime in Triton's Python backend.

For a CPU server or a quick trial; production GPU servers run the ``triton export`` repository with Triton's own
onnxruntime/TensorRT backends (docs/triton.md).
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import sysconfig
import tempfile
import threading
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
        self._log_offset = 0
        self._release = threading.Event()  # ends the thread that owns the server process

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
            raise ServerError(f"nvidia-pytriton is not installed ({err}); it requires numpy < 2: install it in an "
                              "environment of its own with pip install 'winclip-edge[triton-server]' (docs/triton.md §4)"
                              ) from None
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
        path = self.log_path
        self._log_offset = path.stat().st_size if path.is_file() else 0  # a --log-file may hold older runs
        failure: list[Exception] = []
        started = threading.Event()

        def own() -> None:
            """Start the server and outlive it: PyTriton sets PR_SET_PDEATHSIG, so tritonserver gets SIGTERM when the
            thread that started it ends. PyTriton waits for the server up to its own timeout; the log tells sooner."""
            try:
                self._triton.run()
            except Exception as err:  # reported by _wait_ready
                failure.append(err)
                return
            started.set()
            self._release.wait()

        starter = threading.Thread(target=own, name="winclip-triton-owner", daemon=True)
        starter.start()
        try:
            self._wait_ready(started, failure)
        except ServerError:
            if not started.is_set() and not failure:  # PyTriton still waits (2 min) for a server that exited
                atexit.unregister(self._triton.stop)
                self._triton = None
            self.stop()
            raise
        return self

    @property
    def log_path(self) -> Path | None:
        if self.config.log_file is not None:
            return Path(self.config.log_file)
        return self._workdir / "tritonserver.log" if self._workdir is not None else None

    def _log_lines(self) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace").splitlines()
        except (OSError, TypeError):
            return []

    def log_tail(self) -> str:
        lines = [line for line in self._log_lines() if line.strip()]
        return lines[-1] if lines else "(none)"

    def load_error(self) -> str | None:
        """The first model-load failure tritonserver logged, as one line (None: none so far)."""
        for line in self._log_lines():
            if line.startswith("E") and "failed to load" in line:
                return line.split('] "', 1)[-1].split("\\n", 1)[0].rstrip('"')
        return None

    def _wait_ready(self, started: threading.Event, failure: list[Exception]) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.urls()["http"])
        deadline = time.monotonic() + self.config.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                problem = self.load_error() or (f"{type(failure[0]).__name__}: {str(failure[0]).strip()[:300]}"
                                                if failure else None)
                if problem:
                    keep = "" if self.config.log_file else "; --log-file FILE keeps the server's log"
                    raise ServerError(f"Triton did not start: {problem}{keep}")
                try:
                    ready = client.is_model_ready(self.model_name)
                except Exception:  # not listening yet
                    ready = False
                if ready and started.is_set():
                    return
                time.sleep(0.2)
        finally:
            client.close()
        raise ServerError(f"model {self.model_name!r} not ready after {self.config.startup_timeout_s:.0f} s; "
                          f"last server log line: {self.log_tail()}")

    def serve_forever(self, stop: threading.Event) -> bool:
        """Block until ``stop`` is set (True) or the server exits by itself (False: see :meth:`log_tail`)."""
        while not stop.wait(0.5):
            if self._triton is None or not self._triton.is_alive():
                return False
        return True

    def stop(self) -> None:
        if self._triton is not None:
            self._triton.stop()
            self._triton = None
        self._release.set()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
