"""Shared fixtures: tiny random-weight open_clip configs and session-cached bundles built from them."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open together while chosen, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def wait_for(condition, timeout=60.0, what="condition"):
    """Poll ``condition`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def terminate(proc, wait_s: float = 60.0) -> int:
    """SIGTERM a subprocess still running, SIGKILL it after ``wait_s``; its return code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_http_ready(proc, client, log_text, timeout_s, stop):
    """Poll ``GET /readyz`` of a started ``serve --http`` until 200; a process that exits, or ``timeout_s``
    without ready (``stop()`` is called first), fails with the end of its log (``log_text()``)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log_text()[-3000:]}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop()
            raise AssertionError(f"serve not ready in {timeout_s} s:\n{log_text()[-3000:]}")
        time.sleep(0.2)


REPO = Path(__file__).resolve().parents[1]


class Serve:
    """One ``winclip-edge serve`` process; its stderr goes to a file the test can read."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None):
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "winclip_edge.cli", "serve", *args], cwd=tmp, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"serve did not exit within {timeout} s:\n{self.text()[-3000:]}") from None

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)


@pytest.fixture(autouse=True)
def _line_logger_as_it_was():
    """``serve`` run in-process (``main(["serve", ...])``) gives the line's logger a handler on the test's stderr and
    stops it propagating, as a process wants; put it back so that later tests' ``caplog`` sees the records."""
    logger = logging.getLogger("winclip_edge.line")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for a hub in tests
for _name in ("WINCLIP_ENGINE_DIR", "WINCLIP_ENGINE_CACHE_KEEP", "WINCLIP_ENGINE_CACHE_MAX_MIB"):
    os.environ.pop(_name, None)  # tests see the default engine folder and cache bound

_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
# Geometries: 240 px / patch 16 -> 15x15 (the default model's grid), 224 / 32 -> 7x7, and a non-square 6x8.
TINY_CONFIGS = {
    "tiny240": {"embed_dim": 32, "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32}, "text_cfg": _TEXT},
    "tiny224p32": {"embed_dim": 24, "vision_cfg": {"image_size": 224, "layers": 3, "width": 48, "patch_size": 32, "head_width": 16}, "text_cfg": _TEXT},
    "tinyrect": {"embed_dim": 16, "vision_cfg": {"image_size": [96, 128], "layers": 2, "width": 32, "patch_size": 16, "head_width": 16}, "text_cfg": _TEXT},
}


@pytest.fixture(scope="session")
def config_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("configs")
    for name, cfg in TINY_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory, config_dir):
    """``make_bundle(config="tiny240", products=("widget",), **ExportOptions)`` -> bundle path, cached per session."""
    from winclip_edge.export.onnx_export import ExportOptions, export_bundle

    cache: dict = {}

    def make(config: str = "tiny240", products=("widget",), **options) -> Path:
        key = (config, tuple(products), tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("bundle") / config
            export_bundle(out, ExportOptions(model=str(config_dir / f"{config}.json"), pretrained="none",
                                             products=tuple(products), **options), show_progress=False)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_bundle(make_bundle) -> Path:
    """The default tiny bundle: 15x15 grid, scales (2, 3), product 'widget'. Treat it as read-only."""
    return make_bundle()


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private, writable copy of the tiny bundle."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def textured_part(size=(240, 240), seed=0, defect: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A synthetic 'part': smooth random texture (same statistics for every seed), optional bright square defect
    (top, left, height, width) in pixels. RGB uint8."""
    rng = np.random.default_rng(seed)
    import cv2

    base = rng.normal(128, 40, (size[0] // 8, size[1] // 8, 3)).clip(0, 255).astype(np.uint8)
    image = cv2.resize(base, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    image = cv2.add(image, rng.integers(0, 12, image.shape, dtype=np.uint8))
    if defect is not None:
        t, l, h, w = defect
        yy, xx = np.mgrid[0:h, 0:w]
        image[t:t + h, l:l + w] = np.stack([(yy * 37 + xx * 91) % 256, (xx * 53) % 256, (yy * 71) % 256], -1).astype(np.uint8)
    return image
