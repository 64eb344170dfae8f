"""Tiled inspection and ROI through the Inspector (winclip_edge/tiles/units.py, tile_memory.py, roi.py), checked against
the untiled path, with random-weight tiny bundles: a conspicuous defect on a fixtured part is found by few-shot
association with clean references, so location tests fail on a flipped or flat map."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from winclip_edge import Inspector
from winclip_edge.bundle import Bundle, BundleError
from winclip_edge.calibration import calibrate
from winclip_edge.contract import IMAGE_EMBEDDING, PATCH_TOKENS, window_output_name
from winclip_edge.products import load_tiling, save_threshold
from winclip_edge.registration import register
from winclip_edge.tiles.roi import Roi
from winclip_edge.scoring import ScoringOptions
from winclip_edge.tiles.memory import TileMemory, load_tile_memory
from winclip_edge.tiles.units import FramePlan
from winclip_edge.tiles.tiling import TilingConfig

ZERO_SHOT = ScoringOptions(use_memory=False)


def part_surface(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A fixtured part's surface: the same smooth texture in every frame (RGB uint8)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 40, (size[0] // 8, size[1] // 8, 3)).clip(0, 255).astype(np.uint8)
    return cv2.resize(base, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)


def frame(surface: np.ndarray, seed: int, defect: tuple[int, int, int] | None = None) -> np.ndarray:
    """One camera frame of the part: sensor noise, and optionally a conspicuous striped defect (top, left, size)."""
    rng = np.random.default_rng(seed)
    image = cv2.add(surface, rng.integers(0, 10, surface.shape, dtype=np.uint8))
    if defect is not None:
        t, l, s = defect
        yy, xx = np.mgrid[0:s, 0:s]
        image[t:t + s, l:l + s] = np.stack([(yy * 37 + xx * 91) % 256, (xx * 53) % 256, (yy * 71) % 256], -1)
    return image


def registered(bundle_path, tiling: TilingConfig | None, references) -> None:
    register(Inspector(bundle_path, "widget", options=ZERO_SHOT, with_threshold=False, tiling=tiling, roi=None),
             references)


class CountingEngine:
    """Wraps an engine, remembering the batch size of every call."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []
        self.name, self.device = engine.name, engine.device

    def run(self, batch):
        self.calls.append(len(batch))
        return self.engine.run(batch)

    def close(self):
        self.engine.close()


@pytest.mark.parametrize("use_memory", [False, True])
def test_a_single_whole_frame_tile_equals_the_untiled_path_exactly(bundle_copy, use_memory):
    surface = part_surface((200, 300))
    frames = [frame(surface, s, (60, 90, 30) if s == 7 else None) for s in (5, 6, 7)]
    single = TilingConfig(tile=480, use_global=False)  # one 200x300 tile: the frame itself
    registered(bundle_copy, single, [frame(surface, 1), frame(surface, 2)])
    options = ScoringOptions(use_memory=use_memory)
    untiled = Inspector(bundle_copy, "widget", options=options, tiling=None, roi=None)
    results = {}
    for name, tiling in (("untiled", None), ("tile", single), ("tile+global", TilingConfig(tile=480))):
        inspector = Inspector(bundle_copy, "widget", engine=untiled.engine, options=options, tiling=tiling, roi=None,
                              sigma=2.0)
        results[name] = inspector.inspect(frames, batch_size=3)
    for r0, r1, r2 in zip(results["untiled"], results["tile"], results["tile+global"]):
        assert r0.error is None and r1.error is None
        for r in (r1, r2):
            assert r.score == r0.score and r.zero_shot_score == r0.zero_shot_score
            assert np.array_equal(r.anomaly_map, r0.anomaly_map)


def test_position_memory_uses_the_rows_of_the_same_position(bundle_copy):
    inspector = Inspector(bundle_copy, "widget", tiling=TilingConfig(tile=100, overlap=0.0), roi=None,
                          options=ScoringOptions(), with_threshold=False)
    spec, rng = inspector.bundle.spec, np.random.default_rng(0)

    def unit(n: int) -> dict:
        out = {IMAGE_EMBEDDING: rng.normal(size=(n, spec.embed_dim)),
               PATCH_TOKENS: rng.normal(size=(n, spec.grid[0] * spec.grid[1], spec.width))}
        out.update({window_output_name(k): rng.normal(size=(n, s[1], s[2]))
                    for k in spec.scales for s in [spec.output_shapes()[window_output_name(k)]]})
        return {k: (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32) for k, v in out.items()}

    refs = unit(8)  # 2 references x 4 tile positions (2x2 grid)
    tiles = TileMemory.from_outputs(refs, spec.scales, [0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3] * 2, [(2, 2)] * 2,
                                    [(200, 200)] * 2, (100, 100), 0.0, ["", ""])
    plan = FramePlan((200, 200), ((0, 0, 100, 100), (0, 100, 100, 100), (100, 0, 100, 100), (100, 100, 100, 100)),
                     (0, 1, 2, 3), (2, 2), None)
    same = {k: v[[4, 5, 6, 7]] for k, v in refs.items()}  # reference 1's tiles, each at its own position
    swapped = {k: v[[5, 4, 7, 6]] for k, v in refs.items()}  # the same tiles at the neighbouring positions
    visual = {}
    for mode in ("position", "pooled"):
        inspector.tiling = TilingConfig(tile=100, overlap=0.0, memory=mode)
        for name, outputs in (("same", same), ("swapped", swapped)):
            units = inspector.score_frames([plan], outputs, memory=None, tile_memory=tiles)[0]
            # image score = (s_img + max V) / 2: an exact match in the memory gives V = 0
            visual[mode, name] = units.image_score - units.zero_shot_score / 2
    assert np.allclose(visual["position", "same"], 0, atol=1e-6)
    assert np.allclose(visual["pooled", "same"], 0, atol=1e-6) and np.allclose(visual["pooled", "swapped"], 0, atol=1e-6)
    assert (visual["position", "swapped"] > 0.1).all()  # the same position of the references holds other tiles


def test_the_units_of_all_frames_of_a_batch_go_through_the_engine_in_one_call(bundle_copy):
    surface = part_surface((480, 480))
    tiling = TilingConfig(tile=240)  # 3x3 tiles (overlap 0.25) + the whole frame = 10 units
    registered(bundle_copy, tiling, [frame(surface, 1)])
    inspector = Inspector(bundle_copy, "widget", tiling="product", roi=None)
    counting = CountingEngine(inspector.engine)
    inspector.engine = counting
    results = inspector.inspect([frame(surface, s) for s in (2, 3, 4)], batch_size=3)
    assert counting.calls == [30] and all(r.units == 10 for r in results)
    assert load_tiling(inspector.bundle, "widget") == tiling
    # position matching needs the references' grid: another frame size is that frame's error, not the batch's
    other, same = inspector.inspect([part_surface((300, 700)), frame(surface, 5)], batch_size=2)
    assert "tile grid" in other.error and same.error is None
    # an ROI that misses a frame: that frame's error too
    inspector.roi = Roi(rect=(600, 600, 10, 10))
    missed, = inspector.inspect([frame(surface, 2)])
    assert "does not overlap" in missed.error


def test_a_defect_outside_the_roi_raises_no_alarm(bundle_copy):
    size = (480, 720)
    surface = part_surface(size)
    tiling = TilingConfig(tile=240)  # 3x4 tile grid
    registered(bundle_copy, tiling, [frame(surface, s) for s in (1, 2)])
    roi = Roi(rect=(0, 0, 360, 480), source="left half")
    outside = frame(surface, 9, (200, 640, 40))  # right edge: only tiles fully outside the ROI see it
    inside = frame(surface, 9, (200, 100, 40))
    normal = [frame(surface, s) for s in (3, 4, 5)]
    scores = {}
    for name, r in (("roi", roi), ("whole", None)):
        inspector = Inspector(bundle_copy, "widget", tiling="product", roi=r, with_threshold=False)
        threshold, _ = calibrate(inspector, normal)
        outside_r, inside_r = inspector.inspect([outside, inside])
        scores[name] = (threshold.value, outside_r, inside_r)
    value, outside_r, inside_r = scores["whole"]
    assert outside_r.score > value and inside_r.score > value  # without the ROI both defects raise an alarm
    value, outside_r, inside_r = scores["roi"]
    assert outside_r.score <= value and inside_r.score > value
    assert outside_r.roi is not None and (outside_r.anomaly_map[:, 360:] == 0).all()
    assert outside_r.units < 1 + 12  # the tiles right of the ROI were not computed


def test_append_adds_tiles_of_new_references(bundle_copy):
    surface = part_surface((480, 480))
    tiling = TilingConfig(tile=240)
    registered(bundle_copy, tiling, [frame(surface, 1)])
    inspector = Inspector(bundle_copy, "widget", options=ZERO_SHOT, with_threshold=False, roi=None)
    memory, _ = register(inspector, [frame(surface, 2)], append=True)
    bundle = Bundle(bundle_copy)
    tiles = load_tile_memory(bundle, "widget", memory.source_sha256)
    assert memory.size == 2 and tiles.size == 2 and sorted(set(tiles.reference.tolist())) == [0, 1]
    assert (tiles.position[tiles.reference == 1] == np.arange(9)).all()


def test_thresholds_belong_to_their_tiling_and_roi(bundle_copy):
    surface = part_surface((480, 480))
    registered(bundle_copy, TilingConfig(tile=240), [frame(surface, s) for s in (1, 2)])
    inspector = Inspector(bundle_copy, "widget", with_threshold=False)
    threshold, _ = calibrate(inspector, [frame(surface, 3)])
    save_threshold(inspector.bundle, "widget", threshold)
    assert Inspector(bundle_copy, "widget", engine=inspector.engine).threshold.value == threshold.value
    for other in (dict(tiling=None), dict(tiling=TilingConfig(tile=240, use_global=False)),
                  dict(roi=Roi(rect=(0, 0, 100, 100)))):
        with pytest.raises(BundleError, match="tiling|roi"):
            Inspector(bundle_copy, "widget", engine=inspector.engine, **other)
    with pytest.raises(BundleError, match="tile memory .* registered with tile"):
        Inspector(bundle_copy, "widget", engine=inspector.engine, tiling=TilingConfig(tile=200), with_threshold=False)


def test_leave_one_out_with_tiles_scores_each_reference_against_the_others(bundle_copy, tiny_bundle, tmp_path):
    import shutil

    surface = part_surface((480, 480))
    refs = [frame(surface, s) for s in (1, 2, 3)]
    tiling = TilingConfig(tile=240)
    roi = Roi(rect=(0, 0, 300, 480))
    registered(bundle_copy, tiling, refs)
    loo, _ = calibrate(Inspector(bundle_copy, "widget", with_threshold=False, roi=roi))
    others = tmp_path / "others"
    shutil.copytree(tiny_bundle, others)
    registered(others, tiling, refs[1:])
    direct = Inspector(others, "widget", roi=roi, with_threshold=False).inspect(refs[:1])[0].score
    assert loo.leave_one_out and loo.scores[0] == pytest.approx(direct, abs=1e-5)


def test_a_20px_defect_on_a_2048px_part_is_located_within_40px_with_tiles(bundle_copy):
    size = (2048, 2048)
    surface = part_surface(size)
    tiling = TilingConfig(tile=320)  # 20 px -> 15 model pixels: about one ViT patch of a tile
    registered(bundle_copy, tiling, [frame(surface, 1), frame(surface, 2)])
    inspector = Inspector(bundle_copy, "widget", with_threshold=False)
    defects = [(300, 1500), (1700, 420)]  # off the centre and the diagonals: a flipped map points elsewhere
    results = inspector.inspect([frame(surface, 10 + i, (t, l, 20)) for i, (t, l) in enumerate(defects)]
                                + [frame(surface, 20)], batch_size=1)
    normal = results[-1]
    for (t, l), r in zip(defects, results):
        peak = np.unravel_index(np.argmax(r.anomaly_map), size)
        assert np.hypot(peak[0] - (t + 10), peak[1] - (l + 10)) <= 40, (peak, (t, l))
        assert r.score > normal.score
    whole = Inspector(bundle_copy, "widget", engine=inspector.engine, tiling=None, with_threshold=False)
    assert whole.inspect([frame(surface, 10, (*defects[0], 20))])[0].score < results[0].score


def test_the_line_batcher_serves_tiled_products_like_the_inspector(bundle_copy):
    """serve runs frames through the Batcher (Inspector.inspect_decoded): the product's tiling and ROI apply there."""
    from winclip_edge.batcher import Batcher, Job
    from winclip_edge.tiles.roi import save_roi

    surface = part_surface((480, 480))
    registered(bundle_copy, TilingConfig(tile=240), [frame(surface, 1), frame(surface, 2)])
    save_roi(Bundle(bundle_copy), "widget", Roi(rect=(0, 0, 200, 480)))
    inspector = Inspector(bundle_copy, "widget", with_threshold=False)
    frames = [frame(surface, 3), frame(surface, 4, (100, 100, 30))]
    expected = inspector.inspect(frames, batch_size=1)
    with Batcher(inspector, max_batch=1) as batcher:
        got = [f.result(timeout=60) for f in [batcher.submit(Job(name=f"f{i}", image=x)) for i, x in enumerate(frames)]]
    for e, g in zip(expected, got):
        assert g.error is None and g.units == e.units < 10
        assert g.score == pytest.approx(e.score, abs=1e-6) and (g.anomaly_map[:, 200:] == 0).all()
