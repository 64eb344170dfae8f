"""The one result payload of the line: the same JSON object goes to results.jsonl, MQTT and webhooks.

Versioned by ``schema``; docs/line.md lists every field. A consumer keys on ``id`` (unique per decision,
the same in every sink) to drop the rare duplicate of an at-least-once delivery.
"""
from __future__ import annotations

import datetime as _dt
import uuid
from dataclasses import dataclass
from typing import Any

from ..bundle import THRESHOLD, read_checked_json
from ..inspector import InspectionResult

SCHEMA = "winclip-edge/line-result/1"


@dataclass(frozen=True)
class ModelIds:
    """What decided: the model, its weights and the product's memory and threshold (None when absent)."""

    product: str
    mode: str
    model: str
    weights_id: str
    memory_id: str | None
    threshold_id: str | None

    @classmethod
    def of(cls, inspector: Any) -> "ModelIds":
        """The ids of an Inspector's bundle and product files (the threshold id is its file's sha256 field)."""
        manifest = inspector.bundle.manifest
        memory = inspector.memory
        threshold_id = None
        if inspector.threshold is not None:
            threshold_id = read_checked_json(inspector.bundle.product_dir(inspector.product) / THRESHOLD).get("sha256")
        return cls(product=inspector.product, mode=inspector.mode, model=manifest.model,
                   weights_id=manifest.weights_id, memory_id=memory.checksum if memory is not None else None,
                   threshold_id=threshold_id)


def utc_iso(timestamp: float) -> str:
    """Seconds since the epoch -> ISO 8601 UTC with milliseconds (``2026-01-31T12:00:00.123Z``)."""
    moment = _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def payload(result: InspectionResult, ids: ModelIds, station: str, source: str, captured_at: float,
            latency_ms: float, frame: int | None = None, file: str | None = None, file_sha256: str | None = None,
            overlay: str | None = None, map_path: str | None = None) -> dict[str, Any]:
    """The versioned payload of one decision (numbers are None and ``error`` is set when it failed)."""
    return {
        "schema": SCHEMA,
        "id": uuid.uuid4().hex,
        "station": station,
        "product": ids.product,
        "source": source,
        "frame": frame,
        "file": file,
        "file_sha256": file_sha256,
        "captured_at": utc_iso(captured_at),
        "score": result.score,
        "anomalous": result.anomalous,
        "threshold": result.threshold,
        "mode": ids.mode,
        "model": ids.model,
        "weights_id": ids.weights_id,
        "memory_id": ids.memory_id,
        "threshold_id": ids.threshold_id,
        "latency_ms": round(latency_ms, 3),
        "overlay": overlay,
        "map": map_path,
        "error": result.error,
    }
