"""Triggered parts (docs/line.md, "Triggered parts"): a trigger names a part; the part waits for its views (a camera
frame after the trigger, a hot-folder file named for it, an upload with its id); it is decided once, on time or
by its fail-safe at the deadline.

:class:`PartTracker` is the bookkeeping only, on a monotonic clock and without threads or I/O: which parts are in
flight (bounded: ``max_pending``), which view a frame fills, which parts passed their deadline or waited too long
for a view, which part ids already have their verdict (so none gets a second live one). The station
(station.py) drives it under its own lock and writes the rows; the journal (journal.py) makes the acknowledged
triggers survive a crash.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..control import PartRefused, check_part_id

HTTP_VIEW = "http"  # the view an upload with the part id fills (POST /v1/inspect?part_id=...)
ON_TIMEOUT = ("reject", "pass")
DEFAULT_CAPTURE_MS = 10000.0  # without a deadline, how long a part waits for its views
VIEW_SEPARATOR = "@"  # a hot-folder file 4711@top.png is a view of part 4711 (so is 4711.png)
RECENT_PARTS = 1000  # decided parts whose trigger a late view's row can still name

WAITING, INSPECTING, DONE = "waiting", "inspecting", "done"


def part_id_of_file(path: str) -> str | None:
    """The part a hot-folder file is named for: its stem, up to a ``@`` (``4711.png``, ``4711@top.png``)."""
    stem = Path(path).stem.split(VIEW_SEPARATOR, 1)[0]
    try:
        return check_part_id(stem)
    except PartRefused:
        return None


def named_part(frame: Any) -> str | None:
    """The part a frame names: a triggered camera's ``part_id``, else the part a hot-folder file is named for."""
    named = getattr(frame, "part_id", None)
    if named is None and getattr(frame, "path", None) is not None:
        named = part_id_of_file(frame.path)
    return named


@dataclass(frozen=True)
class PartsConfig:
    """How a station takes triggered parts. ``views``: the sources (or ``http``) whose capture makes a part's
    views, in order; ``continuous``: frames no part claims are inspected as free-running rows (else dropped,
    counted; a hot-folder file is then its own part)."""

    deadline_ms: float | None = None  # a part's verdict is due this long after its trigger; None: no deadline
    on_timeout: str = "reject"  # what the fail-safe row tells the line: reject | pass
    views: tuple[str, ...] = ()
    continuous: bool = True
    max_pending: int = 64  # parts in flight at most; beyond, a trigger gets its fail-safe row at once (counted)
    capture_timeout_ms: float | None = None  # a view not captured by then fails; None: 2 x the deadline (else 10 s)
    remember: int = 10000  # decided part ids kept: a trigger for one of them is refused

    def __post_init__(self) -> None:
        if self.deadline_ms is not None and not (self.deadline_ms > 0 and math.isfinite(self.deadline_ms)):
            raise ValueError(f"--deadline-ms must be > 0, got {self.deadline_ms}")
        if self.on_timeout not in ON_TIMEOUT:
            raise ValueError(f"--on-timeout must be one of {', '.join(ON_TIMEOUT)}, got {self.on_timeout!r}")
        if self.max_pending < 1:
            raise ValueError(f"--max-parts must be >= 1, got {self.max_pending}")
        if self.capture_timeout_ms is not None and not (self.capture_timeout_ms > 0
                                                        and math.isfinite(self.capture_timeout_ms)):
            raise ValueError(f"capture_timeout_ms must be > 0, got {self.capture_timeout_ms}")
        if self.remember < 1:
            raise ValueError(f"remember must be >= 1, got {self.remember}")

    @property
    def capture_ms(self) -> float:
        """How long a part waits for its views: ``capture_timeout_ms``, else twice its deadline (a view captured
        after the deadline is still its late result), else 10 s."""
        if self.capture_timeout_ms is not None:
            return self.capture_timeout_ms
        return 2 * self.deadline_ms if self.deadline_ms is not None else DEFAULT_CAPTURE_MS


@dataclass
class View:
    """One view of a part: ``live`` views take the next frame after the trigger (cameras, streams), the others a
    file or upload named for the part. ``outcome`` is what the station recorded once it was inspected."""

    name: str
    live: bool
    state: str = WAITING
    outcome: Any = None
    error: str | None = None  # why it has no result (missed by the camera, never captured)


@dataclass
class Part:
    part_id: str
    product: str
    views: dict[str, View]
    triggered_by: str = "opcua"
    job_id: str = ""
    meas_id: str = ""
    triggered_at: float = 0.0  # epoch seconds
    triggered_mono: float = 0.0
    deadline_at: float | None = None  # epoch seconds
    deadline_mono: float | None = None
    capture_by_mono: float = math.inf
    timeout_row: str | None = None  # the id of its fail-safe row, once published: later rows are late
    missing: list = field(default_factory=list)  # the views it still waited for at its deadline
    fail_safe: dict | None = None  # that row
    waiters: list = field(default_factory=list)  # futures resolved with its final row (uploads)
    recovered: bool = False  # re-armed from the journal after a restart

    @property
    def live(self) -> bool:
        """No fail-safe was published for it yet: its next row is its live verdict."""
        return self.timeout_row is None

    @property
    def complete(self) -> bool:
        return all(v.state == DONE for v in self.views.values())

    def waiting(self) -> list[str]:
        return [v.name for v in self.views.values() if v.state == WAITING]


@dataclass(frozen=True)
class Expired:
    """What :meth:`PartTracker.expire` found: parts whose deadline passed without a verdict (their fail-safe is
    due) and parts that are complete now because a view waited too long."""

    timed_out: list[Part]
    completed: list[Part]


class PartTracker:
    """The parts in flight and the part ids decided (see the module docstring). Thread-safe; every method is
    short. ``clock``/``wall``: the monotonic and the epoch clock (tests inject their own)."""

    def __init__(self, config: PartsConfig, live_views: dict[str, bool], clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.config, self.clock, self.wall = config, clock, wall
        self.live_views = dict(live_views)  # view name -> live
        self._lock = threading.Lock()
        self._open: OrderedDict[str, Part] = OrderedDict()  # in trigger order
        self._decided: OrderedDict[str, str] = OrderedDict()  # part id -> the id of its live row
        self._recent: OrderedDict[str, Part] = OrderedDict()  # the last RECENT_PARTS decided parts
        self.counts = {"triggered": 0, "decided": 0, "timeouts": 0, "overflow": 0, "late": 0, "refused": 0}

    # ---- triggers
    def new_part(self, part_id: str, product: str, triggered_by: str, job_id: str = "", meas_id: str = "",
                 views: Iterable[str] | None = None, at: tuple[float, float] | None = None) -> Part:
        """A part as triggered now (``at`` = (monotonic, epoch) of the trigger if earlier), not yet tracked."""
        mono, epoch = at if at is not None else (self.clock(), self.wall())
        names = list(views) if views is not None else list(self.live_views)
        deadline = self.config.deadline_ms
        return Part(part_id=part_id, product=product, triggered_by=triggered_by, job_id=job_id, meas_id=meas_id,
                    views={n: View(n, self.live_views.get(n, False)) for n in names},
                    triggered_at=epoch, triggered_mono=mono,
                    deadline_at=None if deadline is None else epoch + deadline / 1e3,
                    deadline_mono=None if deadline is None else mono + deadline / 1e3,
                    capture_by_mono=mono + self.config.capture_ms / 1e3)

    def refusal(self, part_id: str) -> str | None:
        """Why a new part with this id is refused (in flight or decided already), or None."""
        with self._lock:
            return self._refusal(part_id)

    def _refusal(self, part_id: str) -> str | None:
        if part_id in self._open:
            return f"part {part_id} is in flight already"
        if part_id in self._decided:
            return f"part {part_id} has its verdict already (row {self._decided[part_id]}); a part id is inspected once"
        return None

    def admit(self, part: Part) -> bool:
        """Track ``part``; False when ``max_pending`` parts are in flight (the caller publishes its fail-safe row and
        calls :meth:`decided`). Raises PartRefused for an id in flight or decided."""
        with self._lock:
            why = self._refusal(part.part_id)
            if why is not None:
                self.counts["refused"] += 1
                raise PartRefused(why)
            self.counts["triggered"] += 1
            if len(self._open) >= self.config.max_pending:
                self.counts["overflow"] += 1
                return False
            self._open[part.part_id] = part
            return True

    def refused(self) -> None:
        with self._lock:
            self.counts["refused"] += 1

    # ---- views
    def claim(self, view: str, frame: Any) -> Part | None:
        """The part a frame of source ``view`` belongs to, its view marked as being inspected; None when no part
        waits for it. A frame that names its part (a triggered camera's ``part_id``, a file named for it) goes to
        that part; a live frame to the oldest part waiting for that view and triggered before it was captured."""
        named = named_part(frame)
        with self._lock:
            if named is not None:
                part = self._open.get(named)
                if part is not None and view in part.views and part.views[view].state == WAITING:
                    part.views[view].state = INSPECTING
                    return part
                return None
            captured = getattr(frame, "captured_mono", math.inf)
            for part in self._open.values():
                slot = part.views.get(view)
                if slot is not None and slot.live and slot.state == WAITING and part.triggered_mono <= captured:
                    slot.state = INSPECTING
                    return part
        return None

    def claim_named(self, part_id: str, view: str) -> Part | None:
        """The open part ``part_id`` if it waits for ``view`` (an upload), its view marked as being inspected."""
        with self._lock:
            part = self._open.get(part_id)
            if part is None or view not in part.views or part.views[view].state != WAITING:
                return None
            part.views[view].state = INSPECTING
            return part

    def done(self, part: Part, view: str, outcome: Any = None, error: str | None = None) -> bool:
        """Record a view's outcome (or why it has none); True when that completed the part."""
        with self._lock:
            slot = part.views[view]
            if slot.state == DONE:
                return False
            slot.state, slot.outcome, slot.error = DONE, outcome, error
            return part.complete

    def missed(self, part_id: str | None, view: str, reason: str) -> Part | None:
        """A camera's trigger brought no frame for ``part_id``: its view fails. The part, when that completed it."""
        with self._lock:
            part = self._open.get(part_id) if part_id is not None else None
            if part is None or view not in part.views or part.views[view].state == DONE:
                return None
            slot = part.views[view]
            slot.state, slot.error = DONE, reason
            return part if part.complete else None

    # ---- time
    def next_wake(self) -> float | None:
        """The earliest monotonic time :meth:`expire` has something to do."""
        with self._lock:
            times = [t for p in self._open.values()
                     for t in ((p.deadline_mono if p.live else None), p.capture_by_mono if p.waiting() else None)
                     if t is not None and math.isfinite(t)]
        return min(times) if times else None

    def expire(self, now: float | None = None) -> Expired:
        """Parts past their deadline without a verdict (marked: the caller publishes their fail-safe and sets
        ``timeout_row``) and parts completed by views that waited past ``capture_ms``."""
        now = self.clock() if now is None else now
        timed_out, completed = [], []
        with self._lock:
            for part in self._open.values():
                if part.live and part.deadline_mono is not None and now >= part.deadline_mono and not part.complete:
                    part.missing = part.waiting()
                    timed_out.append(part)
                if now >= part.capture_by_mono and part.waiting():
                    for name in part.waiting():
                        slot = part.views[name]
                        slot.state = DONE
                        slot.error = (f"no {'frame' if slot.live else 'file or upload'} from view {name} within "
                                      f"{self.config.capture_ms:g} ms of the trigger")
                    if part.complete:
                        completed.append(part)
            self.counts["timeouts"] += len(timed_out)
        return Expired(timed_out, completed)

    def overdue(self, part: Part, now: float | None = None) -> bool:
        """A part that completes now but is past its deadline: its fail-safe comes first."""
        now = self.clock() if now is None else now
        return part.live and part.deadline_mono is not None and now >= part.deadline_mono

    # ---- the end of a part
    def decided(self, part_id: str, row_id: str, part: Part | None = None) -> None:
        """``row_id`` is the live verdict of ``part_id`` (a verdict or its fail-safe): remember it (and, for a late
        row of a view that comes after its part closed, the part's trigger)."""
        with self._lock:
            if part_id not in self._decided:
                self.counts["decided"] += 1
            self._decided[part_id] = row_id
            self._decided.move_to_end(part_id)
            while len(self._decided) > self.config.remember:
                self._decided.popitem(last=False)
            if part is not None:
                self._recent[part_id] = part
                while len(self._recent) > RECENT_PARTS:
                    self._recent.popitem(last=False)

    def decided_part(self, part_id: str) -> Part | None:
        """A recently decided part (its trigger's fields), if still known."""
        with self._lock:
            return self._recent.get(part_id)

    def close(self, part: Part, late: bool = False) -> None:
        """The part has its final row: it claims nothing any more."""
        with self._lock:
            if self._open.get(part.part_id) is part:
                del self._open[part.part_id]
            if late:
                self.counts["late"] += 1

    def decided_row(self, part_id: str) -> str | None:
        with self._lock:
            return self._decided.get(part_id)

    def remembered(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._decided.items())

    def open_parts(self) -> list[Part]:
        with self._lock:
            return list(self._open.values())

    def in_flight(self) -> int:
        """Parts triggered and not decided yet (SingleExecution while there is one)."""
        with self._lock:
            return sum(1 for p in self._open.values() if p.live)

    def get(self, part_id: str) -> Part | None:
        with self._lock:
            return self._open.get(part_id)


__all__ = ["DONE", "Expired", "HTTP_VIEW", "INSPECTING", "ON_TIMEOUT", "Part",
           "PartTracker", "PartsConfig", "View", "WAITING", "named_part", "part_id_of_file"]
