"""The one decision row: ``infer``, the line station (results.jsonl, MQTT, webhooks) and the HTTP face write the same
versioned JSON object for a decision, with the same fields; a field that does not apply to a face is null.

Versioned by ``schema``; docs/line.md lists every field (and maps the fields of the older ``infer`` rows onto
these). A consumer keys on ``id`` (unique per decision, the same in every sink) to drop the rare duplicate of an
at-least-once delivery. Adding a field is one change here: a field of :class:`ResultRow` (default None, so every
face that does not know it writes null) and its line in docs/line.md (tests/test_rows.py checks the table).
"""
from __future__ import annotations

import datetime as _dt
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .inspector import InspectionResult

SCHEMA = "winclip-edge/result/2"


@dataclass(frozen=True)
class ModelIds:
    """What decided: the model, its weights, the product's memory and threshold and the product version they belong
    to (None when absent; version None: the product's unversioned files)."""

    product: str
    mode: str
    model: str
    weights_id: str
    memory_id: str | None
    threshold_id: str | None
    version: int | None = None

    @classmethod
    def of(cls, inspector: Any) -> "ModelIds":
        """The ids of what an Inspector loaded (the threshold id is its file's sha256 field, kept when it was read:
        a taught product's threshold is in its version folder, and the loaded one is what decides)."""
        manifest = inspector.bundle.manifest
        memory = inspector.memory
        threshold = inspector.threshold
        return cls(product=inspector.product, mode=inspector.mode, model=manifest.model,
                   weights_id=manifest.weights_id, memory_id=memory.checksum if memory is not None else None,
                   threshold_id=threshold.checksum if threshold is not None else None,
                   version=inspector.version)


def utc_iso(timestamp: float) -> str:
    """Seconds since the epoch -> ISO 8601 UTC with milliseconds (``2026-01-31T12:00:00.123Z``)."""
    moment = _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _new_id() -> str:
    return uuid.uuid4().hex


DECISIONS = ("pass", "fail", "timeout")


def decision_of(anomalous: bool | None, error: str | None) -> str | None:
    """``pass`` / ``fail`` of a scored image (the same verdict as ``anomalous``); None without a threshold or score."""
    if error is not None or anomalous is None:
        return None
    return "fail" if anomalous else "pass"


@dataclass(frozen=True)
class ResultRow:
    """One decision as every face writes it (docs/line.md, "The result row"). The field order is the JSON order."""

    schema: str = SCHEMA
    id: str = field(default_factory=_new_id)
    station: Optional[str] = None  # serve's --station; null for infer
    product: Optional[str] = None
    source: Optional[str] = None  # the live source's name, "http" for uploads; null for infer
    frame: Optional[int] = None  # frame number within a video source
    file: Optional[str] = None  # the file as found (infer input, hot-folder file) or the upload's name
    file_sha256: Optional[str] = None  # hot-folder files
    captured_at: Optional[str] = None  # ISO 8601 UTC; null for infer
    score: Optional[float] = None
    anomalous: Optional[bool] = None
    threshold: Optional[float] = None
    zero_shot_score: Optional[float] = None
    mode: Optional[str] = None
    model: Optional[str] = None
    weights_id: Optional[str] = None
    memory_id: Optional[str] = None
    threshold_id: Optional[str] = None
    version: Optional[int] = None  # the product version that decided (null: the product's unversioned files)
    latency_ms: Optional[float] = None  # capture (or request) to decision; null for infer
    image_size: Optional[list] = None  # [H, W] of the anomaly map (= the image)
    timings_ms: Optional[dict] = None  # per stage
    overlay: Optional[str] = None  # path (or, for uploads, URL) of the overlay PNG when saved
    map: Optional[str] = None  # path (or URL) of the map .npy when saved
    moved_to: Optional[str] = None  # hot folder: where the file goes after its row is written
    camera_frame_id: Optional[int] = None  # genicam: sources: the camera's frame (block) id
    camera_timestamp_ns: Optional[int] = None  # genicam: sources: the camera's timestamp of the frame, ns
    error: Optional[str] = None
    # The line's terms (docs/line.md, "Triggered parts"): what was decided for which part, when, and whether it is live.
    part_id: Optional[str] = None  # the triggered part; null when free-running
    decision: Optional[str] = None  # "pass" | "fail" | "timeout"; null without a threshold (or with an error)
    accept: Optional[bool] = None  # what the line does with the part: true good, false reject (fail-safe)
    job_id: Optional[str] = None  # the trigger's job id (OPC UA StartSingleJob's JobId)
    meas_id: Optional[str] = None  # the trigger's measurement id (OPC UA MeasId)
    triggered_by: Optional[str] = None  # opcua | mqtt | http | camera | folder | restart
    triggered_at: Optional[str] = None  # ISO 8601 UTC: when the station took the trigger
    deadline_at: Optional[str] = None  # ISO 8601 UTC: the part's verdict is due by then
    decided_at: Optional[str] = None  # ISO 8601 UTC: when this row was decided
    late_for: Optional[str] = None  # not a live verdict: the id of the row that was (its fail-safe timeout)
    views: Optional[list] = None  # a part's views: one object per captured view (source, score, map, ...)
    overlay_url: Optional[str] = None  # the overlay on the HTTP face (when it runs)

    @classmethod
    def of(cls, result: InspectionResult, ids: ModelIds, captured_at: float | None = None,
           latency_ms: float | None = None, decided_at: float | None = None, **where: Any) -> "ResultRow":
        """The row of ``result`` decided with ``ids``; ``where`` sets the face's own fields (station, source, frame,
        file, file_sha256, overlay, map, moved_to, the part's fields, and ``error`` when writing the outputs
        failed). ``captured_at`` and ``decided_at``: seconds since the epoch. ``decision`` and ``accept`` follow
        ``anomalous`` (null without a threshold)."""
        ok = result.error is None and result.anomaly_map is not None
        decision = decision_of(result.anomalous, result.error)
        made = dict(
            product=ids.product, mode=ids.mode, model=ids.model, weights_id=ids.weights_id, memory_id=ids.memory_id,
            threshold_id=ids.threshold_id, version=ids.version, score=result.score, anomalous=result.anomalous, threshold=result.threshold,
            zero_shot_score=result.zero_shot_score, error=result.error,
            captured_at=None if captured_at is None else utc_iso(captured_at),
            latency_ms=None if latency_ms is None else round(latency_ms, 3),
            image_size=list(result.anomaly_map.shape) if ok else None,
            timings_ms={k: round(v, 3) for k, v in result.timings_ms.items()} if result.timings_ms else None,
            decision=decision, accept=None if decision is None else decision == "pass",
            decided_at=None if decided_at is None else utc_iso(decided_at))
        if "error" in where and where["error"] is None:
            where.pop("error")  # no output error: the result's own stays
        return cls(**{**made, **where})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ROW_FIELDS = tuple(f.name for f in fields(ResultRow))
