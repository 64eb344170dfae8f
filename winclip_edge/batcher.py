"""One engine, many callers: jobs from live sources and HTTP requests share batched engine calls.

A single worker thread owns the engine. ``submit`` decodes the job in the caller's thread (so decoding of
many sources runs in parallel with the engine) and queues it; the worker closes a batch when it is full
(``max_batch``) or when its oldest job has waited ``max_wait_ms``, runs the Inspector's own batch path
(``Inspector.inspect_decoded``: the engine call and scoring of ``Inspector.inspect``, so the scores are those
of ``inspect`` on the same batch) and resolves each job's future. Nothing raises out of a job: an unreadable
image or a failing engine call becomes an error result for the jobs concerned, and the worker goes on with
the next batch.

A batch is scored by one Inspector, read once per batch: assigning ``batcher.inspector`` (a reload, a teach, a
rollback) switches between batches, never inside one, and each job is told what decided it (``Job.ids``: the
model, memory, threshold and product version of that Inspector), so its row names the version that scored it.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Deque

import numpy as np

from .errors import WinclipError
from .inspector import InspectionResult, decode
from .rows import ModelIds

if TYPE_CHECKING:
    from .inspector import Inspector, Decoded


class BatcherClosed(WinclipError, RuntimeError):
    """The batcher no longer accepts jobs (``close`` was called)."""


class BatcherFull(WinclipError, RuntimeError):
    """The queue stayed full for the whole ``timeout`` of a ``submit`` (the engine is behind)."""


@dataclass
class Job:
    """One image to inspect: an already-decoded RGB uint8 ``image`` or a file ``path`` (read by ``submit``).

    ``metadata`` travels with the job untouched (source, frame index, capture time ...): the caller keeps
    the job beside its future. ``keep_image`` keeps the decoded image on the result (for overlays). ``ids`` is
    set by the batcher before the future resolves: the ModelIds (winclip_edge/rows.py) of the Inspector that
    scored it."""

    name: str
    image: np.ndarray | None = None
    path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    keep_image: bool = False
    ids: ModelIds | None = None


@dataclass(frozen=True)
class BatcherStats:
    """Counters since start; ``batch_sizes`` maps an engine batch size to how many batches had it."""

    submitted: int
    completed: int  # futures resolved with a result (error results included)
    errors: int  # results with ``error`` set
    cancelled: int  # dropped by ``close(drain=False)``
    batches: int
    queue_depth: int  # jobs waiting for the engine now
    batch_sizes: dict[int, int]


@dataclass
class _Pending:
    job: Job
    decoded: "Decoded"
    future: Future
    enqueued: float  # time.monotonic() at submit


class Batcher:
    """Dynamic batching in front of one Inspector (see the module docstring).

    ``queue_size`` bounds the jobs waiting for the engine; ``submit`` blocks (or times out with
    :class:`BatcherFull`) while it is full, so memory stays bounded whatever the callers do."""

    def __init__(self, inspector: "Inspector", max_batch: int = 8, max_wait_ms: float = 10.0, queue_size: int = 64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.inspector = inspector
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1e3
        self.queue_size = queue_size
        self._pending: Deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._counts = {"submitted": 0, "completed": 0, "errors": 0, "cancelled": 0, "batches": 0}
        self._batch_sizes: dict[int, int] = {}
        self._ids: tuple[Any, ModelIds] | None = None  # (an Inspector, its ids): read once per Inspector
        self._worker = threading.Thread(target=self._run, name="winclip-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ callers
    def submit(self, job: Job, block: bool = True, timeout: float | None = None) -> Future:
        """Queue ``job``; the future's result is its :class:`InspectionResult` (``path`` = ``job.name``). Assign
        ``batcher.inspector`` to swap products (a reload): it is read once per batch.

        Raises :class:`BatcherClosed` after ``close`` and :class:`BatcherFull` when the queue is full and
        ``block`` is False or ``timeout`` (seconds) passed."""
        if (job.image is None) == (job.path is None):
            raise ValueError(f"{job.name}: a job needs exactly one of image and path")
        if self._closed:
            raise BatcherClosed("the batcher is closed")
        decoded = decode(job.image if job.image is not None else job.path, self.inspector.model_size, job.name)
        pending = _Pending(job, decoded, Future(), 0.0)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._pending) >= self.queue_size and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if not block or (remaining is not None and remaining <= 0):
                    raise BatcherFull(f"{job.name}: the inspection queue is full ({self.queue_size} jobs waiting)")
                self._cond.wait(remaining)
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            pending.enqueued = time.monotonic()
            self._pending.append(pending)
            self._counts["submitted"] += 1
            self._cond.notify_all()
        return pending.future

    def stats(self) -> BatcherStats:
        with self._cond:
            return BatcherStats(queue_depth=len(self._pending), batch_sizes=dict(self._batch_sizes), **self._counts)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting jobs. ``drain=True`` finishes every queued job first; ``drain=False`` cancels the
        queued ones (their futures raise CancelledError) and finishes only the batch in the engine."""
        with self._cond:
            self._closed = True
            if not drain:
                while self._pending:
                    if self._pending.popleft().future.cancel():
                        self._counts["cancelled"] += 1
            self._cond.notify_all()
        self._worker.join(timeout)

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the worker
    def _next_batch(self) -> list[_Pending] | None:
        """Wait for a batch: full, or its oldest job waited ``max_wait``; None when closed and drained."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = self._pending[0].enqueued + self.max_wait
            while len(self._pending) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            self._cond.notify_all()  # room for blocked submitters
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if live:
                self._process(live)

    def _ids_of(self, inspector: "Inspector") -> ModelIds:
        if self._ids is None or self._ids[0] is not inspector:
            self._ids = (inspector, ModelIds.of(inspector))
        return self._ids[1]

    def _process(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        inspector = self.inspector  # once: the whole batch is scored by this one (see the module docstring)
        try:
            results = inspector.inspect_decoded([p.decoded for p in batch],
                                                keep_images=any(p.job.keep_image for p in batch))
        except Exception as err:  # the engine failed: these jobs get error results, the next batch still runs
            results = [InspectionResult(path=p.job.name, error=f"{p.job.name}: engine failed: {type(err).__name__}: {err}")
                       for p in batch]
        ids = self._ids_of(inspector)
        with self._cond:
            self._counts["batches"] += 1
            self._counts["completed"] += len(batch)
            self._counts["errors"] += sum(r.error is not None for r in results)
            self._batch_sizes[len(batch)] = self._batch_sizes.get(len(batch), 0) + 1
        for p, result in zip(batch, results):
            result.path = p.job.name
            result.timings_ms["queue"] = (started - p.enqueued) * 1e3
            if not p.job.keep_image:
                result.image = None
            p.job.ids = ids
            p.future.set_result(result)
