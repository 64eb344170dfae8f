"""The batcher: dynamic batches give the Inspector's exact results, errors stay per job, close drains or cancels."""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from conftest import textured_part
from winclip_edge.inspector import Inspector
from winclip_edge.batcher import Batcher, BatcherClosed, BatcherFull, Job
from winclip_edge.preprocess import resize_to_model


class CountingEngine:
    """Wraps a real engine; records batch sizes, can be slowed down, blocked or made to fail."""

    def __init__(self, engine, delay: float = 0.0):
        self.engine, self.delay = engine, delay
        self.name, self.device = engine.name, engine.device
        self.sizes: list[int] = []
        self.batches: list[np.ndarray] = []
        self.fail_next = False
        self.gate = threading.Event()
        self.gate.set()

    def run(self, images):
        self.gate.wait(30)
        self.sizes.append(len(images))
        self.batches.append(images.copy())
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        time.sleep(self.delay)
        return self.engine.run(images)

    def close(self):
        self.engine.close()


@pytest.fixture(scope="module")
def inspector(tiny_bundle):
    inspector = Inspector(tiny_bundle, "widget")
    yield inspector
    inspector.close()


@pytest.fixture
def counting(inspector):
    engine = CountingEngine(inspector.engine)
    original = inspector.engine
    inspector.engine = engine
    yield engine
    inspector.engine = original


def _images(n, size=(200, 260)):
    return [textured_part(size, seed=i, defect=(40, 50, 30, 30) if i % 2 else None) for i in range(n)]


def test_results_equal_inspector_exactly_with_concurrent_callers(inspector, counting):
    images = _images(10)
    model_inputs = [resize_to_model(image, inspector.model_size) for image in images]
    futures = [None] * len(images)

    def feed(indices):
        for i in indices:
            futures[i] = batcher.submit(Job(name=f"cam{i % 3}/{i}", image=images[i], metadata={"i": i}))

    with Batcher(inspector, max_batch=4, max_wait_ms=200.0) as batcher:
        counting.gate.clear()  # hold the engine so that the queue builds up and batches fill
        threads = [threading.Thread(target=feed, args=(range(k, 10, 3),)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counting.gate.set()
        results = [f.result(timeout=60) for f in futures]
    assert max(counting.sizes) == 4 and sum(counting.sizes) == 10  # batches shared the engine
    stats = batcher.stats()
    assert stats.submitted == stats.completed == 10 and stats.errors == 0 and stats.queue_depth == 0
    assert sum(size * n for size, n in stats.batch_sizes.items()) == 10
    # Each engine batch, replayed through Inspector.inspect as one batch, gives bit-identical results
    # (the engine's float results depend on the batch size, so the comparison keeps the batches).
    engine_batches = list(counting.batches)
    for batch in engine_batches:
        members = [next(i for i, m in enumerate(model_inputs) if np.array_equal(m, row)) for row in batch]
        expected = inspector.inspect([images[i] for i in members], batch_size=len(members))
        for i, want in zip(members, expected):
            got = results[i]
            assert got.path == f"cam{i % 3}/{i}" and got.error is None and got.timings_ms["queue"] >= 0
            assert got.score == want.score and got.zero_shot_score == want.zero_shot_score
            np.testing.assert_array_equal(got.anomaly_map, want.anomaly_map)


def test_batch_closes_when_full_or_when_oldest_waited(inspector, counting):
    image = _images(1)[0]
    with Batcher(inspector, max_batch=2, max_wait_ms=600_000.0) as batcher:  # a full batch never waits
        futures = [batcher.submit(Job(name=str(i), image=image)) for i in range(2)]
        assert all(f.result(timeout=60).error is None for f in futures)
    assert counting.sizes == [2]
    counting.sizes.clear()
    with Batcher(inspector, max_batch=8, max_wait_ms=0.0) as batcher:  # a lone job does not wait for company
        assert batcher.submit(Job(name="lone", image=image)).result(timeout=60).error is None
    assert counting.sizes == [1]


def test_bad_inputs_and_engine_failure_become_error_results(inspector, counting, tmp_path):
    bad_file = tmp_path / "broken.png"
    bad_file.write_bytes(b"not an image")
    good = _images(1)[0]
    with Batcher(inspector, max_batch=8, max_wait_ms=0.0) as batcher:
        counting.gate.clear()
        futures = [batcher.submit(Job(name="bad-path", path=str(bad_file))),
                   batcher.submit(Job(name="bad-array", image=np.zeros((4, 4, 3), np.float32))),
                   batcher.submit(Job(name="good", image=good))]
        counting.gate.set()
        bad_path, bad_array, ok = [f.result(timeout=60) for f in futures]
        assert "not an image" in bad_path.error and bad_path.score is None
        assert "bad-array" in bad_array.error and "uint8" in bad_array.error
        assert ok.error is None and ok.score is not None
        alone = batcher.submit(Job(name="alone", image=good)).result(timeout=60)
        counting.fail_next = True
        failed = batcher.submit(Job(name="unlucky", image=good)).result(timeout=60)
        assert failed.error == "unlucky: engine failed: RuntimeError: device lost"
        after = batcher.submit(Job(name="next", image=good)).result(timeout=60)  # the worker survived
        assert after.error is None and after.score == alone.score
    with pytest.raises(ValueError, match="exactly one"):
        batcher.submit(Job(name="none"))


def test_keep_image_and_path_jobs(inspector, tmp_path):
    import cv2

    image = _images(1)[0]
    path = tmp_path / "part.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    with Batcher(inspector) as batcher:
        kept = batcher.submit(Job(name="a", image=image, keep_image=True)).result(timeout=60)
        from_file = batcher.submit(Job(name="b", path=str(path))).result(timeout=60)
    np.testing.assert_array_equal(kept.image, image)
    assert from_file.image is None and from_file.score == kept.score


def test_close_drains_or_cancels_and_full_queue_refuses(inspector, counting):
    image = _images(1)[0]
    batcher = Batcher(inspector, max_batch=1, max_wait_ms=0.0, queue_size=2)
    counting.gate.clear()
    first = batcher.submit(Job(name="0", image=image))
    deadline = time.monotonic() + 30
    while batcher.stats().queue_depth and time.monotonic() < deadline:  # the worker holds job 0 in the engine
        time.sleep(0.01)
    queued = [batcher.submit(Job(name=str(i), image=image)) for i in (1, 2)]
    with pytest.raises(BatcherFull, match="queue is full"):
        batcher.submit(Job(name="3", image=image), block=False)
    with pytest.raises(BatcherFull):
        batcher.submit(Job(name="3", image=image), timeout=0.05)
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    time.sleep(0.05)
    counting.gate.set()
    closer.join(60)
    assert first.result(timeout=60).error is None  # the batch in the engine finishes
    for f in queued:
        with pytest.raises(CancelledError):
            f.result(timeout=1)
    assert batcher.stats().cancelled == 2
    with pytest.raises(BatcherClosed):
        batcher.submit(Job(name="late", image=image))

    drained = Batcher(inspector, max_batch=2, max_wait_ms=50.0)
    futures = [drained.submit(Job(name=str(i), image=image)) for i in range(5)]
    drained.close(drain=True)
    assert [f.result(timeout=0).error for f in futures] == [None] * 5
