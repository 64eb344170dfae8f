"""Drift of a running station: one :class:`~winclip_edge.drift.DriftTracker` per product, fed every decision and
every operator's verdict, its alerts handed to hooks (docs/service.md, "Drift").

A tracker judges the live scores against one calibration: the threshold's calibration scores of the Inspector the
catalog serves. When the catalog serves another Inspector for a product (teach, rollback, reload), the next
observation starts a new tracker on its calibration, and an alert still raised on the old one is cleared (reason
``"version"``); decisions scored by another version than the tracked one (a frame scored just before the switch)
are not counted against it. A product without a threshold has nothing to be judged against: no tracker.

Alerts go to every callable in :attr:`DriftWatch.on_alert` (the station's MQTT alert topics, the OPC UA face, a
plugin), each as one JSON-ready dict (:func:`alert_message`); a failing hook is logged and the others still get it.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from ..drift import STATISTICS, Alert, DriftLimits, DriftTracker

log = logging.getLogger("winclip_edge.line")

ALERT_SCHEMA = "winclip-edge/alert/1"
# (scores, verdicts) a new tracker starts from: the product's recent history of one version (oldest first),
# verdicts as (verdict, flagged) pairs.
History = Callable[[str, Optional[int]], "tuple[list[float], list[tuple[str, bool]]]"]


def _utc_now() -> str:
    moment = _dt.datetime.now(_dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def alert_message(station: str, product: str, version: int | None, alert: Alert, tracker: DriftTracker,
                  reason: str = "limit") -> dict:
    """The one alert object every face sends (MQTT payload, OPC UA event, log): schema, id, when, where, which
    statistic, raised (``active`` true) or cleared, its value and the level crossed, the window's sample counts.
    ``reason``: ``"limit"`` (the value crossed it) or ``"version"`` (cleared: another version serves now)."""
    stats = tracker.stats()
    return {"schema": ALERT_SCHEMA, "id": uuid.uuid4().hex, "at": _utc_now(), "kind": "drift", "station": station,
            "product": product, "version": version, "statistic": alert.statistic, "active": alert.active,
            "value": _number(alert.value), "limit": alert.limit, "reason": reason, "window": tracker.window,
            "scores": stats.n_scores, "reviewed_goods": stats.n_reviewed_goods}


@dataclass
class _Tracked:
    inspector: Any  # the Inspector the tracker follows (identity tells a switch)
    version: int | None
    tracker: DriftTracker | None  # None: the product has no threshold


@dataclass
class DriftWatch:
    """Drift of every product a catalog serves (see the module docstring). Thread-safe: the station's collector,
    the HTTP face's verdicts and a metrics scrape may call it at once."""

    catalog: Any  # a Catalog: ``products`` and ``get(product)`` (the Inspector serving it now)
    window: int = 200
    limits: DriftLimits = DriftLimits()
    station: str = "station"
    history: Optional[History] = None  # the recent history a new tracker replays (the HTTP face's store and verdicts)
    on_alert: list = field(default_factory=list)  # callables taking an alert_message dict

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"the drift window must be >= 1, got {self.window}")
        self._lock = threading.RLock()
        self._tracked: dict[str, _Tracked] = {}

    # ------------------------------------------------------------ feeding
    def observe(self, row: dict) -> None:
        """One decision's row (winclip_edge/rows.py): its score counts when its version is the tracked one."""
        score = row.get("score")
        if row.get("error") is not None or score is None:
            return
        alerts: list[dict] = []
        with self._lock:
            tracked = self._current(row.get("product"), alerts)
            if tracked is not None and tracked.tracker is not None and row.get("version") == tracked.version:
                alerts += self._messages(row["product"], tracked, tracked.tracker.add_score(score))
        self._send(alerts)

    def verdict(self, product: str, version: int | None, verdict: str, flagged: bool) -> None:
        """An operator's verdict on a result of ``product`` decided by ``version`` (``flagged``: it was anomalous)."""
        alerts: list[dict] = []
        with self._lock:
            tracked = self._current(product, alerts)
            if tracked is not None and tracked.tracker is not None and version == tracked.version:
                alerts += self._messages(product, tracked, tracked.tracker.add_verdict(verdict, flagged))
        self._send(alerts)

    # ------------------------------------------------------------ reading
    def snapshot(self) -> dict[str, dict]:
        """Per product served: the version tracked, the window, sample counts, each statistic's value (None: not
        enough samples yet), which alerts are raised, and the limits (None: not watched)."""
        out, alerts = {}, []
        with self._lock:
            for product in list(self.catalog.products):
                tracked = self._current(product, alerts)
                if tracked is None:
                    continue
                out[product] = self._state(tracked)
        self._send(alerts)
        return out

    def _state(self, tracked: _Tracked) -> dict:
        limits = {name: None if getattr(self.limits, name) is None else
                  {"on": getattr(self.limits, name).on, "off": getattr(self.limits, name).off} for name in STATISTICS}
        if tracked.tracker is None:
            return {"version": tracked.version, "window": self.window, "min_samples": self.limits.min_samples,
                    "calibrated": False, "scores": 0, "reviewed_goods": 0,
                    "values": {name: None for name in STATISTICS}, "active": {name: False for name in STATISTICS},
                    "limits": limits}
        stats = tracked.tracker.stats()
        return {"version": tracked.version, "window": self.window, "min_samples": self.limits.min_samples,
                "calibrated": True, "scores": stats.n_scores, "reviewed_goods": stats.n_reviewed_goods,
                "values": {name: _number(stats.value(name)) for name in STATISTICS},
                "active": dict(tracked.tracker.active), "limits": limits}

    # ------------------------------------------------------------ the tracker of the version served
    def _current(self, product: Any, alerts: list) -> _Tracked | None:
        """The tracker of the Inspector serving ``product`` now (started on a switch); None for a product not served.
        The messages of a switch (cleared alerts of the old tracker, alerts the replayed history raises on the new
        one) are appended to ``alerts``, sent by the caller once the lock is released."""
        if product not in self.catalog.products:
            return None
        inspector = self.catalog.get(product)
        tracked = self._tracked.get(product)
        if tracked is not None and tracked.inspector is inspector:
            return tracked
        if tracked is not None and tracked.tracker is not None:
            alerts += [alert_message(self.station, product, tracked.version,
                                     Alert(name, False, math.nan, getattr(self.limits, name).off), tracked.tracker,
                                     reason="version")
                       for name, active in tracked.tracker.active.items() if active]
        threshold = inspector.threshold
        tracker = None if threshold is None else DriftTracker(threshold.scores, threshold.value, self.window, self.limits)
        tracked = self._tracked[product] = _Tracked(inspector, inspector.version, tracker)
        if tracker is not None and self.history is not None:
            scores, verdicts = self.history(product, tracked.version)
            for score in scores[-self.window:]:
                tracker.add_score(score)
            for verdict, flagged in verdicts[-self.window:]:
                tracker.add_verdict(verdict, flagged)
            alerts += self._messages(product, tracked, [  # what the history ends in, once (not every flip on the way)
                Alert(name, True, tracker.value(name), getattr(self.limits, name).on)
                for name, active in tracker.active.items() if active])
        return tracked

    def _messages(self, product: str, tracked: _Tracked, changes: Iterable[Alert]) -> list[dict]:
        return [alert_message(self.station, product, tracked.version, a, tracked.tracker) for a in changes]

    def _send(self, alerts: list[dict]) -> None:
        for alert in alerts:
            level = logging.WARNING if alert["active"] else logging.INFO
            log.log(level, "drift %s: product %s version %s: %s %s (value %s, limit %s)",
                    "ALERT" if alert["active"] else "cleared", alert["product"], alert["version"], alert["statistic"],
                    "above its limit" if alert["active"] else f"back ({alert['reason']})", alert["value"],
                    alert["limit"])
            for hook in list(self.on_alert):
                try:
                    hook(alert)
                except Exception as err:  # one face failing never stops the others
                    log.error("drift alert hook failed: %s: %s", type(err).__name__, err)
