"""winclip_edge.evaluation.metrics against sklearn (image level) and slow loop references (pixel level)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from winclip_edge.evaluation.metrics import (
    IMAGE_KEYS,
    PIXEL_KEYS,
    MetricError,
    PixelMetrics,
    f1_max,
    image_aupr,
    image_auroc,
    image_metrics,
    pixel_auroc_exact,
    pro_exact,
)

IMAGE_TOL = 1e-9
EXACT_TOL = 1e-12  # float rounding only: both sides compute the same quantity
FINE_BOUND = 1e-3  # with the default 10_000 bins, the binning bound on the small maps below
COARSE_BINS = 16  # few enough bins that the binning error is visible
SIDE = 16  # small random maps, PRO brute force stays fast
SEEDS = range(5)


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def random_scores(rng: np.random.Generator, n: int, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)  # both classes present
    scores = rng.normal(labels * 0.7, 1.0)
    return labels, np.round(scores, 1) if tied else scores  # rounding makes many ties


def blob_masks(rng: np.random.Generator, n_images: int = 3) -> list[np.ndarray]:
    """n_images masks with 2-3 random ellipses each (some may touch and merge), plus one empty mask."""
    masks = []
    for _ in range(n_images):
        mask = np.zeros((SIDE, SIDE), np.uint8)
        for _ in range(rng.integers(2, 4)):
            center = tuple(int(c) for c in rng.integers(2, SIDE - 2, 2))
            axes = tuple(int(a) for a in rng.integers(1, 4, 2))
            cv2.ellipse(mask, center, axes, 0, 0, 360, 255, -1)
        masks.append(mask)
    return masks + [np.zeros((SIDE, SIDE), np.uint8)]


def noisy_maps(rng: np.random.Generator, masks: list[np.ndarray]) -> list[np.ndarray]:
    return [np.clip(0.4 * (m > 0) + rng.uniform(0, 0.6, m.shape), 0, 1).astype(np.float32) for m in masks]


def brute_force_pro(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """PRO with explicit loops over thresholds and regions (scipy labelling, not cv2)."""
    regions = []  # (image index, bool region mask)
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask > 0, structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, n + 1)]
    n_normal = sum(int((m == 0).sum()) for m in masks)
    points = [(0.0, 0.0)]
    for t in sorted({float(v) for m in maps for v in m.ravel()}, reverse=True):
        false_pos = sum(int(((a >= t) & (m == 0)).sum()) for a, m in zip(maps, masks))
        overlaps = [float((maps[i][r] >= t).mean()) for i, r in regions]
        points.append((false_pos / n_normal, sum(overlaps) / len(overlaps)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            x1, y1 = fpr_limit, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def flat(maps: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All pixels as (labels, scores), for the image-level references."""
    return np.concatenate([g.ravel() > 0 for g in masks]), np.concatenate([m.ravel() for m in maps])


def streamed(maps: list[np.ndarray], masks: list[np.ndarray], **kwargs) -> PixelMetrics:
    pm = PixelMetrics(**kwargs)
    for m, g in zip(maps, masks):
        pm.update(m, g)
    return pm


# ----------------------------------------------------------------------------- image level


def test_hand_cases():
    labels = np.array([0, 0, 1, 1])
    perfect = np.array([0.1, 0.2, 0.8, 0.9])
    assert image_metrics(labels, perfect) == dict.fromkeys(IMAGE_KEYS, 1.0)
    assert image_auroc(labels, -perfect) == 0.0
    assert image_auroc(labels, np.full(4, 0.5)) == 0.5
    assert image_aupr(labels, np.full(4, 0.5)) == 0.5  # precision = prevalence
    assert f1_max(labels, -perfect) == pytest.approx(2 / 3)  # best is "all anomalous"


@pytest.mark.parametrize("labels, missing", [([0, 0, 0], "no anomalous"), ([1, 1], "no normal")])
@pytest.mark.parametrize("metric", [image_auroc, image_aupr, f1_max])
def test_single_class_is_refused(metric, labels, missing):
    with pytest.raises(MetricError, match=f"{missing}.*needs both normal and anomalous"):
        metric(np.array(labels), np.linspace(0, 1, len(labels)))


def test_bad_inputs_are_refused():
    with pytest.raises(MetricError, match="2 of 4 samples scores are NaN"):
        image_auroc(np.array([0, 1, 0, 1]), np.array([0.1, np.nan, np.nan, 0.3]))
    with pytest.raises(MetricError, match="found \\[2\\]"):
        image_auroc(np.array([0, 1, 2]), np.zeros(3))
    with pytest.raises(MetricError, match="equal length"):
        image_auroc(np.array([0, 1]), np.zeros(3))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tied", [False, True])
def test_image_metrics_equal_sklearn(seed, tied):
    labels, scores = random_scores(np.random.default_rng(seed), 200, tied)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=IMAGE_TOL)
    assert image_aupr(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=IMAGE_TOL)
    assert f1_max(labels, scores) == pytest.approx(sklearn_f1_max(labels, scores), abs=IMAGE_TOL)


# ----------------------------------------------------------------------------- pixel level


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_pixel_metrics_equal_references(seed):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng)
    maps = [np.round(m, 2) for m in noisy_maps(rng, masks)]  # rounding: ties across regions
    assert pixel_auroc_exact(maps, masks) == pytest.approx(roc_auc_score(*flat(maps, masks)), abs=IMAGE_TOL)
    assert pro_exact(maps, masks) == pytest.approx(brute_force_pro(maps, masks), abs=EXACT_TOL)
    assert pro_exact(maps, masks, fpr_limit=1.0) == pytest.approx(brute_force_pro(maps, masks, 1.0), abs=EXACT_TOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_bins", [PixelMetrics().n_bins, COARSE_BINS])
def test_binned_pixel_metrics_within_their_bounds(seed, n_bins):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng)
    maps = noisy_maps(rng, masks)
    pm = streamed(maps, masks, n_bins=n_bins)
    values, bounds = pm.compute(), pm.error_bounds()
    exact = {
        "pixel_auroc": pixel_auroc_exact(maps, masks),
        "pixel_pro": pro_exact(maps, masks),
        "pixel_f1max": f1_max(*flat(maps, masks)),
    }
    assert set(values) == set(PIXEL_KEYS)
    for key in PIXEL_KEYS:
        assert abs(values[key] - exact[key]) <= bounds[key] + EXACT_TOL, key
        assert 0.0 <= values[key] <= 1.0
    assert values["pixel_f1max"] <= exact["pixel_f1max"] + EXACT_TOL  # binning only loses thresholds
    if n_bins != COARSE_BINS:
        assert max(bounds.values()) < FINE_BOUND


def test_binning_is_exact_for_scores_on_bin_edges():
    rng = np.random.default_rng(0)
    masks = blob_masks(rng)
    maps = [np.round(m * COARSE_BINS) / COARSE_BINS for m in noisy_maps(rng, masks)]
    pm = streamed(maps, masks, n_bins=COARSE_BINS + 1, score_range=(0.0, 1.0 + 1.0 / COARSE_BINS))
    assert pm.compute()["pixel_auroc"] == pytest.approx(pixel_auroc_exact(maps, masks), abs=EXACT_TOL)
    assert pm.compute()["pixel_pro"] == pytest.approx(pro_exact(maps, masks), abs=EXACT_TOL)


def test_perfect_map_and_order_independence():
    rng = np.random.default_rng(1)
    masks = blob_masks(rng)
    perfect = [(m > 0).astype(np.float32) for m in masks]
    assert streamed(perfect, masks).compute() == pytest.approx(dict.fromkeys(PIXEL_KEYS, 1.0), abs=EXACT_TOL)
    maps = noisy_maps(rng, masks)
    assert streamed(maps, masks).compute() == pytest.approx(streamed(maps[::-1], masks[::-1]).compute(), abs=EXACT_TOL)


def test_flipped_map_scores_clearly_worse():
    rng = np.random.default_rng(2)
    masks = [np.zeros((SIDE, SIDE), np.uint8) for _ in range(3)]
    for mask in masks:  # blobs on the left half only, so a left-right flip misses them
        cv2.circle(mask, (int(rng.integers(2, 5)), int(rng.integers(3, SIDE - 3))), 2, 255, -1)
    aligned = noisy_maps(rng, masks)
    flipped = [np.ascontiguousarray(m[:, ::-1]) for m in aligned]
    good, bad = streamed(aligned, masks).compute(), streamed(flipped, masks).compute()
    for key in ("pixel_auroc", "pixel_pro"):
        assert good[key] > 0.7 and bad[key] < good[key] - 0.3, (key, good[key], bad[key])


def test_pixel_inputs_are_checked():
    pm = PixelMetrics()
    with pytest.raises(MetricError, match="equal shape"):
        pm.update(np.zeros((4, 4), np.float32), np.zeros((4, 5), np.uint8))
    with pytest.raises(MetricError, match="1 of 16 pixel scores are NaN"):
        pm.update(np.where(np.eye(4, dtype=bool) & (np.arange(4) == 0), np.nan, 0.0), np.zeros((4, 4)))
    pm.update(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8))  # all-zero mask: normal pixels only
    with pytest.raises(MetricError, match="no anomalous pixels"):
        pm.compute()
    with pytest.raises(MetricError, match="no normal pixels"):
        pro_exact([np.zeros((2, 2))], [np.ones((2, 2), bool)])
    with pytest.raises(MetricError, match="fpr_limit"):
        PixelMetrics(fpr_limit=0.0)
