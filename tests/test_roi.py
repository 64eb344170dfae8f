"""ROI masks and rectangles (winclip_edge/tiles/roi.py): parsing, scaling to frames, token cells, storage."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from winclip_edge.bundle import Bundle
from winclip_edge.errors import WinclipError
from winclip_edge.tiles.roi import (ROI_FILE, ROI_MASK, Roi, RoiError, clear_roi, draw_outline, load_roi, mask_from_array,
                              parse_rect, parse_roi, read_mask, save_roi, token_mask)


def test_rectangles_are_parsed_and_clipped_to_the_frame():
    assert parse_rect("10, 20,30,40") == (10, 20, 30, 40)
    for bad in ("1,2,3", "a,b,c,d", "0,0,0,5", "-1,0,4,4"):
        with pytest.raises(RoiError):
            parse_rect(bad)
    inside = Roi(rect=(90, 40, 50, 100), source="r").for_frame((100, 120))
    assert inside.shape == (100, 120) and inside.sum() == 60 * 30
    assert inside[40, 90] and not inside[39, 90] and not inside[40, 89] and inside[99, 119]


def test_a_mask_of_any_size_is_scaled_to_each_frame():
    small = np.zeros((10, 20), np.uint8)
    small[:, 10:] = 255  # right half inspected
    roi = mask_from_array(small)
    for size in ((100, 200), (33, 71), (2048, 2448)):
        inside = roi.for_frame(size)
        assert inside.shape == size
        assert inside[:, -1].all() and not inside[:, 0].any()
        assert abs(inside.mean() - 0.5) < 0.05
    with pytest.raises(RoiError, match="all black"):
        mask_from_array(np.zeros((4, 4), np.uint8))
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = 255
    assert mask_from_array(colour).mask.sum() == 255


def test_bad_mask_files_are_one_line_errors(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    for path in (tmp_path / "text.png", tmp_path / "missing.png"):
        with pytest.raises(RoiError) as err:
            read_mask(path)
        assert "\n" not in str(err.value) and isinstance(err.value, WinclipError)
    good = np.zeros((8, 8), np.uint8)
    good[2:6, 2:6] = 200
    cv2.imwrite(str(tmp_path / "m.png"), good)
    assert parse_roi(str(tmp_path / "m.png")).mask.sum() == 16 * 255
    assert parse_roi("1,2,3,4").rect == (1, 2, 3, 4)


def test_token_cells_holding_any_roi_pixel_are_kept():
    inside = np.zeros((240, 240), bool)
    inside[0:20, 0:20] = True  # covers token (0, 0) and a corner of its neighbours on a 15x15 grid of 16 px
    cells = token_mask(inside, (0, 0, 240, 240), (15, 15))
    assert cells[0, 0] and cells[1, 1] and cells.sum() == 4
    cells = token_mask(inside, (120, 120, 120, 120), (15, 15))  # a box fully outside
    assert not cells.any()


def test_outline_is_drawn_on_the_roi_border_only():
    inside = np.zeros((100, 100), bool)
    inside[20:80, 30:70] = True
    out = draw_outline(np.zeros((100, 100, 3), np.uint8), inside)
    changed = out.any(-1)
    assert changed[20, 50] and changed[50, 30] and not changed[50, 50] and not changed[5, 5]


def test_the_product_roi_is_stored_checksummed_and_cleared(bundle_copy, tmp_path):
    bundle = Bundle(bundle_copy)
    assert load_roi(bundle, "widget") is None
    mask = np.zeros((30, 40), np.uint8)
    mask[5:25, 10:30] = 255
    save_roi(bundle, "widget", mask_from_array(mask, "m.png"))
    loaded = load_roi(bundle, "widget")
    assert np.array_equal(loaded.mask, mask) and loaded.identity == mask_from_array(mask).identity
    folder = bundle.product_dir("widget")
    cv2.imwrite(str(folder / ROI_MASK), 255 - mask)  # tampered with after it was stored
    with pytest.raises(WinclipError, match="checksum"):
        load_roi(bundle, "widget")
    save_roi(bundle, "widget", Roi(rect=(1, 2, 3, 4), source="1,2,3,4"))
    assert load_roi(bundle, "widget").rect == (1, 2, 3, 4)
    text = (folder / ROI_FILE).read_text().replace('"rect": [\n    1,', '"rect": [\n    9,')
    (folder / ROI_FILE).write_text(text)
    with pytest.raises(WinclipError, match="sha256"):
        load_roi(bundle, "widget")
    assert clear_roi(bundle, "widget") and load_roi(bundle, "widget") is None and not clear_roi(bundle, "widget")
