"""The review database: operators' verdicts on results, what was taught from them, and an audit of teach/rollback.

An SQLite file (stdlib ``sqlite3``) in WAL mode with ``synchronous=FULL``: a verdict is acknowledged (the call
returns) only after its transaction is committed and on disk, so a killed process or a power cut keeps every
acknowledged verdict; readers (the review page) never block the writers. Several threads and processes may write
at once (SQLite's file locks; writers wait up to ``timeout`` seconds). The schema is versioned by
``PRAGMA user_version``; a newer one is refused.

Images. Teaching a result makes its image a few-shot reference, and only the exact pixels that were inspected
give the reference its point: the patch distances of that image to the memory become zero. The review store's
``<id>.image.jpg`` is a lossy re-encode (another image, by up to a few grey levels per pixel), so a good verdict
keeps a lossless copy of the inspected pixels here, in ``<db>.images/<sha256><ext>``, written before the verdict is
committed: the PNG the store keeps of a flagged result (``<id>.original.png``), or the source file itself (a hot
folder's file, when it still has the sha256 recorded at inspection), or a given RGB array (encoded as PNG). A
verdict without such an image is recorded (it counts for drift) but cannot be taught.

Tables (schema 1): ``verdicts`` (every verdict; the newest per result counts), ``taught`` (which image went into
which product version; an image is taught once, so a rollback is not undone by the next teach) and ``events``
(teach, rollback: who, when, which version, details as JSON).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import WinclipError
from .fileio import atomic_write_bytes, sha256_file

SCHEMA_VERSION = 1
VERDICTS = ("good", "defect")
TIMEOUT_S = 30.0  # how long a writer waits for another one's transaction
MAX_NOTE = 2000
RESULT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
OPERATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")

_SCHEMA = """
CREATE TABLE verdicts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    result_id TEXT NOT NULL,
    product TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('good', 'defect')),
    note TEXT NOT NULL DEFAULT '',
    operator TEXT NOT NULL,
    at TEXT NOT NULL,
    score REAL,
    threshold REAL,
    anomalous INTEGER,
    version INTEGER,
    image TEXT,
    image_sha256 TEXT
);
CREATE INDEX verdicts_by_result ON verdicts (result_id, seq);
CREATE INDEX verdicts_by_product ON verdicts (product, seq);
CREATE TABLE taught (
    product TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    version INTEGER NOT NULL,
    result_id TEXT NOT NULL,
    verdict_seq INTEGER NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (product, image_sha256)
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    operator TEXT NOT NULL,
    action TEXT NOT NULL,
    product TEXT NOT NULL,
    version INTEGER,
    detail TEXT NOT NULL DEFAULT '{}'
);
"""
# The newest verdict of every result (a later verdict on the same result replaces an earlier one).
_LATEST = ("SELECT v.* FROM verdicts v JOIN (SELECT result_id, MAX(seq) AS last FROM verdicts GROUP BY result_id) l "
           "ON v.seq = l.last")


class ReviewError(WinclipError, ValueError):
    """A verdict or review database that cannot be used (bad value, newer schema, damaged file)."""


def _now() -> str:
    moment = _dt.datetime.now(_dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Verdict:
    """One recorded verdict (a row of ``verdicts``)."""

    seq: int
    result_id: str
    product: str
    verdict: str  # good | defect
    note: str
    operator: str  # the token's name, never the token
    at: str  # UTC ISO 8601 when it was committed
    score: float | None = None  # what the station decided: score, threshold, decision, product version
    threshold: float | None = None
    anomalous: bool | None = None
    version: int | None = None
    image: str | None = None  # the lossless copy of the inspected image (absolute path), or None
    image_sha256: str | None = None

    @property
    def false_alarm(self) -> bool:
        return self.verdict == "good" and self.anomalous is True

    def to_dict(self) -> dict:
        return asdict(self)


def _verdict(row: sqlite3.Row) -> Verdict:
    d = dict(row)
    d["anomalous"] = None if d["anomalous"] is None else bool(d["anomalous"])
    return Verdict(**d)


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of an RGB uint8 image (read back by preprocess.read_image as the same array)."""
    import cv2

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ReviewError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError("PNG encoding failed")
    return png.tobytes()


def lossless_source(record: dict, kept: Path | None) -> Path | None:
    """Where the exact pixels of a stored result are: the store's lossless copy ``kept`` (flagged results), else the
    source file when it still has the sha256 the result recorded (hot folders), else None (only the JPEG is left)."""
    if kept is not None and Path(kept).is_file():
        return Path(kept)
    file, digest = record.get("file"), record.get("file_sha256")
    if file and digest and Path(file).is_file() and sha256_file(file) == digest:
        return Path(file)
    return None


class ReviewDB:
    """The review database at ``path`` (see the module docstring). Thread-safe; other processes may share the file."""

    def __init__(self, path: str | os.PathLike, timeout: float = TIMEOUT_S):
        self.path = Path(path)
        self.images = self.path.with_name(self.path.stem + ".images")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            self._migrate()
        except sqlite3.DatabaseError as err:
            raise ReviewError(f"{self.path} is not a usable review database ({err})") from None

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # one process creates the tables, the others wait and see them
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise ReviewError(f"{self.path} has review schema {version}, newer than this winclip-edge reads "
                                      f"({SCHEMA_VERSION}); upgrade winclip-edge")
                if version == 0:
                    if self._db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]:
                        raise ReviewError(f"{self.path} is an SQLite file of something else (tables but no schema "
                                          "version); give another --review path")
                    for statement in _SCHEMA.split(";"):  # not executescript: it would commit first
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ReviewDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ writing
    def _write(self, statements: Sequence[tuple[str, tuple]]) -> list[int]:
        """Run ``statements`` in one transaction; returns each one's lastrowid once committed."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                ids = [self._db.execute(sql, args).lastrowid for sql, args in statements]
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return ids

    def _keep_image(self, image: Path | np.ndarray) -> tuple[str, str]:
        """A lossless copy of ``image`` in the images folder (content-addressed, fsynced) -> (path, sha256)."""
        if isinstance(image, np.ndarray):
            data, suffix = encode_png(image), ".png"
        else:
            data, suffix = Path(image).read_bytes(), (Path(image).suffix.lower() or ".img")
        digest = hashlib.sha256(data).hexdigest()
        path = self.images / f"{digest}{suffix}"
        if not (path.is_file() and sha256_file(path) == digest):
            atomic_write_bytes(path, data)
        return str(path.resolve()), digest

    def record(self, result_id: str, product: str, verdict: str, operator: str, note: str = "", *,
               score: float | None = None, threshold: float | None = None, anomalous: bool | None = None,
               version: int | None = None, image: Path | np.ndarray | None = None) -> Verdict:
        """Record a verdict; returns it once committed (the acknowledgement). ``image``: the exact inspected pixels
        (a lossless file or an RGB array; see the module docstring), kept for teaching when the verdict is good."""
        if verdict not in VERDICTS:
            raise ReviewError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        if not isinstance(result_id, str) or not RESULT_ID.fullmatch(result_id):
            raise ReviewError(f"invalid result id {result_id!r}")
        if not isinstance(operator, str) or not OPERATOR.fullmatch(operator):
            raise ReviewError(f"invalid operator name {operator!r}: letters, digits, '_', '.', '@', '-' (64 at most)")
        if not product:
            raise ReviewError("a verdict needs the product of its result")
        note = str(note or "")
        if len(note) > MAX_NOTE:
            raise ReviewError(f"the note has {len(note)} characters, {MAX_NOTE} at most")
        kept, digest = self._keep_image(image) if image is not None and verdict == "good" else (None, None)
        at = _now()
        row = (result_id, product, verdict, note, operator, at, None if score is None else float(score),
               None if threshold is None else float(threshold), None if anomalous is None else int(bool(anomalous)),
               version, kept, digest)
        (seq,) = self._write([("INSERT INTO verdicts (result_id, product, verdict, note, operator, at, score, "
                               "threshold, anomalous, version, image, image_sha256) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                               row)])
        return Verdict(seq, *row[:8], None if anomalous is None else bool(anomalous), version, kept, digest)

    def mark_taught(self, product: str, version: int, verdicts: Iterable[Verdict]) -> None:
        """``verdicts``' images are references of ``product`` from ``version`` on (one transaction)."""
        at = _now()
        self._write([("INSERT OR IGNORE INTO taught (product, image_sha256, version, result_id, verdict_seq, at) "
                      "VALUES (?,?,?,?,?,?)", (product, v.image_sha256, version, v.result_id, v.seq, at))
                     for v in verdicts if v.image_sha256])

    def audit(self, action: str, product: str, operator: str, version: int | None = None,
              detail: dict | None = None) -> int:
        """Append an event (teach, rollback, ...); returns its sequence number once committed."""
        (seq,) = self._write([("INSERT INTO events (at, operator, action, product, version, detail) VALUES (?,?,?,?,?,?)",
                               (_now(), operator, action, product, version, json.dumps(detail or {}, sort_keys=True)))])
        return seq

    # ------------------------------------------------------------ reading
    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def latest(self, result_id: str) -> Verdict | None:
        """The verdict that counts for ``result_id`` (the newest), or None."""
        rows = self._rows("SELECT * FROM verdicts WHERE result_id = ? ORDER BY seq DESC LIMIT 1", (result_id,))
        return _verdict(rows[0]) if rows else None

    def latest_for(self, result_ids: Iterable[str]) -> dict[str, Verdict]:
        """The verdict that counts for each of ``result_ids`` that has one (the page's "reviewed" marks)."""
        ids = list(dict.fromkeys(result_ids))
        out: dict[str, Verdict] = {}
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._rows(f"{_LATEST} WHERE v.result_id IN ({marks})", tuple(chunk)):
                out[row["result_id"]] = _verdict(row)
        return out

    def unreviewed(self, result_ids: Iterable[str]) -> list[str]:
        """Those of ``result_ids`` (in order) without a verdict: the queue "flagged, not reviewed" of the page."""
        ids = list(result_ids)
        seen = self.latest_for(ids)
        return [rid for rid in ids if rid not in seen]

    def history(self, result_id: str) -> list[Verdict]:
        return [_verdict(r) for r in self._rows("SELECT * FROM verdicts WHERE result_id = ? ORDER BY seq", (result_id,))]

    def verdicts(self, product: str | None = None, limit: int | None = None, all_rows: bool = False) -> list[Verdict]:
        """Newest first: the verdict that counts per result (``all_rows``: every verdict ever given)."""
        base = "SELECT * FROM verdicts v" if all_rows else _LATEST
        where, args = ("WHERE v.product = ?", (product,)) if product is not None else ("", ())
        tail = f" LIMIT {int(limit)}" if limit is not None else ""
        return [_verdict(r) for r in self._rows(f"{base} {where} ORDER BY v.seq DESC{tail}", args)]

    def counts(self, product: str | None = None) -> dict[str, int]:
        """Per the counting verdicts: reviewed, good, defect, false alarms (good but flagged), misses (defect but
        passed), and images taught."""
        latest = self.verdicts(product)
        taught = self._rows("SELECT count(*) FROM taught" + (" WHERE product = ?" if product is not None else ""),
                            (product,) if product is not None else ())[0][0]
        return {"reviewed": len(latest), "good": sum(v.verdict == "good" for v in latest),
                "defect": sum(v.verdict == "defect" for v in latest),
                "false_alarms": sum(v.false_alarm for v in latest),
                "misses": sum(v.verdict == "defect" and v.anomalous is False for v in latest), "taught": taught}

    def teachable(self, product: str, flagged_only: bool = True) -> list[Verdict]:
        """Good verdicts of ``product`` with a kept image that was never taught, oldest first, one per image. By
        default only false alarms (flagged, judged good): the references the memory lacks."""
        rows = self._rows(f"{_LATEST} WHERE v.product = ? AND v.verdict = 'good' AND v.image_sha256 IS NOT NULL "
                          "AND v.image_sha256 NOT IN (SELECT image_sha256 FROM taught WHERE product = ?) "
                          "ORDER BY v.seq", (product, product))
        out, seen = [], set()
        for v in map(_verdict, rows):
            if (v.anomalous is True or not flagged_only) and v.image_sha256 not in seen:
                seen.add(v.image_sha256)
                out.append(v)
        return out

    def taught(self, product: str) -> list[dict]:
        return [dict(r) for r in self._rows("SELECT * FROM taught WHERE product = ? ORDER BY version, verdict_seq",
                                            (product,))]

    def events(self, product: str | None = None, limit: int = 100) -> list[dict]:
        """Newest first."""
        where, args = ("WHERE product = ?", (product,)) if product is not None else ("", ())
        rows = self._rows(f"SELECT * FROM events {where} ORDER BY seq DESC LIMIT {int(limit)}", args)
        return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]

    def integrity(self) -> str:
        """SQLite's own check of the file: "ok" when it is whole."""
        return self._rows("PRAGMA integrity_check")[0][0]
