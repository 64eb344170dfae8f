import pytest

from winclip_edge.windows import window_count, window_cover_mask, window_starts, window_token_index


@pytest.mark.parametrize("grid,k,expected", [((15, 15), 2, 196), ((15, 15), 3, 169), ((7, 7), 2, 36), ((6, 8), 3, 24)])
def test_window_counts(grid, k, expected):
    assert window_count(grid, k, 1) == expected


def test_token_index_is_row_major_blocks():
    index = window_token_index((4, 5), 2, 1)
    assert index.shape == (12, 4)
    assert index[0].tolist() == [0, 1, 5, 6]
    assert index[1].tolist() == [1, 2, 6, 7]  # next window to the right
    assert index[4].tolist() == [5, 6, 10, 11]  # second row of windows (4 windows per row)


def test_stride_covers_every_token():
    assert window_starts(15, 2, 2).tolist() == [0, 2, 4, 6, 8, 10, 12, 13]
    for grid, k, s in [((15, 15), 2, 2), ((15, 15), 3, 2), ((7, 9), 3, 3)]:
        assert window_cover_mask(grid, k, s).any(0).all()


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="window scale"):
        window_starts(3, 4, 1)
    with pytest.raises(ValueError, match="stride"):
        window_starts(5, 2, 0)
    with pytest.raises(ValueError, match="stride"):
        window_starts(9, 2, 3)  # would leave tokens 2, 5 uncovered
