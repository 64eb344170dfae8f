"""score_batch with every non-default scoring option against a loop reference written from the formulas.

The reference below uses no function of winclip_edge.scoring: the two-class softmax is written with exp, the
windows covering a token are found by scanning every window, the means are written out. Each option is also
checked to change the answer, so a score_batch that ignored it could not pass.
"""
from __future__ import annotations

import numpy as np
import pytest

from winclip_edge.scoring import ScoringOptions, score_batch
from winclip_edge.windows import window_count, window_starts, window_token_index


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax_anomalous(e, tn, ta, temperature):
    en, ea = np.exp(e @ tn / temperature), np.exp(e @ ta / temperature)
    return ea / (en + ea)


def _mean(values, mean):
    values = list(values)
    return len(values) / sum(1.0 / v for v in values) if mean == "harmonic" else sum(values) / len(values)


def _token_map(window_values, grid, k, stride, mean):
    """Per token: every window whose k x k block contains it, then their mean."""
    h, w = grid
    rows, cols = list(window_starts(h, k, stride)), list(window_starts(w, k, stride))
    origins = [(r, c) for r in rows for c in cols]
    assert len(origins) == len(window_values)
    out = np.zeros(grid)
    for i in range(h):
        for j in range(w):
            covering = [v for (r, c), v in zip(origins, window_values) if r <= i < r + k and c <= j < c + k]
            out[i, j] = _mean(covering, mean)
    return out


def _reference(outputs, tn, ta, grid, stride, used, temperature, use_image_scale, mean, memory=None):
    """(image scores, token maps) of a batch, one image and one token at a time."""
    n = len(outputs["image_embedding"])
    images, maps = np.zeros(n), np.zeros((n, *grid))
    for b in range(n):
        s_img = _softmax_anomalous(outputs["image_embedding"][b], tn, ta, temperature)
        scale_maps = [_token_map([_softmax_anomalous(e, tn, ta, temperature)
                                  for e in outputs[f"window_embeddings_k{k}"][b]], grid, k, stride, mean)
                      for k in used]
        z = np.zeros(grid)
        for i in range(grid[0]):
            for j in range(grid[1]):
                z[i, j] = _mean([m[i, j] for m in scale_maps] + ([s_img] if use_image_scale else []), mean)
        if memory is None:
            images[b], maps[b] = s_img, z
            continue
        windows, patches = memory
        visual = [np.array([min((1 - p @ r) / 2 for r in patches) for p in outputs["patch_tokens"][b]]).reshape(grid)]
        for k in used:
            a = [min((1 - e @ r) / 2 for r in windows[k]) for e in outputs[f"window_embeddings_k{k}"][b]]
            visual.append(_token_map(a, grid, k, stride, mean))
        v = sum(visual) / len(visual)
        images[b], maps[b] = (s_img + v.max()) / 2, (z + v) / 2
    return images, maps


GRID, SCALES, D, C = (6, 7), (2, 3, 4), 8, 10


def _batch(stride, seed=0):
    rng = np.random.default_rng(seed)
    outputs = {"image_embedding": _unit(rng, 2, D), "patch_tokens": _unit(rng, 2, GRID[0] * GRID[1], C)}
    for k in SCALES:
        outputs[f"window_embeddings_k{k}"] = _unit(rng, 2, window_count(GRID, k, stride), D)
    memory = ({k: _unit(rng, 2 * window_count(GRID, k, stride), D) for k in SCALES}, _unit(rng, 40, C))
    return outputs, _unit(rng, D), _unit(rng, D), memory


OPTIONS = {
    "temperature": ScoringOptions(temperature=0.5),
    "scale subset": ScoringOptions(temperature=0.07, scales=(3,)),
    "no image scale": ScoringOptions(temperature=0.07, use_image_scale=False),
    "arithmetic mean": ScoringOptions(temperature=0.07, mean="arithmetic"),
    "all at once": ScoringOptions(temperature=0.2, scales=(4, 2), use_image_scale=False, mean="arithmetic"),
}


@pytest.mark.parametrize("few_shot", [False, True], ids=["zero-shot", "few-shot"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_score_batch_with_options_equals_the_loops(name, stride, few_shot):
    options = OPTIONS[name]
    outputs, tn, ta, memory = _batch(stride)
    used = options.scales or SCALES
    got = score_batch(outputs, tn, ta, GRID, stride, SCALES, options, *(memory if few_shot else (None, None)))
    image, maps = _reference(outputs, tn, ta, GRID, stride, used, options.temperature, options.use_image_scale,
                             options.mean, memory if few_shot else None)
    np.testing.assert_allclose(got.image_score, image, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.token_map, maps, rtol=1e-5, atol=1e-7)
    # the option matters: the defaults give another answer on the same batch
    default = score_batch(outputs, tn, ta, GRID, stride, SCALES, ScoringOptions(temperature=0.07),
                          *(memory if few_shot else (None, None)))
    assert np.abs(default.token_map - got.token_map).max() > 1e-3


def test_stride_changes_the_windows_and_the_map():
    """stride 2 on a 6x7 grid: origins 0, 2, (last) ... so the layout differs from stride 1."""
    assert list(window_starts(7, 3, 2)) == [0, 2, 4] and list(window_starts(6, 4, 2)) == [0, 2]
    assert list(window_starts(7, 2, 2)) == [0, 2, 4, 5]  # the last window always reaches the edge
    assert window_count(GRID, 2, 2) == 3 * 4 and window_count(GRID, 2, 1) == 5 * 6


@pytest.mark.parametrize("length", [1, 5, 15])
def test_a_window_as_large_as_the_grid(length):
    """k equal to the grid side: one origin (0), and that window holds every token."""
    assert list(window_starts(length, length, 1)) == [0]
    assert list(window_starts(length, length, length)) == [0]
    index = window_token_index((length, length), length, 1)
    assert index.shape == (1, length * length) and list(index[0]) == list(range(length * length))
    outputs = {"image_embedding": np.array([[1.0, 0.0]]), f"window_embeddings_k{length}": np.array([[[0.6, 0.8]]])}
    got = score_batch(outputs, np.array([1.0, 0.0]), np.array([0.0, 1.0]), (length, length), 1, (length,),
                      ScoringOptions(temperature=0.1, use_image_scale=False))
    window_score = _softmax_anomalous(np.array([0.6, 0.8]), np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.1)
    np.testing.assert_allclose(got.token_map, np.full((1, length, length), window_score), rtol=1e-6)


@pytest.mark.parametrize("corner", ["top_right", "bottom_left"])
def test_a_stride_2_bundle_end_to_end(make_bundle, tmp_path, corner):
    """Export at stride 2 (fewer windows), torch and ONNX Runtime agree, the Inspector's scores and maps equal the
    loop reference at stride 2, and a defect is found in its corner (a map laid out with stride 1 would not be)."""
    import shutil

    from conftest import textured_part
    from winclip_edge import EngineConfig, Inspector
    from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
    from winclip_edge.bundle import Bundle
    from winclip_edge.engines import create_engine
    from winclip_edge.products import load_text, save_memory

    path = shutil.copytree(make_bundle("tiny240", stride=2), tmp_path / "stride2")
    bundle = Bundle(path)
    grid, m = bundle.spec.grid, bundle.manifest
    assert m.stride == 2 and grid == (15, 15)
    size, corner_px = 240, 64
    top = 0 if corner.startswith("top") else size - corner_px
    left = 0 if corner.endswith("left") else size - corner_px
    images = np.stack([textured_part(seed=20, defect=(top, left, corner_px, corner_px)), textured_part(seed=21)])
    ort = create_engine(bundle, EngineConfig(backend="onnxruntime",
                                             options=OnnxRuntimeOptions(provider="cpu"))).run(images)
    ref = create_engine(bundle, EngineConfig(backend="torch", device="cpu")).run(images)
    for k in m.scales:
        assert ort[f"window_embeddings_k{k}"].shape[1] == window_count(grid, k, 2) < window_count(grid, k, 1)
    for name in ort:
        assert np.abs(ort[name] - ref[name]).max() < 1e-4, name

    inspector = Inspector(path, "widget", engine=EngineConfig(backend="onnxruntime",
                                                              options=OnnxRuntimeOptions(provider="cpu")))
    memory, failed = inspector.embed_references([textured_part(seed=s) for s in range(4)])
    assert not failed
    save_memory(inspector.bundle, "widget", memory)
    inspector = Inspector(path, "widget", engine=EngineConfig(backend="onnxruntime",
                                                              options=OnnxRuntimeOptions(provider="cpu")))
    text = load_text(bundle, "widget")
    windows = {k: memory.windows[k].reshape(-1, memory.windows[k].shape[-1]) for k in m.scales}
    patches = memory.patch_tokens.reshape(-1, memory.patch_tokens.shape[-1])
    image, maps = _reference(ort, text.t_normal, text.t_anomalous, grid, 2, m.scales, m.temperature, True, "harmonic",
                             (windows, patches))
    got = inspector.score(ort)
    np.testing.assert_allclose(got.image_score, image, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.token_map, maps, rtol=1e-4, atol=1e-6)
    result = inspector.inspect([images[0]])[0]
    assert result.score == pytest.approx(float(image[0]), abs=1e-5)
    y, x = np.unravel_index(result.anomaly_map.argmax(), result.anomaly_map.shape)
    assert (y < size // 2) == corner.startswith("top") and (x < size // 2) == corner.endswith("left"), (y, x)
