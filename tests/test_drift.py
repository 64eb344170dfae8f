"""Drift statistics against reference computations (scipy and plain loops) and the tracker's hysteresis."""
from __future__ import annotations

import math

import numpy as np
import pytest

from winclip_edge.drift import DriftLimits, DriftTracker, Limit, false_alarm_rate, ks_statistic, share_above


def ks_loop(a, b) -> float:
    """sup_x |F_a(x) - F_b(x)| by counting, at every observed value (the steps of both ECDFs)."""
    best = 0.0
    for x in list(a) + list(b):
        fa = sum(v <= x for v in a) / len(a)
        fb = sum(v <= x for v in b) / len(b)
        best = max(best, abs(fa - fb))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_ks_statistic_equals_scipy_and_a_loop(seed):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 80, 2)
    a = rng.normal(0.4 + 0.05 * seed, 0.05, n)
    b = rng.normal(0.4, 0.05, m)
    if seed % 2:  # ties within and across the samples (scores are often equal after rounding)
        a, b = np.round(a, 2), np.round(b, 2)
    d = ks_statistic(a, b)
    assert d == pytest.approx(ks_loop(a, b), abs=1e-12)
    assert d == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
    assert ks_statistic(a, a) == 0.0 and ks_statistic(a, b) == ks_statistic(b, a)


def test_ks_statistic_extremes():
    assert ks_statistic([1, 2, 3], [4, 5]) == 1.0
    assert math.isnan(ks_statistic([], [1.0])) and math.isnan(ks_statistic([1.0], []))


def test_false_alarm_rate_and_share_above_against_loops():
    rng = np.random.default_rng(3)
    flags = rng.random(57) < 0.2
    assert false_alarm_rate(flags) == sum(bool(f) for f in flags) / len(flags)
    scores = np.round(rng.random(91), 2)
    t = 0.5  # scores equal to the threshold are not above it (an image is anomalous when strictly above)
    assert share_above(scores, t) == sum(s > t for s in scores) / len(scores)
    assert share_above([0.5, 0.5], 0.5) == 0.0
    assert math.isnan(false_alarm_rate([])) and math.isnan(share_above([], 0.5))


def test_limits_clear_below_their_level():
    with pytest.raises(ValueError):
        Limit(on=0.1, off=0.2)
    with pytest.raises(ValueError):
        DriftTracker([0.1], 0.5, window=0)


def test_tracker_alerts_with_hysteresis_and_only_on_changes():
    limits = DriftLimits(false_alarm_rate=Limit(0.2, 0.1), ks=None, share_above=Limit(0.5, 0.3), min_samples=10)
    tracker = DriftTracker(calibration_scores=[0.1] * 20, threshold=0.5, window=10, limits=limits)
    # below min_samples nothing is judged, whatever the values
    assert all(tracker.add_score(0.9) == [] for _ in range(9)) and math.isnan(tracker.stats().share_above)
    (raised,) = tracker.add_score(0.9)  # 10 of 10 above
    assert (raised.statistic, raised.active, raised.value, raised.limit) == ("share_above", True, 1.0, 0.5)
    # falling to 0.4 (between off and on): still active, no new alert
    changes = [tracker.add_score(0.1) for _ in range(6)]
    assert all(c == [] for c in changes) and tracker.stats().share_above == 0.4 and tracker.active["share_above"]
    (cleared,) = tracker.add_score(0.1) + tracker.add_score(0.1)  # 0.3 is not below 0.3; 0.2 is
    assert (cleared.active, cleared.value, cleared.limit) == (False, 0.2, 0.3)
    # the false-alarm rate counts reviewed goods only (defect verdicts do not dilute it)
    for _ in range(8):
        assert tracker.add_verdict("good", flagged=False) == []
        tracker.add_verdict("defect", flagged=True)
    assert tracker.add_verdict("good", flagged=True) == [] and tracker.stats().n_reviewed_goods == 9
    assert tracker.add_verdict("good", flagged=True) == [] and tracker.stats().false_alarm_rate == 0.2  # not above
    (far,) = tracker.add_verdict("good", flagged=True)  # the window drops the oldest good: 3 of 10
    assert (far.statistic, far.active, far.value) == ("false_alarm_rate", True, pytest.approx(0.3))


def test_tracker_raises_the_ks_alert_when_the_scores_shift():
    rng = np.random.default_rng(0)
    calibration = rng.normal(0.40, 0.02, 200)
    tracker = DriftTracker(calibration, threshold=0.46, window=100,
                           limits=DriftLimits(false_alarm_rate=None, share_above=None, min_samples=30))
    same = [tracker.add_score(s) for s in rng.normal(0.40, 0.02, 100)]
    assert not any(same) and tracker.stats().ks < 0.2
    shifted = [a for s in rng.normal(0.43, 0.02, 100) for a in tracker.add_score(s)]
    assert [(a.statistic, a.active) for a in shifted] == [("ks", True)]  # raised once, not on every score
    assert tracker.stats().ks == pytest.approx(ks_loop(list(tracker._scores), calibration))
