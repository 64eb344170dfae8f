"""The review store: the newest inspections (record, overlay, map, image) on disk, bounded, found by id.

One folder, four files per result: ``<id>.image.jpg``, ``<id>.overlay.png``, ``<id>.map.npy`` and, written
last, ``<id>.json`` (the record); a flagged result also keeps ``<id>.original.png``, the inspected pixels without
loss: the JPEG is for viewing, and teaching a false alarm needs the exact image (winclip_edge/review.py). Every file is written atomically and a result exists only once its
record does, so a crash leaves whole results (the files of a half-written one are removed at the next
start). The id is the line payload's own ``id`` (the same in results.jsonl, MQTT and here): 32 lower-case
hex digits, checked before any path is built, so no id names anything outside the folder. The oldest
results are deleted beyond ``capacity``.
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from ..fileio import atomic_write_bytes, atomic_write_json
from ..heatmap import write_npy
from ..inspector import InspectionResult
from ..results import write_overlay
from ..review import encode_png

ID_PATTERN = re.compile(r"[0-9a-f]{32}")
FILES = {"image": ".image.jpg", "overlay": ".overlay.png", "map": ".map.npy", "original": ".original.png"}
OWN_FILE = re.compile(r"\.?([0-9a-f]{32})(?:\.json|\.image\.jpg|\.overlay\.png|\.map\.npy|\.original\.png)"
                      r"(?:\.[^/]+\.tmp)?")
JPEG_QUALITY = 90  # the stored input image is for viewing; the map keeps the numbers


def valid_id(rid: str) -> bool:
    return ID_PATTERN.fullmatch(rid) is not None


class ResultStore:
    """Bounded, crash-safe store of the newest results (see the module docstring). Thread-safe."""

    def __init__(self, root: str | os.PathLike, capacity: int = 500):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._index: OrderedDict[str, dict] = OrderedDict()  # oldest first
        self._load()

    def _load(self) -> None:
        """Index the records on disk (oldest first); remove the files of results whose record was never written."""
        records = {}
        for path in sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime_ns):
            rid = path.name[:-len(".json")]
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = None
            if valid_id(rid) and isinstance(record, dict):
                records[rid] = record
        for path in self.root.iterdir():  # only this store's own names: <id>.<kind> and .<id>.<kind>.<random>.tmp
            match = OWN_FILE.fullmatch(path.name)
            if match is not None and match.group(1) not in records:
                path.unlink(missing_ok=True)
        self._index.update(records)
        self._evict()

    def add(self, record: dict, result: InspectionResult | None = None) -> str:
        """Store one result under its ``record["id"]``, with the image, overlay and map of ``result`` when it has
        them (``infer``'s overlay); the files exist before the record does."""
        rid = record.get("id")
        if not isinstance(rid, str) or not valid_id(rid):
            raise ValueError(f"a stored record needs an id of 32 lower-case hex digits, got {rid!r}")
        image = None if result is None else result.image
        anomaly_map = None if result is None or result.error is not None else result.anomaly_map
        if image is not None:
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise OSError("JPEG encoding failed")
            atomic_write_bytes(self.root / (rid + FILES["image"]), jpg.tobytes())
            if record.get("anomalous") is True:  # a false alarm may be taught: keep the exact pixels
                atomic_write_bytes(self.root / (rid + FILES["original"]), encode_png(image))
        if image is not None and anomaly_map is not None:
            write_overlay(self.root / (rid + FILES["overlay"]), result)
        if anomaly_map is not None:
            write_npy(self.root / (rid + FILES["map"]), anomaly_map.astype(np.float32))
        atomic_write_json(self.root / f"{rid}.json", record)
        with self._lock:
            self._index.pop(rid, None)  # a repeated id (redelivery) moves to the newest place
            self._index[rid] = record
            self._evict()
        return rid

    def _evict(self) -> None:
        while len(self._index) > self.capacity:
            rid, _ = self._index.popitem(last=False)
            (self.root / f"{rid}.json").unlink(missing_ok=True)  # the record first: a crash leaves orphans, not a dangling record
            for suffix in FILES.values():
                (self.root / (rid + suffix)).unlink(missing_ok=True)

    def get(self, rid: str) -> dict | None:
        with self._lock:
            return self._index.get(rid) if valid_id(rid) else None

    def file(self, rid: str, kind: str) -> Path | None:
        """Path of a result's ``image``, ``overlay``, ``map`` or ``original`` (flagged results) file, or None."""
        if kind not in FILES or self.get(rid) is None:
            return None
        path = self.root / (rid + FILES[kind])
        return path if path.is_file() else None

    def newest(self, limit: int = 50, anomalous: bool | None = None, product: str | None = None) -> list[dict]:
        """Up to ``limit`` records, newest (last stored) first, optionally only anomalous ones / one product's."""
        with self._lock:
            records = list(reversed(self._index.values()))
        return [r for r in records
                if (anomalous is None or r.get("anomalous") is anomalous) and (product is None or r.get("product") == product)][:limit]

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)
