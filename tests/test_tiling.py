"""Tile geometry, the auto size rule and smooth-window stitching (winclip_edge/tiles/tiling.py)."""
from __future__ import annotations

import numpy as np
import pytest

from winclip_edge.heatmap import upsample_map
from winclip_edge.tiles.tiling import (AUTO, TilingConfig, TilingError, auto_tile_size, axis_starts, is_whole_frame,
                                 parse_tile, smooth_window, stitch, tile_boxes)


@pytest.mark.parametrize("length", [1, 2, 7, 239, 240, 241, 479, 480, 481, 1000, 2047, 2048, 2449])
@pytest.mark.parametrize("tile", [1, 16, 240, 333, 480])
@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_axis_starts_cover_every_pixel_with_the_overlap(length, tile, overlap):
    starts = axis_starts(length, tile, overlap)
    covered = np.zeros(length, int)
    for s in starts:
        covered[s:s + min(tile, length)] += 1
    assert covered.min() >= 1
    assert starts[0] == 0 and min(tile, length) + starts[-1] == length  # no tile leaves the frame
    assert starts == sorted(set(starts))
    if len(starts) > 1:
        shared = min(tile - (b - a) for a, b in zip(starts, starts[1:]))
        assert shared >= int(np.ceil(overlap * tile)) - 1  # at least the asked overlap (integer pixels)
        # the fewest tiles: one tile less could not cover the axis with that stride
        step = max(1, int(np.floor(tile * (1 - overlap))))
        assert (len(starts) - 2) * step + tile < length


@pytest.mark.parametrize("frame", [(1, 1), (5, 3000), (2048, 2048), (2047, 2449), (100, 80), (481, 479)])
@pytest.mark.parametrize("tile", [(240, 240), (480, 480), (96, 128), (3, 5)])
def test_tile_boxes_cover_the_frame_row_major(frame, tile):
    boxes, (rows, cols) = tile_boxes(frame, tile, 0.25)
    assert len(boxes) == rows * cols
    covered = np.zeros(frame, bool)
    for t, l, h, w in boxes:
        assert 0 <= t and 0 <= l and t + h <= frame[0] and l + w <= frame[1]
        assert (h, w) == (min(tile[0], frame[0]), min(tile[1], frame[1]))
        covered[t:t + h, l:l + w] = True
    assert covered.all()
    assert boxes == sorted(boxes)  # row-major: positions are stable across frames of one size


def test_frame_smaller_than_a_tile_is_one_whole_frame_tile():
    boxes, grid = tile_boxes((300, 200), (480, 480), 0.25)
    assert boxes == [(0, 0, 300, 200)] and grid == (1, 1) and is_whole_frame(boxes, (300, 200))
    boxes, grid = tile_boxes((300, 1000), (480, 480), 0.25)
    assert grid == (1, 3) and not is_whole_frame(boxes, (300, 1000))


def test_auto_tile_size_keeps_the_defect_one_patch_wide():
    # ViT-B-16-plus-240: 240 px input, 15x15 grid -> 16-px patches; a 32-px defect spans a patch on a 480-px tile
    assert auto_tile_size(32, (240, 240), (15, 15)) == 480
    assert auto_tile_size(20, (224, 224), (7, 7)) == 140
    cfg = TilingConfig(tile=AUTO, min_defect=24)
    th, tw = cfg.tile_shape((240, 240), (15, 15))
    assert (th, tw) == (360, 360)
    assert 24 * 240 / th == pytest.approx(16)  # the defect's size at the model input is one patch
    assert TilingConfig(tile=100).tile_shape((96, 128), (6, 8)) == (100, 133)  # the model's aspect ratio


def test_settings_are_checked_and_parsed():
    for bad in (dict(tile=0), dict(tile=-5), dict(tile="big"), dict(tile=True), dict(overlap=-0.1),
                dict(overlap=0.95), dict(memory="nearest"), dict(min_defect=0)):
        with pytest.raises(TilingError):
            TilingConfig(**bad)
    assert parse_tile("480") == 480 and parse_tile("AUTO") == AUTO and parse_tile("off") is None
    with pytest.raises(TilingError):
        parse_tile("48o")
    cfg = TilingConfig(tile=480, overlap=0.5, use_global=False, memory="pooled")
    assert TilingConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.with_overrides(tile=None, overlap=0.1) == TilingConfig(480, 0.1, False, "pooled")


def test_smooth_window_is_positive_and_peaks_in_the_centre():
    w = smooth_window(7, 10)
    assert w.shape == (7, 10) and w.min() > 0
    assert np.unravel_index(w.argmax(), w.shape) in {(3, 4), (3, 5)}
    assert np.allclose(w, w[::-1, ::-1])


def test_single_tile_stitch_equals_the_untiled_map_exactly():
    rng = np.random.default_rng(0)
    token_map = rng.random((15, 15)).astype(np.float32)
    stitched, covered = stitch([token_map], [(0, 0, 333, 517)], (333, 517))
    assert covered.all() and stitched.dtype == np.float32
    assert np.array_equal(stitched, upsample_map(token_map, (333, 517)))


def test_stitch_averages_overlaps_smoothly_and_keeps_each_tile_where_it_is_alone():
    frame = (100, 170)
    boxes, _ = tile_boxes(frame, (100, 100), 0.25)
    assert len(boxes) == 2
    maps = [np.full((15, 15), 0.2, np.float32), np.full((15, 15), 0.8, np.float32)]
    out, covered = stitch(maps, boxes, frame)
    assert covered.all()
    left_only, right_only = boxes[1][1], boxes[0][1] + boxes[0][3]  # the overlap is [left_only, right_only)
    assert np.allclose(out[:, :left_only], 0.2) and np.allclose(out[:, right_only:], 0.8)
    row = out[50, left_only:right_only]
    assert np.all(np.diff(row) >= -1e-6) and row[0] < 0.5 < row[-1]  # a smooth ramp, not a seam


def test_stitch_places_each_tile_where_it_belongs():
    """A peak in the tile at the bottom right must come out at the bottom right (not flipped, not flat)."""
    frame = (600, 900)
    boxes, (rows, cols) = tile_boxes(frame, (240, 240), 0.25)
    maps = [np.zeros((15, 15), np.float32) for _ in boxes]
    maps[-1][10, 12] = 1.0  # token (10, 12) of the last tile
    out, _ = stitch(maps, boxes, frame)
    t, l, h, w = boxes[-1]
    expected = (t + (10 + 0.5) * h / 15, l + (12 + 0.5) * w / 15)
    peak = np.unravel_index(out.argmax(), out.shape)
    assert abs(peak[0] - expected[0]) <= h / 15 and abs(peak[1] - expected[1]) <= w / 15
