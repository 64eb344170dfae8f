"""Drift of a product against its calibration: pure statistics and a windowed tracker with hysteresis alerts.

A threshold holds while the goods the line makes look like the calibration images. Three signals say when they
no longer do, each over the last ``window`` observations of a product:

- the observed false-alarm rate on reviewed goods: of the results an operator judged good, the share that was
  flagged (the rate the calibration promised is its ``target_false_alarm_rate``);
- the two-sample Kolmogorov-Smirnov statistic of the recent scores against the calibration scores (the largest
  gap between their empirical distribution functions, in [0, 1]; it needs no review);
- the share of recent scores above the threshold (flagged share; it needs no review either).

An alert turns on when a statistic rises above its limit and off only when it falls below a lower limit
(hysteresis), so a value hovering at the limit does not flap. No statistic is judged before ``min_samples``
observations. Pure numpy; the faces turn alerts into gauges and messages.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

STATISTICS = ("false_alarm_rate", "ks", "share_above")


def false_alarm_rate(flagged_goods: Sequence[bool]) -> float:
    """Share of reviewed goods that were flagged (NaN without any)."""
    flags = np.asarray(flagged_goods, dtype=bool)
    return float(flags.mean()) if flags.size else math.nan


def share_above(scores: Sequence[float], threshold: float) -> float:
    """Share of ``scores`` strictly above ``threshold`` (the decision rule; NaN without any)."""
    s = np.asarray(scores, dtype=np.float64)
    return float(np.mean(s > threshold)) if s.size else math.nan


def ks_statistic(sample: Sequence[float], reference: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic ``sup_x |F_sample(x) - F_reference(x)|`` (NaN if either is empty).

    Both empirical distribution functions are right-continuous steps, so the supremum is reached at one of the
    observed values: evaluate both there (a sorted search each)."""
    a = np.sort(np.asarray(sample, dtype=np.float64))
    b = np.sort(np.asarray(reference, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        return math.nan
    points = np.concatenate([a, b])
    fa = np.searchsorted(a, points, side="right") / a.size
    fb = np.searchsorted(b, points, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


@dataclass(frozen=True)
class Limit:
    """Alert when the value rises above ``on``; clear when it falls below ``off`` (``off <= on``)."""

    on: float
    off: float

    def __post_init__(self) -> None:
        if not self.off <= self.on:
            raise ValueError(f"a limit clears below its alert level: off {self.off} > on {self.on}")


@dataclass(frozen=True)
class DriftLimits:
    """Per statistic a Limit, or None (not watched). Defaults: a false-alarm rate above 10 % of reviewed goods, a
    KS gap above 0.3, more than 20 % flagged; each clears at about two thirds of its level."""

    false_alarm_rate: Limit | None = Limit(0.10, 0.06)
    ks: Limit | None = Limit(0.30, 0.20)
    share_above: Limit | None = Limit(0.20, 0.12)
    min_samples: int = 30  # observations a statistic needs before it is judged


@dataclass(frozen=True)
class DriftStats:
    """The statistics over the current window (NaN: not enough data yet)."""

    n_scores: int
    n_reviewed_goods: int
    false_alarm_rate: float
    ks: float
    share_above: float

    def value(self, name: str) -> float:
        return getattr(self, name)


@dataclass(frozen=True)
class Alert:
    """A change of an alert: ``active`` True = raised, False = cleared."""

    statistic: str
    active: bool
    value: float
    limit: float  # the level crossed (``on`` when raised, ``off`` when cleared)


@dataclass
class DriftTracker:
    """One product's drift against one calibration (build a new tracker when the product's version changes)."""

    calibration_scores: Sequence[float]
    threshold: float
    window: int = 200
    limits: DriftLimits = DriftLimits()
    active: dict = field(default_factory=dict, init=False)  # statistic -> alert raised

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"the drift window must be >= 1, got {self.window}")
        self._calibration = np.sort(np.asarray(self.calibration_scores, dtype=np.float64))
        self._scores: deque[float] = deque(maxlen=self.window)
        self._goods: deque[bool] = deque(maxlen=self.window)
        self.active = {name: False for name in STATISTICS}

    def add_score(self, score: float) -> list[Alert]:
        """One decision's score (every result); returns the alerts that changed."""
        self._scores.append(float(score))
        return self._update(("ks", "share_above"))

    def add_verdict(self, verdict: str, flagged: bool) -> list[Alert]:
        """An operator's verdict on a result (``flagged``: the station called it anomalous); only goods count."""
        if verdict == "good":
            self._goods.append(bool(flagged))
        return self._update(("false_alarm_rate",))

    def value(self, name: str) -> float:
        """One statistic over the window (NaN below ``min_samples``)."""
        if name == "false_alarm_rate":
            return false_alarm_rate(self._goods) if len(self._goods) >= self.limits.min_samples else math.nan
        if len(self._scores) < self.limits.min_samples:
            return math.nan
        if name == "ks":
            return ks_statistic(self._scores, self._calibration)
        return share_above(self._scores, self.threshold)

    def stats(self) -> DriftStats:
        return DriftStats(len(self._scores), len(self._goods), *(self.value(name) for name in STATISTICS))

    def _update(self, names: Sequence[str]) -> list[Alert]:
        changes = []
        for name in names:
            limit = getattr(self.limits, name)
            value = math.nan if limit is None else self.value(name)
            if limit is None or math.isnan(value):
                continue
            if not self.active[name] and value > limit.on:
                self.active[name] = True
                changes.append(Alert(name, True, value, limit.on))
            elif self.active[name] and value < limit.off:
                self.active[name] = False
                changes.append(Alert(name, False, value, limit.off))
        return changes
