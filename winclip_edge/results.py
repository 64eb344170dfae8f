"""What an inspection leaves on disk: ``results.jsonl`` (one JSON object per input, flushed as it comes),
``maps/<stem>.npy`` and ``overlays/<stem>.png``, with stems safe for any input name and unique within one run
(names.safe_stem).

Shared by ``infer``, ``demo``, the soak benchmark and the line station; the rows are :mod:`winclip_edge.rows`'
(the same the HTTP face answers), so every face writes the same row for the same image.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from .fileio import fsync_dir
from .heatmap import overlay, write_npy, write_png
from .inspector import InspectionResult
from .names import safe_stem
from .rows import ModelIds, ResultRow
from .verdicts import verdict_of

RESULTS_JSONL = "results.jsonl"
MAPS = "maps"
OVERLAYS = "overlays"


@dataclass
class Summary:
    """Running sums, not lists: one run may stream for weeks."""

    total: int = 0
    failed: int = 0
    anomalous: int = 0
    engine_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def inspected(self) -> int:
        return self.total - self.failed


def decision_text(anomalous: bool | None) -> str:
    return verdict_of(anomalous).word


def write_overlay(path: str | os.PathLike, result: InspectionResult) -> None:
    """Heatmap over the image with score, threshold and decision. Colours run from the map's minimum to
    max(map maximum, threshold), so a normal part does not turn red."""
    hi = max(float(result.anomaly_map.max()), result.threshold or 0.0)
    verdict = verdict_of(result.anomalous)
    parts = [f"score {result.score:.4f}",
             *([f"threshold {result.threshold:.4f}"] if result.threshold is not None else []),
             (verdict.word, verdict.colour_bgr)]
    write_png(path, overlay(result.image, result.anomaly_map, parts, (float(result.anomaly_map.min()), hi),
                            roi=result.roi))


@dataclass(frozen=True)
class Saved:
    """What :meth:`ResultWriter.save_outputs` wrote: the paths (None when not written) or why it failed."""

    map: str | None = None
    overlay: str | None = None
    error: str | None = None


class ResultWriter:
    """Writes one row per result under ``out`` (the row of :mod:`winclip_edge.rows`, as every face writes it); maps
    and overlays only for inspected inputs and only when asked.

    The Inspector must keep the decoded images (``keep_images=True``) when ``overlays`` is on."""

    def __init__(self, out: str | os.PathLike, maps: bool = True, overlays: bool = True, append: bool = False,
                 rotate_bytes: int | None = None, durable: bool = False, unique_names: bool = True):
        """``rotate_bytes``: past this size results.jsonl becomes results.<n>.jsonl (n = 1, 2, ...: never
        overwritten) and a new one starts. ``durable``: each row is fsync'd before ``append_row`` returns.
        ``unique_names=False``: the caller's names are unique already (a station running for weeks keeps no set
        of every name)."""
        self.out = Path(out)
        self.maps, self.overlays = maps, overlays
        for wanted, folder in ((maps, MAPS), (overlays, OVERLAYS)):
            if wanted:
                (self.out / folder).mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / RESULTS_JSONL
        self.rotate_bytes, self.durable, self.unique_names = rotate_bytes, durable, unique_names
        self._jsonl: TextIO = open(self.path, "a" if append else "w", encoding="utf-8")
        self._used: set[str] = set()
        self.summary = Summary()

    def save_outputs(self, r: InspectionResult, save: bool = True) -> Saved:
        """Write the map / overlay of ``r`` when ``save`` (and this writer keeps them); a failed write is the error."""
        saved = Saved()
        if r.error is None:
            try:
                t0 = time.perf_counter()
                if save and (self.maps or self.overlays):
                    stem = safe_stem(r.path, self._used if self.unique_names else None)
                    if self.maps:
                        saved = replace(saved, map=str(self.out / MAPS / f"{stem}.npy"))
                        write_npy(saved.map, r.anomaly_map)
                    if self.overlays:
                        saved = replace(saved, overlay=str(self.out / OVERLAYS / f"{stem}.png"))
                        write_overlay(saved.overlay, r)
                r.timings_ms["write"] = (time.perf_counter() - t0) * 1e3
            except OSError as err:
                saved = replace(saved, error=f"{r.path}: cannot write outputs ({err})")
        return saved

    def write(self, r: InspectionResult, ids: ModelIds, save_outputs: bool = True, **where: Any) -> dict[str, Any]:
        """Save the outputs of ``r``, append its row (:class:`~winclip_edge.rows.ResultRow`, ``where`` = the
        face's own fields) to results.jsonl, update the summary; returns the row."""
        saved = self.save_outputs(r, save_outputs)
        row = ResultRow.of(r, ids, **{"file": r.path, **where}, map=saved.map, overlay=saved.overlay,
                           error=saved.error).as_dict()
        self.append_row(row)
        s = self.summary
        s.total += 1
        if row["error"] is not None:
            s.failed += 1
        else:
            s.anomalous += bool(r.anomalous)
            s.engine_ms += r.timings_ms.get("engine", 0.0)
            s.total_ms += sum(r.timings_ms.values())
        return row

    def append_row(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.durable:
            os.fsync(self._jsonl.fileno())
        if self.rotate_bytes is not None and self._jsonl.tell() >= self.rotate_bytes:
            self._jsonl.close()
            rotated = [int(p.name.split(".")[1]) for p in self.out.glob("results.*.jsonl") if p.name.split(".")[1].isdigit()]
            os.replace(self.path, self.out / f"results.{max(rotated, default=0) + 1}.jsonl")
            fsync_dir(self.out)
            self._jsonl = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._jsonl.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def inspect_into(writer: ResultWriter, inspector: Any, inputs: Iterable[Any], batch_size: int,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> Summary:
    """Inspect ``inputs`` with ``inspector`` and write every result with ``writer``; ``on_row`` sees each row."""
    ids = ModelIds.of(inspector)
    for r in inspector.iter_inspect(inputs, batch_size, keep_images=writer.overlays):
        row = writer.write(r, ids)
        if on_row is not None:
            on_row(row)
    return writer.summary
