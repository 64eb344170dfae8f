"""Every vectorised formula of docs/method.md (§3, §5-§7) against a slow loop version."""
import numpy as np
import pytest

from winclip_edge.scoring import (ScoringOptions, aggregate_windows, association, class_scores, combine_maps,
                                  score_batch, zero_shot_map)
from winclip_edge.windows import window_cover_mask, window_layout, window_token_index


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_class_scores_is_the_two_class_softmax():
    rng = np.random.default_rng(0)
    f, tn, ta = _unit(rng, 5, 8), _unit(rng, 8), _unit(rng, 8)
    for i in range(5):
        en, ea = np.exp(f[i] @ tn / 0.07), np.exp(f[i] @ ta / 0.07)
        assert class_scores(f[i:i + 1], tn, ta)[0] == pytest.approx(ea / (en + ea), rel=1e-6)
    assert class_scores(f, tn, ta, temperature=1.0)[0] == pytest.approx(
        np.exp(f[0] @ ta) / (np.exp(f[0] @ tn) + np.exp(f[0] @ ta)), rel=1e-6)


def _harmonic_by_loops(scores, grid, k, stride, mean="harmonic"):
    """For each token: the windows covering it, then their harmonic (or arithmetic) mean."""
    cover = window_cover_mask(grid, k, stride)  # [W, h*w]
    out = np.zeros((scores.shape[0], grid[0] * grid[1]))
    for n in range(scores.shape[0]):
        for token in range(grid[0] * grid[1]):
            covering = [scores[n, w] for w in range(cover.shape[0]) if cover[w, token]]
            if mean == "harmonic":
                out[n, token] = len(covering) / sum(1.0 / s for s in covering)
            else:
                out[n, token] = sum(covering) / len(covering)
    return out.reshape(scores.shape[0], *grid)


@pytest.mark.parametrize("grid,k,stride", [((15, 15), 2, 1), ((15, 15), 3, 1), ((6, 8), 2, 1), ((6, 8), 3, 2),
                                           ((7, 5), 4, 1), ((9, 9), 3, 3)])
@pytest.mark.parametrize("mean", ["harmonic", "arithmetic"])
def test_aggregation_equals_loops(grid, k, stride, mean):
    rng = np.random.default_rng(1)
    rows, cols = window_layout(grid, k, stride)
    scores = rng.uniform(0.01, 1.0, (2, len(rows) * len(cols)))
    np.testing.assert_allclose(aggregate_windows(scores, grid, k, stride, mean),
                               _harmonic_by_loops(scores, grid, k, stride, mean), rtol=1e-5)


def test_aggregation_keeps_location():
    """One hot window in a corner must light up that corner, not a transposed or flipped one."""
    grid, k = (6, 8), 2
    rows, cols = window_layout(grid, k, 1)
    scores = np.full((1, len(rows) * len(cols)), 0.1)
    scores[0, 0 * len(cols) + (len(cols) - 1)] = 0.9  # top-right window
    m = aggregate_windows(scores, grid, k)[0]
    assert m.shape == grid
    assert np.unravel_index(m.argmax(), grid) in {(0, 7), (0, 6), (1, 7), (1, 6)}
    assert m[0, 7] > m[5, 0] and m[0, 7] > m[0, 0] and m[0, 7] > m[5, 7]


def test_zero_shot_map_formula():
    rng = np.random.default_rng(2)
    s_img = rng.uniform(0.1, 1, 3)
    m2, m3 = rng.uniform(0.1, 1, (3, 4, 5)), rng.uniform(0.1, 1, (3, 4, 5))
    z = zero_shot_map(s_img, [m2, m3])
    for n in range(3):
        for i in range(4):
            for j in range(5):
                assert z[n, i, j] == pytest.approx(3 / (1 / s_img[n] + 1 / m2[n, i, j] + 1 / m3[n, i, j]), rel=1e-5)
    np.testing.assert_allclose(zero_shot_map(s_img, [m2, m3], use_image_scale=False), 2 / (1 / m2 + 1 / m3), rtol=1e-5)
    np.testing.assert_allclose(zero_shot_map(s_img, [m2], mean="arithmetic"), (m2 + s_img[:, None, None]) / 2, rtol=1e-5)
    np.testing.assert_allclose(combine_maps([m2]), m2, rtol=1e-6)


def test_association_equals_loops():
    rng = np.random.default_rng(3)
    q, mem = _unit(rng, 2, 7, 6), _unit(rng, 11, 6)
    a = association(q, mem)
    for n in range(2):
        for i in range(7):
            assert a[n, i] == pytest.approx(min((1 - q[n, i] @ r) / 2 for r in mem), abs=1e-6)
    assert association(mem[None, :3], mem)[0] == pytest.approx(np.zeros(3), abs=1e-6)  # a reference matches itself


def _score_by_loops(outputs, tn, ta, grid, scales, mem_windows, mem_patches, T=0.07):
    """WinCLIP+ written out: per-token loops over covering windows and over all references."""
    h, w = grid
    s_img = np.array([class_scores(e[None], tn, ta, T)[0] for e in outputs["image_embedding"]])
    n = len(s_img)
    final, image = np.zeros((n, h, w)), np.zeros(n)
    for b in range(n):
        zs, vis = [], [np.array([min((1 - p @ r) / 2 for r in mem_patches) for p in outputs["patch_tokens"][b]]).reshape(h, w)]
        for k in scales:
            emb = outputs[f"window_embeddings_k{k}"][b]
            s = np.array([class_scores(e[None], tn, ta, T)[0] for e in emb])
            a = np.array([min((1 - e @ r) / 2 for r in mem_windows[k]) for e in emb])
            zs.append(_harmonic_by_loops(s[None], grid, k, 1)[0])
            vis.append(_harmonic_by_loops(a[None], grid, k, 1)[0])
        z = (1 + len(scales)) / (1 / s_img[b] + sum(1 / m for m in zs))
        v = sum(vis) / len(vis)
        final[b] = (z + v) / 2
        image[b] = (s_img[b] + v.max()) / 2
    return image, final


def test_score_batch_few_shot_equals_loops():
    rng = np.random.default_rng(4)
    grid, scales, d, c = (5, 6), (2, 3), 8, 10
    counts = {k: len(window_token_index(grid, k, 1)) for k in scales}
    outputs = {"image_embedding": _unit(rng, 2, d), "patch_tokens": _unit(rng, 2, 30, c),
               **{f"window_embeddings_k{k}": _unit(rng, 2, counts[k], d) for k in scales}}
    tn, ta = _unit(rng, d), _unit(rng, d)
    mem_windows = {k: _unit(rng, 3 * counts[k], d) for k in scales}
    mem_patches = _unit(rng, 3 * 30, c)
    got = score_batch(outputs, tn, ta, grid, 1, scales, ScoringOptions(), mem_windows, mem_patches)
    image, final = _score_by_loops(outputs, tn, ta, grid, scales, mem_windows, mem_patches)
    np.testing.assert_allclose(got.image_score, image, rtol=1e-5)
    np.testing.assert_allclose(got.token_map, final, rtol=1e-5)
    zero = score_batch(outputs, tn, ta, grid, 1, scales, ScoringOptions(use_memory=False), mem_windows, mem_patches)
    np.testing.assert_allclose(zero.image_score, got.zero_shot_score)
    with pytest.raises(ValueError, match="not in the bundle"):
        score_batch(outputs, tn, ta, grid, 1, scales, ScoringOptions(scales=(4,)))
