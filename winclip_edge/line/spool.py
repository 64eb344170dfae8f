"""A bounded, ordered, on-disk message queue: what a sink has not yet confirmed survives its outage and a restart.

One file per message (``<seq>.json``, written atomically), named by a sequence number that keeps counting
across restarts, so the oldest file is always the next to deliver. A message is removed only after the sink
confirmed it. When ``max_messages`` are waiting, a new message is refused and counted as overflow (the
caller logs it; the decision is still in results.jsonl): the spool never grows without bound and never
drops silently.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path
from typing import Deque

from ..fileio import atomic_write_bytes

SUFFIX = ".json"


class Spool:
    """FIFO of byte messages in ``folder`` (see the module docstring). Thread-safe."""

    def __init__(self, folder: str | os.PathLike, max_messages: int = 10000):
        if max_messages < 1:
            raise ValueError(f"a spool holds at least 1 message, got {max_messages}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self.overflow = 0  # messages refused because the spool was full (this run)
        self._lock = threading.Lock()
        self._seqs: Deque[int] = deque(sorted(int(p.stem) for p in self.folder.glob("*" + SUFFIX) if p.stem.isdigit()))
        self._next = (self._seqs[-1] + 1) if self._seqs else 0
        self.recovered = len(self._seqs)  # left by an earlier run, delivered first

    def _path(self, seq: int) -> Path:
        return self.folder / f"{seq:012d}{SUFFIX}"

    def put(self, message: bytes) -> int | None:
        """Append ``message`` durably; its sequence number, or None when the spool is full (counted)."""
        with self._lock:
            if len(self._seqs) >= self.max_messages:
                self.overflow += 1
                return None
            seq = self._next
            self._next += 1
            atomic_write_bytes(self._path(seq), message)
            self._seqs.append(seq)
            return seq

    def peek(self) -> tuple[int, bytes] | None:
        """The oldest message (sequence number, bytes), or None when empty."""
        with self._lock:
            if not self._seqs:
                return None
            seq = self._seqs[0]
        return seq, self._path(seq).read_bytes()

    def pop(self, seq: int) -> None:
        """Remove message ``seq`` (the oldest) once its sink confirmed it."""
        with self._lock:
            if self._seqs and self._seqs[0] == seq:
                self._seqs.popleft()
                self._path(seq).unlink(missing_ok=True)

    def __len__(self) -> int:
        with self._lock:
            return len(self._seqs)
