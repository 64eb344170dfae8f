"""Overlay banners fit the image: measured with cv2.getTextSize, wrapped and scaled to the width, at 64, 250 and
4000 px wide and for every verdict word; they show score, threshold and verdict."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from winclip_edge.heatmap import (BANNER_FONT, BANNER_MARGIN, MIN_READABLE_SCALE, banner_layout, draw_banner,
                                  overlay)
from winclip_edge.inspector import InspectionResult
from winclip_edge.results import decision_text, write_overlay
from winclip_edge.verdicts import VERDICTS, verdict_of

WIDTHS = (64, 250, 4000)
HEIGHTS = (64, 250, 3000)
SCORE, THRESHOLD = 0.318, 0.2951


def parts_for(verdict) -> list:
    return [f"score {SCORE:.4f}", f"threshold {THRESHOLD:.4f}", (verdict.word, verdict.colour_bgr)]


def text_columns(banner: np.ndarray) -> np.ndarray:
    """The columns of a banner where any text pixel is lit."""
    return np.flatnonzero(banner.max(axis=(0, 2)) > 0)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("height", HEIGHTS)
@pytest.mark.parametrize("key", sorted(VERDICTS))
def test_every_line_is_measured_inside_the_width(width, height, key):
    layout = banner_layout(parts_for(VERDICTS[key]), width, height)
    for line in layout.lines:
        text = "  ".join(t for t, _ in line)
        (w, _), _ = cv2.getTextSize(text, BANNER_FONT, layout.scale, layout.thickness)
        assert w <= width - 2 * BANNER_MARGIN, (text, w, width)
    words = [w for line in layout.lines for t, _ in line for w in t.split()]
    assert words == f"score {SCORE:.4f} threshold {THRESHOLD:.4f} {VERDICTS[key].word}".split(), "nothing is lost"


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("key", sorted(VERDICTS))
def test_drawn_text_stays_off_the_edges(width, key):
    banner = draw_banner(parts_for(VERDICTS[key]), width, 250)
    columns = text_columns(banner)
    assert columns.size, "the banner shows text"
    assert columns.min() >= BANNER_MARGIN // 2 and columns.max() < width - BANNER_MARGIN // 2, (columns.min(), columns.max())
    rows = np.flatnonzero(banner.max(axis=(1, 2)) > 0)
    assert rows.min() > 0 and rows.max() < banner.shape[0] - 1, "nor off the top or bottom"


def test_the_old_fixed_size_banner_was_clipped():
    """The check above can fail: the label drawn at the old fixed size runs off a 250 px image."""
    banner = np.zeros((18, 250, 3), np.uint8)
    cv2.putText(banner, f"score {SCORE:.4f}  threshold {THRESHOLD:.4f}  ANOMALOUS", (4, 13), BANNER_FONT, 0.6,
                (255, 255, 255), 1, cv2.LINE_AA)
    assert text_columns(banner).max() >= 250 - BANNER_MARGIN // 2


def test_wide_images_get_one_line_narrow_ones_wrap_at_a_readable_size():
    parts = parts_for(VERDICTS["anomalous"])
    wide = banner_layout(parts, 4000, 3000)
    assert len(wide.lines) == 1 and wide.scale > 2
    assert len(banner_layout(parts, 4000, 250).lines) == 1
    at_250 = banner_layout(parts, 250, 250)
    assert len(at_250.lines) >= 2 and at_250.scale >= MIN_READABLE_SCALE
    tiny = banner_layout(parts, 64, 64)
    assert len(tiny.lines) >= 3  # every word still there (checked above), drawn small enough to fit


def test_overlay_stacks_the_banner_above_the_unchanged_image_size():
    image = np.full((250, 250, 3), 128, np.uint8)
    heat = np.linspace(0, 1, 250 * 250, dtype=np.float32).reshape(250, 250)
    out = overlay(image, heat, parts_for(VERDICTS["normal"]), (0.0, 1.0))
    banner = draw_banner(parts_for(VERDICTS["normal"]), 250, 250)
    assert out.shape == (250 + banner.shape[0], 250, 3)
    np.testing.assert_array_equal(out[: banner.shape[0]], banner)
    assert overlay(image, heat, "score 0.1", (0.0, 1.0)).shape[1] == 250  # a plain label still works


def test_verdict_words_come_from_one_table():
    assert {verdict_of(a).key for a in (True, False, None)} == set(VERDICTS)
    assert [decision_text(a) for a in (True, False, None)] == ["ANOMALOUS", "normal", "no threshold"]


@pytest.mark.parametrize("anomalous, threshold", [(True, THRESHOLD), (False, 0.5), (None, None)])
def test_write_overlay_shows_score_threshold_and_verdict(tmp_path, monkeypatch, anomalous, threshold):
    import winclip_edge.results as results

    seen = {}
    real = results.overlay

    def spy(image, heat, parts, value_range, roi=None):
        seen["parts"] = parts
        return real(image, heat, parts, value_range, roi=roi)

    monkeypatch.setattr(results, "overlay", spy)
    r = InspectionResult(path="a.png", score=SCORE, anomalous=anomalous, threshold=threshold,
                         anomaly_map=np.zeros((64, 64), np.float32), image=np.zeros((64, 64, 3), np.uint8))
    write_overlay(tmp_path / "a.png", r)
    texts = [p if isinstance(p, str) else p[0] for p in seen["parts"]]
    want = [f"score {SCORE:.4f}", *([f"threshold {threshold:.4f}"] if threshold is not None else []),
            decision_text(anomalous)]
    assert texts == want
    picture = cv2.imread(str(tmp_path / "a.png"))
    assert picture.shape[1] == 64 and picture.shape[0] > 64
