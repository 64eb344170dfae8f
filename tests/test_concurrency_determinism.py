"""Concurrency and determinism: one Inspector shared by threads answers exactly as sequential calls (the engine's
one lock serialises its calls, engines/serial.py), and the same image, bundle and backend give bit-identical CPU results in two
separate processes (docs/reliability.md)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from conftest import textured_part
from winclip_edge.bundle import Bundle
from winclip_edge.engines import EngineConfig, create_engine
from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
from winclip_edge.inspector import Inspector

PRODUCT = "widget"
THREADS = 4
ROUNDS = 3  # calls per thread
ENGINE_HOLD_S = 0.02  # the probe engine holds each call this long, so unserialised calls would overlap


def job(index: int) -> list[np.ndarray]:
    """Thread ``index``'s images: its own, of different sizes, one with a defect."""
    return [textured_part((200 + 8 * index, 240), seed=10 * index),
            textured_part((240, 180), seed=10 * index + 1, defect=(40, 50, 30, 30))]


def outcome(results) -> list[tuple]:
    return [(r.score, r.zero_shot_score, r.anomaly_map.tobytes()) for r in results]


class OverlapProbe:
    """An engine wrapper that counts how many calls are inside ``run`` at the same time."""

    def __init__(self, engine):
        self.engine, self.name, self.device = engine, engine.name, engine.device
        self.active = self.max_active = self.calls = 0
        self._count = threading.Lock()

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self._count:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(ENGINE_HOLD_S)
            return self.engine.run(images)
        finally:
            with self._count:
                self.active -= 1

    def close(self) -> None:
        self.engine.close()


def run_threads(work, n: int = THREADS) -> list:
    barrier = threading.Barrier(n)

    def start(i: int):
        barrier.wait()  # all threads call at once
        return work(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(start, range(n)))


@pytest.fixture(scope="module")
def probe(tiny_bundle):
    return OverlapProbe(create_engine(Bundle(tiny_bundle)))


@pytest.fixture(scope="module")
def probe_inspector(tiny_bundle, probe):
    """An Inspector made on the probe: the probe sits inside the engine's lock, where the engine runs."""
    inspector = Inspector(tiny_bundle, PRODUCT, engine=probe)
    yield inspector
    inspector.close()


def test_threads_get_the_sequential_answers(probe_inspector, probe):
    sequential = [outcome(probe_inspector.inspect(job(i), batch_size=2)) for i in range(THREADS)]
    probe.max_active = 0

    def work(i: int) -> list[list[tuple]]:
        return [outcome(probe_inspector.inspect(job(i), batch_size=2)) for _ in range(ROUNDS)]

    for i, rounds in enumerate(run_threads(work)):
        assert all(r == sequential[i] for r in rounds), f"thread {i} got other answers than sequential calls"
    assert probe.max_active == 1


def test_engine_calls_are_serialised_and_the_probe_sees_overlap(probe_inspector, probe):
    batch = np.zeros((1, *probe_inspector.model_size, 3), np.uint8)
    probe.max_active, calls = 0, probe.calls
    run_threads(lambda i: probe_inspector.embed(batch))
    assert probe.max_active == 1 and probe.calls == calls + THREADS  # through the Inspector: one at a time
    probe.max_active = 0
    run_threads(lambda i: probe.run(batch))
    assert probe.max_active > 1  # the control: straight to the engine, the same calls do overlap


def test_inspectors_sharing_an_engine_share_its_one_lock(tiny_bundle, probe_inspector, probe):
    """A catalog's products (and eval's classes) are Inspectors on one engine: their calls queue on one lock, and an
    engine that is serialised already is not wrapped again (a second lock would let them overlap)."""
    from winclip_edge.scoring import ScoringOptions

    other = Inspector(tiny_bundle, PRODUCT, engine=probe_inspector.engine, options=ScoringOptions(use_memory=False))
    assert other.engine is probe_inspector.engine and other.engine.engine is probe
    probe.max_active = 0
    run_threads(lambda i: (probe_inspector if i % 2 else other).inspect(job(i), batch_size=2))
    assert probe.max_active == 1
    alone = Inspector(tiny_bundle, PRODUCT, engine=probe)  # the bare engine again: a lock of its own
    probe.max_active = 0
    run_threads(lambda i: (probe_inspector if i % 2 else alone).embed(np.zeros((1, *alone.model_size, 3), np.uint8)))
    assert probe.max_active > 1  # the control: two locks, overlapping calls


def test_mixed_calls_from_threads(probe_inspector):
    """inspect, iter_inspect and embed_references at once, on one Inspector."""
    expected = outcome(probe_inspector.inspect(job(0), batch_size=1))
    memory_expected, _ = probe_inspector.embed_references(job(1))

    def work(i: int):
        if i == 0:
            return outcome(probe_inspector.inspect(job(0), batch_size=1))
        if i == 1:
            return probe_inspector.embed_references(job(1))[0]
        return outcome(list(probe_inspector.iter_inspect(job(0), batch_size=1)))

    first, memory, *others = run_threads(work)
    assert first == expected and all(o == expected for o in others)
    assert np.array_equal(memory.patch_tokens, memory_expected.patch_tokens)


# ---------------------------------------------------------------- determinism across processes
_RUN = """
import hashlib, json, sys
from winclip_edge.inspector import Inspector
inspector = Inspector(sys.argv[1], sys.argv[2])
out = {}
for r in inspector.inspect(sys.argv[3:], batch_size=2):
    out[r.path] = {"score": r.score.hex(), "zero_shot": r.zero_shot_score.hex(),
                   "map_sha256": hashlib.sha256(r.anomaly_map.tobytes()).hexdigest(), "shape": r.anomaly_map.shape}
print(json.dumps(out))
"""


def test_two_processes_give_bit_identical_results(tiny_bundle, tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"part{i}.png"
        part = textured_part(seed=300 + i, defect=(20 * i, 30, 40, 40))
        cv2.imwrite(str(path), cv2.cvtColor(part, cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    runs = [json.loads(subprocess.run([sys.executable, "-c", _RUN, str(tiny_bundle), PRODUCT, *paths],
                                      capture_output=True, text=True, check=True, timeout=120).stdout)
            for _ in range(2)]
    assert runs[0] == runs[1]  # float.hex and sha256 of the map bytes: bit for bit
    assert len(runs[0]) == 3 and len({r["map_sha256"] for r in runs[0].values()}) == 3


def test_engine_is_deterministic_within_a_process(tiny_bundle):
    from winclip_edge.bundle import Bundle

    engine = create_engine(Bundle(tiny_bundle), EngineConfig(backend="onnxruntime",
                                                             options=OnnxRuntimeOptions(provider="cpu")))
    batch = np.stack([cv2.resize(textured_part(seed=s), (240, 240)) for s in range(3)])
    first, second = engine.run(batch), engine.run(batch)
    assert all(np.array_equal(first[k], second[k]) for k in first)
