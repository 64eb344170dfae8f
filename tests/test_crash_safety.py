"""Crash safety: SIGKILL at random points of `register`, `calibrate`, `add-product` and `export --force`
(the real CLI, in a subprocess) leaves the previous bundle state or the new complete one -- never a
half-written file under its real name, never a bundle that loads into other answers (docs/reliability.md)."""
from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from conftest import textured_part
from winclip_edge.bundle import Bundle
from winclip_edge.inspector import Inspector
from winclip_edge.products import save_memory

SEED = 20240611  # the kill delays are drawn from this seed
KILLS_FAST = 3  # random kill points per command that starts in ~1 s (register, calibrate)
KILLS_SLOW = 2  # per command that imports torch (add-product, export: ~5 s per run)
KILL_WINDOW = (0.3, 1.1)  # kill delays as fractions of a full run: past the imports, up to just after the end
POLL_S = 0.001  # how often the watcher looks for the command's temporary file
RUN_TIMEOUT_S = 120
PRODUCT = "widget"
PROBES = [textured_part(seed=90), textured_part(seed=91, defect=(60, 80, 40, 40))]  # images each state is scored on

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")


# ---------------------------------------------------------------- running and killing the CLI
def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "winclip_edge.cli", *args, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_to_end(args: list[str]) -> float:
    """Run a command to its end; its wall time (start-up included) bounds the random kill delays."""
    t0 = time.monotonic()
    proc = start(args)
    _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, err.decode()
    return time.monotonic() - t0


def kill_after(args: list[str], delay: float) -> None:
    proc = start(args)
    try:
        proc.wait(timeout=delay)  # finished before the kill point: the new state
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=RUN_TIMEOUT_S)


def kill_when_appears(args: list[str], pattern: str) -> None:
    """Kill as soon as ``pattern`` (a glob: the command's temporary file) exists, i.e. in the middle of a write."""
    proc = start(args)
    while proc.poll() is None and not glob.glob(pattern):
        time.sleep(POLL_S)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=RUN_TIMEOUT_S)


# ---------------------------------------------------------------- what a user would see
def fingerprint(bundle: Path) -> tuple:
    """Load the bundle with every check (Bundle + Inspector) and score fixed images. (Not the files' checksums:
    they cover a creation time, so two complete runs of one command differ there.)"""
    inspector = Inspector(Bundle(bundle), PRODUCT)
    try:
        scores = tuple(r.score for r in inspector.inspect(PROBES))
    finally:
        inspector.close()
    threshold = None if inspector.threshold is None else inspector.threshold.value
    memory = None if inspector.memory is None else tuple(inspector.memory.sources)
    return scores, threshold, memory, inspector.text.t_normal.tobytes()


def visible_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")}


def crash_campaign(initial: Path, work: Path, args: list[str], temp_pattern: str, kills: int) -> None:
    """Run ``args`` on a copy of ``initial`` at ``work`` to its end (the new state), then again from the initial
    state killing it at seeded random points and once mid-write; after every kill the bundle must load into the
    old or the new state, and any file it left behind must be a hidden temporary one."""
    def restore() -> None:
        shutil.rmtree(work, ignore_errors=True)
        for leftover in glob.glob(str(work.parent / f".{work.name}.*")):  # an export's temporary folders
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.copytree(initial, work)

    restore()
    before, before_files = fingerprint(work), visible_files(work)
    duration = run_to_end(args)
    after, after_files = fingerprint(work), visible_files(work)
    assert after != before, "the command must change what a user sees, or the test cannot tell the states apart"
    rng = random.Random(SEED)
    delays = [duration * rng.uniform(*KILL_WINDOW) for _ in range(kills)] + [None]  # None: mid-write
    for delay in delays:
        restore()
        if delay is None:
            kill_when_appears(args, temp_pattern)
        else:
            kill_after(args, delay)
        state = fingerprint(work)
        assert state in (before, after), "a killed command left a bundle that loads into other answers"
        assert visible_files(work) <= before_files | after_files, "a partial file under its real name"



# ---------------------------------------------------------------- the commands
@pytest.fixture
def reference_files(tmp_path) -> list[str]:
    paths = []
    for seed in range(3):
        path = tmp_path / "refs" / f"ref{seed}.png"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(textured_part(seed=200 + seed), cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    return paths


@pytest.fixture
def registered_bundle(tiny_bundle, tmp_path) -> Path:
    """The tiny bundle with a memory of 3 references and a leave-one-out threshold."""
    from winclip_edge.calibration import calibrate
    from winclip_edge.products import save_threshold

    folder = tmp_path / "registered"
    shutil.copytree(tiny_bundle, folder)
    inspector = Inspector(folder, PRODUCT)
    memory, _ = inspector.embed_references([textured_part(seed=s) for s in range(3)])
    save_memory(inspector.bundle, PRODUCT, memory)
    inspector = Inspector(folder, PRODUCT)
    threshold, _ = calibrate(inspector)
    save_threshold(inspector.bundle, PRODUCT, threshold)
    return folder


def runtime_args(command: str, work: Path) -> list[str]:
    return [command, "--bundle", str(work), "--product", PRODUCT]


def test_killed_register_leaves_old_or_new_memory(tiny_bundle, tmp_path, reference_files):
    initial = tmp_path / "zero-shot"  # no threshold: a new memory would (rightly) invalidate it
    shutil.copytree(tiny_bundle, initial)
    inspector = Inspector(initial, PRODUCT)
    save_memory(inspector.bundle, PRODUCT, inspector.embed_references([textured_part(seed=s) for s in range(3)])[0])
    work = tmp_path / "bundle"
    crash_campaign(initial, work, runtime_args("register", work) + reference_files,
                   str(work / "products" / PRODUCT / ".memory.npz.*.tmp"), KILLS_FAST)


def test_killed_calibrate_leaves_old_or_new_threshold(registered_bundle, tmp_path, reference_files):
    work = tmp_path / "bundle"
    crash_campaign(registered_bundle, work, runtime_args("calibrate", work) + reference_files,
                   str(work / "products" / PRODUCT / ".threshold.json.*.tmp"), KILLS_FAST)


@pytest.mark.slow
def test_killed_add_product_leaves_old_or_new_text(tiny_bundle, tmp_path):
    work = tmp_path / "bundle"
    args = ["add-product", "--bundle", str(work), "--force", PRODUCT, "--object-name", "metal bracket"]
    crash_campaign(tiny_bundle, work, args, str(work / "products" / PRODUCT / ".text.npz.*.tmp"), KILLS_SLOW)


@pytest.mark.slow
def test_killed_export_force_leaves_old_or_new_bundle(tiny_bundle, tmp_path, config_dir):
    work = tmp_path / "bundle"
    args = ["export", "--model", str(config_dir / "tiny240.json"), "--pretrained", "none", "--seed", "1",
            "--products", PRODUCT, "--force", "--out", str(work)]
    # mid-write here: the finished temporary bundle exists, text encoding and the swap are still to come
    crash_campaign(tiny_bundle, work, args, str(tmp_path / f".{work.name}.tmp-*" / "manifest.json"), KILLS_SLOW)


# ---------------------------------------------------------------- the folder swap of export --force
def _folder(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "which").write_text(content)
    return path


def test_exchange_swaps_two_folders_atomically(tmp_path):
    from winclip_edge.export.onnx_export import _exchange_paths

    a, b = _folder(tmp_path / "a", "A"), _folder(tmp_path / "b", "B")
    if not _exchange_paths(a, b):
        pytest.skip("this OS / file system has no atomic exchange (renameat2 RENAME_EXCHANGE)")
    assert (a / "which").read_text() == "B" and (b / "which").read_text() == "A"


@pytest.mark.parametrize("atomic", [True, False])
def test_replace_dir_leaves_only_the_new_folder(tmp_path, monkeypatch, atomic):
    from winclip_edge.export import onnx_export

    if not atomic:  # the two-rename fallback of other systems
        monkeypatch.setattr(onnx_export, "_exchange_paths", lambda a, b: False)
    new, out = _folder(tmp_path / ".out.tmp-1", "new"), _folder(tmp_path / "out", "old")
    onnx_export._replace_dir(new, out)
    assert (out / "which").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]
