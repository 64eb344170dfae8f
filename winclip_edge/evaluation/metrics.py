"""Evaluation metrics of the WinCLIP protocol (docs/method.md §9, docs/evaluation.md).

Image level: AUROC, AUPR (average precision), F1-max. Pixel level: AUROC, PRO (AUPRO up to
FPR 0.3), F1-max. Pure numpy (+ cv2 for connected components) so the runtime can score itself
without scikit-learn; the image metrics follow sklearn's definitions exactly (tied scores form
one step of the curve). A full MVTec class has ~10^8 pixels, too many to sort in memory, so
`PixelMetrics` streams them into fixed-size histograms; `pixel_auroc_exact` and `pro_exact`
are the slow, exact references it is tested against. All values are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import cv2
import numpy as np

from ..errors import WinclipError

PRO_FPR_LIMIT = 0.3  # PRO is integrated over FPR in [0, 0.3], then divided by 0.3 (MVTec-AD)
DEFAULT_BINS = 10_000  # binning error ~1e-4 for scores spread over the range (PixelMetrics)
DEFAULT_SCORE_RANGE = (0.0, 1.0)  # WinCLIP anomaly maps are probabilities
REGION_CONNECTIVITY = 8  # a defect region is an 8-connected blob, as in the MVTec-AD reference code

IMAGE_KEYS = ("image_auroc", "image_aupr", "image_f1max")
PIXEL_KEYS = ("pixel_auroc", "pixel_pro", "pixel_f1max")

MapStack = Union[Sequence[np.ndarray], np.ndarray]  # [N][H, W] per-image maps or masks


class MetricError(WinclipError, ValueError):
    """Inputs for which a metric is undefined: one class only, NaN scores, mismatched shapes."""


# ----------------------------------------------------------------------------- validation


def _require_both_classes(n_pos: int, n_neg: int, what: str) -> None:
    """AUROC, AP and PRO divide by both class counts: refuse instead of returning NaN."""
    missing = [name for name, n in (("anomalous", n_pos), ("normal", n_neg)) if n == 0]
    if missing:
        raise MetricError(
            f"no {' and no '.join(missing)} {what} (found {n_pos} anomalous, {n_neg} normal): "
            f"the metric needs both normal and anomalous {what}"
        )


def _check_nan(scores: np.ndarray, what: str) -> None:
    n_nan = int(np.isnan(scores).sum())
    if n_nan:
        raise MetricError(f"{n_nan} of {scores.size} {what} scores are NaN")


def _check_labels_scores(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (bool labels, float64 scores) after checking shape, label values, NaN and classes."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape:
        raise MetricError(f"labels and scores must be 1-D of equal length; got shapes {y.shape} and {s.shape}")
    invalid = ~np.isin(y, (0, 1))
    if invalid.any():
        raise MetricError(f"labels must be 0 (normal) or 1 (anomalous); found {np.unique(y[invalid])[:5].tolist()}")
    _check_nan(s, what)
    y = y.astype(bool)
    n_pos = int(y.sum())
    _require_both_classes(n_pos, y.size - n_pos, what)
    return y, s


def _check_map_mask(anomaly_map: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (float64 map, bool mask) of one image; any non-zero mask value is anomalous (MVTec: 255)."""
    m = np.asarray(anomaly_map, dtype=np.float64)
    g = np.asarray(mask)
    if m.ndim != 2 or m.shape != g.shape:
        raise MetricError(f"anomaly map and mask must be 2-D of equal shape; got {m.shape} and {g.shape}")
    _check_nan(m, "pixel")
    return m, g != 0


def _check_stacks(maps: MapStack, masks: MapStack) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(maps) != len(masks):
        raise MetricError(f"got {len(maps)} anomaly maps but {len(masks)} masks")
    return [_check_map_mask(m, g) for m, g in zip(maps, masks)]


# ----------------------------------------------------------------------------- curves


def _step_ends(sorted_desc: np.ndarray) -> np.ndarray:
    """Index of the last element of each run of equal scores: one curve point per distinct threshold."""
    return np.r_[np.flatnonzero(np.diff(sorted_desc)), sorted_desc.size - 1]


def _ranked_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true, false) positive counts at each distinct score, highest first (sklearn's
    `_binary_clf_curve`), so tied scores move the curve diagonally and count half in AUROC."""
    order = np.argsort(s, kind="mergesort")[::-1]
    ends = _step_ends(s[order])
    tps = np.cumsum(y[order])[ends]
    return tps, ends + 1 - tps


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    # Written out because np.trapz / np.trapezoid differ across the supported numpy versions.
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _roc_auc(tps: np.ndarray, fps: np.ndarray) -> float:
    """Area under the ROC curve through (0, 0) and the cumulative counts (last entry = class totals)."""
    return _trapezoid(np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1])


def _f1_max(tps: np.ndarray, fps: np.ndarray, n_pos: int) -> float:
    """Max F1 over thresholds; 2TP / (2TP + FP + FN) needs no guard for precision 0/0."""
    return float(np.max(2.0 * tps / (tps + fps + n_pos)))


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under a non-decreasing curve from x = 0 to `limit`, the curve being
    interpolated linearly exactly at `limit` (MVTec-AD's `trapezoid(..., x_max=0.3)`)."""
    n_in = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit; x[0] = 0
    xs, ys = x[:n_in], y[:n_in]
    if n_in < x.size:
        x0, x1, y0, y1 = x[n_in - 1], x[n_in], y[n_in - 1], y[n_in]
        xs = np.r_[xs, limit]
        ys = np.r_[ys, y0 + (y1 - y0) * (limit - x0) / (x1 - x0)]
    return _trapezoid(xs, ys)


def _pro_auc(fpr: np.ndarray, overlap: np.ndarray, fpr_limit: float) -> float:
    """Normalised area under the PRO curve (mean region overlap vs. FPR) for FPR <= fpr_limit."""
    return _area_up_to(np.r_[0.0, fpr], np.r_[0.0, overlap], fpr_limit) / fpr_limit


def _chord_error(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Bound on |exact - binned| area: inside a bin the exact (monotone) curve and the binned chord
    both lie in the rectangle between consecutive binned points, so sum those rectangles."""
    x_in = np.minimum(np.r_[0.0, x], limit)
    return float(np.sum(np.diff(x_in) * np.diff(np.r_[0.0, y])) / limit)


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per pixel 1 / area of its defect region (0 on normal pixels), and the number of regions.

    Summing these weights over the pixels above a threshold gives the sum over regions of the
    fraction of the region detected, so PRO needs one weighted histogram, not one per region.
    """
    n_labels, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=REGION_CONNECTIVITY)
    areas = np.bincount(labels.ravel(), minlength=n_labels)
    inv_area = np.r_[0.0, 1.0 / areas[1:]]  # label 0 is the background
    return inv_area[labels], n_labels - 1


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise MetricError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")


# ----------------------------------------------------------------------------- image level


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (= sklearn.metrics.roc_auc_score); labels 0 normal / 1 anomalous."""
    return _roc_auc(*_ranked_counts(*_check_labels_scores(labels, scores, "samples")))


def image_aupr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, sum of (R_k - R_k-1) * P_k (= sklearn.metrics.average_precision_score);
    a step sum, not a trapezoid, so it is not optimistic between thresholds."""
    tps, fps = _ranked_counts(*_check_labels_scores(labels, scores, "samples"))
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds of the precision-recall curve (the paper's F1-max)."""
    y, s = _check_labels_scores(labels, scores, "samples")
    tps, fps = _ranked_counts(y, s)
    return _f1_max(tps, fps, int(y.sum()))


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The three image-level metrics under the keys of IMAGE_KEYS."""
    values = (image_auroc(labels, scores), image_aupr(labels, scores), f1_max(labels, scores))
    return dict(zip(IMAGE_KEYS, values))


# ----------------------------------------------------------------------------- pixel level, exact


def pixel_auroc_exact(maps: MapStack, masks: MapStack) -> float:
    """Pixel AUROC over all pixels of all images, exact (sorts every pixel: small inputs only)."""
    pairs = _check_stacks(maps, masks)
    scores = np.concatenate([m.ravel() for m, _ in pairs])
    labels = np.concatenate([g.ravel() for _, g in pairs])
    return _roc_auc(*_ranked_counts(*_check_labels_scores(labels, scores, "pixels")))


def pro_exact(maps: MapStack, masks: MapStack, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Normalised area under the PRO curve up to `fpr_limit`, exact: one curve point per distinct
    score, regions = 8-connected blobs of each mask, FPR over normal pixels of all images."""
    _check_fpr_limit(fpr_limit)
    pairs = _check_stacks(maps, masks)
    region_weights = [_region_weights(g) for _, g in pairs]
    n_regions = sum(n for _, n in region_weights)
    scores = np.concatenate([m.ravel() for m, _ in pairs])
    normal = np.concatenate([~g.ravel() for _, g in pairs])
    weights = np.concatenate([w.ravel() for w, _ in region_weights])
    n_normal = int(normal.sum())
    _require_both_classes(normal.size - n_normal, n_normal, "pixels")
    order = np.argsort(scores, kind="mergesort")[::-1]
    ends = _step_ends(scores[order])
    fpr = np.cumsum(normal[order])[ends] / n_normal
    overlap = np.cumsum(weights[order])[ends] / n_regions
    return _pro_auc(fpr, overlap, fpr_limit)


# ----------------------------------------------------------------------------- pixel level, streaming


class PixelMetrics:
    """Streaming pixel AUROC / PRO / F1-max for a whole class in O(n_bins) memory.

    Binning approximation: scores are clipped into `score_range` and counted in `n_bins` equal
    bins; the thresholds are the bin edges. Each bin edge splits the pixels exactly where some
    real threshold would, so every binned curve point lies on the exact curve and the binned
    curve is a chord approximation of it: the area error is at most the sum, over bins, of the
    rectangle between consecutive binned points (for AUROC, sum_b a_b * n_b with a_b, n_b the
    fractions of anomalous / normal pixels in bin b). Binned F1-max never exceeds the exact one.
    `error_bounds()` computes all three bounds from the histograms. Scores spread over the range
    give ~1e-4 with the default 10_000 bins; scores squeezed into few bins (a range much wider
    than the maps, or many values clipped) give large bounds.

    Usage: `pm = PixelMetrics(); for m, g in data: pm.update(m, g); pm.compute()`.
    """

    def __init__(
        self,
        n_bins: int = DEFAULT_BINS,
        score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
        fpr_limit: float = PRO_FPR_LIMIT,
    ) -> None:
        low, high = score_range
        if n_bins < 1 or not high > low:
            raise MetricError(f"need n_bins >= 1 and score_range low < high; got {n_bins} and {score_range}")
        _check_fpr_limit(fpr_limit)
        self.n_bins = n_bins
        self.score_range = (float(low), float(high))
        self.fpr_limit = fpr_limit
        self._anomalous = np.zeros(n_bins, np.int64)  # anomalous-pixel count per bin
        self._normal = np.zeros(n_bins, np.int64)  # normal-pixel count per bin
        self._overlap = np.zeros(n_bins, np.float64)  # sum of 1 / region area per bin (see _region_weights)
        self._n_regions = 0

    def update(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        """Add one image: float anomaly map [H, W] and its ground-truth mask [H, W] (bool or 0/255)."""
        m, g = _check_map_mask(anomaly_map, mask)
        low, high = self.score_range
        bins = ((np.clip(m, low, high) - low) * (self.n_bins / (high - low))).astype(np.intp)
        bins = np.minimum(bins, self.n_bins - 1)  # the top edge `high` belongs to the last bin
        weights, n_regions = _region_weights(g)
        self._anomalous += np.bincount(bins[g], minlength=self.n_bins)
        self._normal += np.bincount(bins[~g], minlength=self.n_bins)
        self._overlap += np.bincount(bins[g], weights=weights[g], minlength=self.n_bins)
        self._n_regions += n_regions

    def _curves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Cumulative anomalous / normal counts and overlap sums per threshold, highest bin first."""
        tps = np.cumsum(self._anomalous[::-1])
        fps = np.cumsum(self._normal[::-1])
        _require_both_classes(int(tps[-1]), int(fps[-1]), "pixels")
        return tps, fps, np.cumsum(self._overlap[::-1]), int(tps[-1])

    def compute(self) -> dict[str, float]:
        """`pixel_auroc`, `pixel_pro`, `pixel_f1max` over every pixel added so far."""
        tps, fps, overlap, n_pos = self._curves()
        return {
            "pixel_auroc": _roc_auc(tps, fps),
            "pixel_pro": _pro_auc(fps / fps[-1], overlap / self._n_regions, self.fpr_limit),
            "pixel_f1max": _f1_max(tps, fps, n_pos),
        }

    def error_bounds(self) -> dict[str, float]:
        """Upper bounds on |binned - exact| for each value of `compute()` (see the class docstring).

        F1-max: a threshold inside bin b detects at most all its anomalous pixels and at least none
        of its normal ones, so 2(T_b) / (T_b + F_b-1 + P) bounds the exact F1 reachable there.
        """
        tps, fps, overlap, n_pos = self._curves()
        fps_above = fps - self._normal[::-1]  # normal pixels above bin b, none of bin b
        f1_reachable = float(np.max(2.0 * tps / (tps + fps_above + n_pos)))
        return {
            "pixel_auroc": _chord_error(fps / fps[-1], tps / n_pos, 1.0),
            "pixel_pro": _chord_error(fps / fps[-1], overlap / self._n_regions, self.fpr_limit),
            "pixel_f1max": f1_reachable - _f1_max(tps, fps, n_pos),
        }
