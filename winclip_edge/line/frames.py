"""What sources hand to the station: frames (or complete files) in a bounded buffer per source."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque

import numpy as np

from ..errors import WinclipError


class SourceError(WinclipError, ValueError):
    """A source spec that cannot work (missing file or folder, unreadable video, bad option)."""


@dataclass
class Frame:
    """One captured frame or one complete file. ``captured_at`` is wall-clock (for the payload),
    ``captured_mono`` monotonic (for the latency)."""

    source: str
    index: int  # frame number within the source (raw capture count), or the file's pick-up order
    captured_at: float
    captured_mono: float
    image: np.ndarray | None = None  # RGB uint8 (video sources)
    path: str | None = None  # hot-folder file
    sha256: str | None = None

    def row_fields(self) -> dict[str, Any]:
        """Fields of the decision row only the frame knows (a camera's frame id and timestamp: genicam.py's
        CameraFrame); none for a plain frame."""
        return {}


class FrameBuffer:
    """Bounded FIFO between a capture thread and the batcher. ``drop_oldest``: a full buffer discards its
    oldest frame (counted in ``dropped``); otherwise ``put`` waits for room."""

    def __init__(self, capacity: int, drop_oldest: bool):
        if capacity < 1:
            raise SourceError(f"a frame buffer holds at least 1 frame, got {capacity}")
        self.capacity, self.drop_oldest = capacity, drop_oldest
        self.dropped = 0
        self._items: Deque[Frame] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, frame: Frame) -> bool:
        """Add ``frame``; False when the buffer was closed (the frame is not taken)."""
        with self._cond:
            while len(self._items) >= self.capacity and not self.drop_oldest and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            if len(self._items) >= self.capacity:
                self._items.popleft()
                self.dropped += 1
            self._items.append(frame)
            self._cond.notify_all()
            return True

    def get(self) -> Frame | None:
        """The oldest frame, waiting for one; None once the buffer is closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None
            frame = self._items.popleft()
            self._cond.notify_all()
            return frame

    def close(self) -> None:
        """No more frames: ``get`` returns what is left, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
