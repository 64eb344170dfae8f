"""The trigger journal: every trigger the station acknowledges is on disk first, so a part in flight at a crash
(``kill -9``, power loss) still gets its one row after the restart, and a part that got its verdict is never
given a second one (docs/line.md, "Triggered parts").

``OUT/parts.journal.jsonl``, one JSON object per line: ``{"event": "trigger", ...}`` written and fsync'd before the
trigger is acknowledged; ``{"event": "decided", "part_id", "row"}`` once the part's live row is in results.jsonl
(flushed, not fsync'd: results.jsonl is the truth a restart checks). A restart reads it back
(:meth:`PartJournal.recover`), then rewrites it with only the decided ids it keeps and the parts still open
(atomically); it is rewritten the same way whenever it grew past a few times that size.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..fileio import atomic_write_bytes, fsync_dir

log = logging.getLogger("winclip_edge.line")

JOURNAL = "parts.journal.jsonl"
TRIGGER, DECIDED = "trigger", "decided"


@dataclass(frozen=True)
class Triggered:
    """A journaled trigger (epoch seconds)."""

    part_id: str
    product: str
    triggered_by: str
    job_id: str
    meas_id: str
    triggered_at: float
    deadline_at: float | None
    views: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        return {"event": TRIGGER, "part_id": self.part_id, "product": self.product, "triggered_by": self.triggered_by,
                "job_id": self.job_id, "meas_id": self.meas_id, "triggered_at": self.triggered_at,
                "deadline_at": self.deadline_at, "views": list(self.views)}

    @classmethod
    def of(cls, record: dict[str, Any]) -> "Triggered":
        return cls(part_id=str(record["part_id"]), product=str(record["product"]),
                   triggered_by=str(record.get("triggered_by") or ""), job_id=str(record.get("job_id") or ""),
                   meas_id=str(record.get("meas_id") or ""), triggered_at=float(record["triggered_at"]),
                   deadline_at=None if record.get("deadline_at") is None else float(record["deadline_at"]),
                   views=tuple(str(v) for v in record.get("views") or ()))


@dataclass(frozen=True)
class Recovered:
    """What an earlier run left: the decided part ids (oldest first) and the triggers without a decision."""

    decided: list[tuple[str, str]]  # (part id, row id)
    open: list[Triggered]


class PartJournal:
    """Append-only journal of triggers and decisions (see the module docstring). Thread-safe."""

    def __init__(self, out: str | os.PathLike, keep: int = 10000):
        self.path = Path(out) / JOURNAL
        self.keep = keep
        self._lock = threading.Lock()
        self._handle: Any = None
        self._records = 0

    def recover(self) -> Recovered:
        """Read what an earlier run wrote (a line cut by a crash is skipped)."""
        decided: dict[str, str] = {}
        triggered: dict[str, Triggered] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        if record.get("event") == TRIGGER:
                            entry = Triggered.of(record)
                            triggered[entry.part_id] = entry
                            decided.pop(entry.part_id, None)  # triggered again after a decision that was forgotten
                        elif record.get("event") == DECIDED:
                            part = str(record["part_id"])
                            decided.pop(part, None)
                            decided[part] = str(record.get("row") or "")
                            triggered.pop(part, None)
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # cut by a crash, or not ours
        return Recovered(list(decided.items()), list(triggered.values()))

    def rewrite(self, decided: Iterable[tuple[str, str]], open_parts: Iterable[Triggered]) -> None:
        """Replace the journal by these decisions (the newest ``keep``) and open triggers, atomically."""
        kept = list(decided)[-self.keep:]
        lines = [json.dumps({"event": DECIDED, "part_id": p, "row": r}) for p, r in kept]
        lines += [json.dumps(t.record()) for t in open_parts]
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
            atomic_write_bytes(self.path, "".join(line + "\n" for line in lines).encode())
            self._records = len(lines)

    def _append(self, record: dict[str, Any], durable: bool) -> None:
        with self._lock:
            if self._handle is None:
                new = not self.path.exists()
                self._handle = open(self.path, "a", encoding="utf-8")
                if new:
                    fsync_dir(self.path.parent)
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()
            if durable:
                os.fsync(self._handle.fileno())
            self._records += 1

    def triggered(self, entry: Triggered) -> None:
        """On disk (fsync'd) before the trigger is acknowledged."""
        self._append(entry.record(), durable=True)

    def decided(self, part_id: str, row_id: str) -> None:
        self._append({"event": DECIDED, "part_id": part_id, "row": row_id}, durable=False)

    def oversized(self, open_count: int) -> bool:
        """Grown past a few times what a rewrite keeps."""
        return self._records > 4 * self.keep + open_count + 100

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
