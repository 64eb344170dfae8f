"""The runtime end to end: ONNX Runtime vs the torch reference, location, orientation, thresholds."""
import numpy as np
import pytest

from conftest import textured_part
from winclip_edge import EngineConfig, Inspector
from winclip_edge.bundle import BundleError
from winclip_edge.calibration import CalibrationError, calibrate, choose_threshold
from winclip_edge.products import save_memory, save_threshold

CORNER = 64  # defect size in pixels


def _register(bundle_path, product, refs, backend="onnxruntime"):
    inspector = Inspector(bundle_path, product, engine=EngineConfig(backend=backend))
    memory, failed = inspector.embed_references(refs)
    assert not failed
    save_memory(inspector.bundle, product, memory)


def test_onnxruntime_equals_torch_reference(bundle_copy):
    refs = [textured_part(seed=s) for s in range(3)]
    tests = [textured_part(seed=10), textured_part(seed=11, defect=(0, 0, CORNER, CORNER))]
    _register(bundle_copy, "widget", refs)
    for zero_shot in (False, True):
        from winclip_edge.scoring import ScoringOptions

        options = ScoringOptions(use_memory=not zero_shot)
        ort = Inspector(bundle_copy, "widget", engine=EngineConfig(backend="onnxruntime"), options=options).inspect(tests)
        ref = Inspector(bundle_copy, "widget", engine=EngineConfig(backend="torch"), options=options).inspect(tests)
        for a, b in zip(ort, ref):
            assert a.error is None and b.error is None
            assert abs(a.score - b.score) < 1e-4
            assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-4


@pytest.mark.parametrize("corner", ["top_left", "top_right", "bottom_left", "bottom_right"])
def test_defect_is_located_in_its_corner(bundle_copy, corner):
    """Random weights still localise a foreign patch through the few-shot association.

    A transposed, flipped or flat map fails: each corner is checked separately."""
    h = w = 240
    top = 0 if corner.startswith("top") else h - CORNER
    left = 0 if corner.endswith("left") else w - CORNER
    _register(bundle_copy, "widget", [textured_part(seed=s) for s in range(4)])
    result = Inspector(bundle_copy, "widget").inspect([textured_part(seed=20, defect=(top, left, CORNER, CORNER))])[0]
    m = result.anomaly_map
    assert m.shape == (h, w) and m.std() > 0
    y, x = np.unravel_index(m.argmax(), m.shape)
    assert (y < h // 2) == corner.startswith("top") and (x < w // 2) == corner.endswith("left"), (y, x)
    inside = m[top:top + CORNER, left:left + CORNER].mean()
    assert inside > np.delete(m.ravel(), np.ravel_multi_index(np.mgrid[top:top + CORNER, left:left + CORNER].reshape(2, -1), m.shape)).mean()


def test_non_square_input_keeps_size_and_orientation(make_bundle, tmp_path):
    """A 6x8-grid model on 180x300 frames: the map is 180x300 and the defect stays bottom-left."""
    import shutil

    path = tmp_path / "rect"
    shutil.copytree(make_bundle("tinyrect"), path)
    size = (180, 300)
    _register(path, "widget", [textured_part(size, seed=s) for s in range(4)])
    defect = (size[0] - 60, 0, 60, 90)
    result = Inspector(path, "widget").inspect([textured_part(size, seed=30, defect=defect)])[0]
    assert result.anomaly_map.shape == size
    y, x = np.unravel_index(result.anomaly_map.argmax(), size)
    assert y >= size[0] // 2 and x < size[1] // 2, (y, x)


def test_zero_shot_results_without_threshold_have_null_decisions(tiny_bundle):
    results = Inspector(tiny_bundle, "widget").inspect([textured_part(seed=1), np.zeros((5, 7, 3), np.uint8)])
    for r in results:
        assert r.error is None and 0.0 <= r.score <= 1.0 and r.anomalous is None and r.threshold is None
    assert results[1].anomaly_map.shape == (5, 7)


def test_bad_array_input_is_an_error_result_not_an_exception(tiny_bundle):
    results = Inspector(tiny_bundle, "widget").inspect([np.zeros((10, 10), np.float32), textured_part(seed=2)])
    assert results[0].error and "uint8" in results[0].error and results[0].score is None
    assert results[1].error is None


def test_choose_threshold():
    assert choose_threshold([0.1, 0.4, 0.3], 0.0) == (0.4, 0.0)
    value, far = choose_threshold(np.linspace(0, 1, 11), 0.2)
    assert value == pytest.approx(0.8) and far == pytest.approx(2 / 11)
    with pytest.raises(CalibrationError):
        choose_threshold([0.1], 1.0)


def test_calibration_leave_one_out_and_decisions(bundle_copy):
    _register(bundle_copy, "widget", [textured_part(seed=s) for s in range(4)])
    inspector = Inspector(bundle_copy, "widget")
    threshold, failed = calibrate(inspector)
    assert not failed and threshold.leave_one_out and threshold.n_images == 4 and threshold.false_alarm_rate == 0.0
    assert threshold.value == pytest.approx(max(threshold.scores))
    # leave-one-out equals scoring the reference image itself against the other references
    alone = Inspector(bundle_copy, "widget")
    memory = alone.memory
    alone._set_memory(memory.without(0))
    assert alone.inspect([textured_part(seed=0)])[0].score == pytest.approx(threshold.scores[0], abs=1e-5)
    save_threshold(inspector.bundle, "widget", threshold)
    results = Inspector(bundle_copy, "widget").inspect([textured_part(seed=40), textured_part(seed=41, defect=(0, 0, 120, 120))])
    assert all(r.threshold == threshold.value for r in results)
    assert [r.anomalous for r in results] == [r.score > threshold.value for r in results]


def test_threshold_of_another_memory_is_refused(bundle_copy):
    _register(bundle_copy, "widget", [textured_part(seed=s) for s in range(3)])
    inspector = Inspector(bundle_copy, "widget")
    save_threshold(inspector.bundle, "widget", calibrate(inspector)[0])
    _register(bundle_copy, "widget", [textured_part(seed=s) for s in range(3, 6)])
    with pytest.raises(BundleError, match="calibrate"):
        Inspector(bundle_copy, "widget")


def test_zero_shot_calibration_needs_images(tiny_bundle):
    with pytest.raises(CalibrationError, match="normal images"):
        calibrate(Inspector(tiny_bundle, "widget"))


def test_append_memory(bundle_copy):
    from winclip_edge.products import load_memory

    inspector = Inspector(bundle_copy, "widget")
    first, _ = inspector.embed_references([textured_part(seed=1), textured_part(seed=2)])
    second, _ = inspector.embed_references([textured_part(seed=3)])
    save_memory(inspector.bundle, "widget", first.merged(second))
    memory = load_memory(inspector.bundle, "widget")
    assert memory.size == 3 and memory.windows[2].shape[0] == 3 and len(memory.sources) == 3
    np.testing.assert_array_equal(memory.patch_tokens[2], second.patch_tokens[0])
