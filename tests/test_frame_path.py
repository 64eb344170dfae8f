"""The frame paths, pinned bit for bit: inspect (whole frame, tiles, ROI), register, calibrate, leave-one-out and eval
give exactly what an independent computation from the building blocks gives (the engine's ``run``, ``score_batch``,
``upsample_map``; for tiles the plans, ``unit_inputs``, ``frame_map``), with the same batches through the engine.

The whole frame is checked against the plain computation (one engine call per batch, one ``score_batch``, a bilinear
upsample), never against the unit machinery, so a unit path that drifted from it (another dtype, another batch, a
copy that changes rounding) fails here."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import textured_part
from winclip_edge import Inspector
from winclip_edge.bundle import Bundle
from winclip_edge.calibration import CalibrationError, calibrate, choose_threshold
from winclip_edge.contract import IMAGE_EMBEDDING, PATCH_TOKENS, window_output_name
from winclip_edge.engines import EngineConfig, create_engine
from winclip_edge.evaluation.datasets import read_folder, split_references
from winclip_edge.evaluation.runner import CASE_MAP_SCALE, SCORE_BATCH, EvalConfig, run_evaluation
from winclip_edge.heatmap import upsample_map
from winclip_edge.preprocess import ImageError, as_rgb, read_image, resize_to_model
from winclip_edge.products import Memory, load_memory, load_text
from winclip_edge.registration import register
from winclip_edge.scoring import ScoringOptions, score_batch
from winclip_edge.tiles.memory import TileMemory, load_tile_memory
from winclip_edge.tiles.roi import Roi, RoiError
from winclip_edge.tiles.tiling import TilingConfig
from winclip_edge.tiles.units import GLOBAL, POOLED, frame_map, plan_frame, reference_plan, token_masks, unit_inputs

PRODUCT = "widget"
ZERO_SHOT = ScoringOptions(use_memory=False)
FEW_SHOT = ScoringOptions()
DEFECT = (60, 80, 30, 30)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bundle(tiny_bundle, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("frame_path") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture(scope="module")
def engine(bundle):
    """One raw engine for the Inspectors and the independent computations (its outputs are deterministic)."""
    made = create_engine(Bundle(bundle), EngineConfig())
    yield made
    made.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("frames")
    junk = folder / "junk.png"
    junk.write_bytes(b"not an image")
    part = folder / "part.png"
    assert cv2.imwrite(str(part), cv2.cvtColor(textured_part((240, 240), seed=2, defect=DEFECT), cv2.COLOR_RGB2BGR))
    return {"junk": str(junk), "part": str(part)}


@pytest.fixture(scope="module")
def tests(files) -> list:
    """A batch of mixed sizes: arrays and a file, one unreadable input in the middle."""
    return [textured_part((200, 300), seed=1), files["junk"], files["part"],
            textured_part((180, 260), seed=3, defect=(10, 10, 40, 40)), textured_part((240, 240), seed=4)]


@pytest.fixture(scope="module")
def references(files) -> list:
    return [textured_part((240, 240), seed=10 + s) for s in range(3)] + [files["junk"], textured_part((200, 300), seed=20)]


# ---------------------------------------------------------------- the independent computation
def read(item) -> np.ndarray | None:
    try:
        return as_rgb(item) if isinstance(item, np.ndarray) else read_image(item)
    except ImageError:
        return None


def flat(memory) -> tuple:
    if memory is None:
        return None, None
    return ({k: v.reshape(-1, v.shape[-1]) for k, v in memory.windows.items()},
            memory.patch_tokens.reshape(-1, memory.patch_tokens.shape[-1]))


def rows_of(outputs: dict, rows) -> dict:
    return {name: value[rows] for name, value in outputs.items()}


def concat(parts: list[dict]) -> dict:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


class Direct:
    """Scores from the building blocks, for one bundle, options and engine."""

    def __init__(self, bundle_path, engine, options: ScoringOptions):
        self.bundle = Bundle(bundle_path)
        self.spec, self.engine = self.bundle.spec, engine
        self.text = load_text(self.bundle, PRODUCT)
        self.options = options.resolved(self.spec.scales, self.bundle.manifest.temperature)

    @property
    def size(self) -> tuple[int, int]:
        return self.spec.image_size

    def score(self, outputs: dict, memory_rows: tuple, mask=None):
        spec = self.spec
        return score_batch(outputs, self.text.t_normal, self.text.t_anomalous, spec.grid, spec.stride, spec.scales,
                           self.options, *memory_rows, token_mask=mask)

    # whole frames: one engine call per batch of readable inputs, one score_batch, a bilinear upsample
    def whole_frames(self, items, batch: int, memory, sigma: float) -> list:
        out = []
        for start in range(0, len(items), batch):
            images = [read(x) for x in items[start:start + batch]]
            good = [im for im in images if im is not None]
            if good:
                outputs = self.engine.run(np.stack([resize_to_model(im, self.size) for im in good]))
                s = self.score(outputs, flat(memory))
            j = 0
            for im in images:
                if im is None:
                    out.append(None)
                    continue
                out.append((float(s.image_score[j]), float(s.zero_shot_score[j]),
                            upsample_map(s.token_map[j], im.shape[:2], sigma)))
                j += 1
        return out

    # units (tiles and/or ROI): every unit of a batch in one engine call, one score_batch per memory the units use
    def plan(self, size, tiling, roi, tiles):
        plan = plan_frame(size, tiling, self.size, self.spec.grid, roi)
        if tiles is not None and tiling is not None and tiling.memory == "position" and plan.grid != tiles.grids[0]:
            raise RoiError("other tile grid")  # the Inspector refuses it (BundleError): an error result either way
        return plan

    def score_units(self, plans, outputs, memory, tiles, pooled: bool) -> list:
        keys = np.array([k for p in plans for k in p.keys])
        masks = None if plans[0].inside is None else np.concatenate([token_masks(p, self.spec.grid) for p in plans])
        groups = np.where(keys == GLOBAL, GLOBAL, POOLED if pooled else keys)
        n = len(keys)
        image, zero_shot, maps = np.zeros(n, np.float32), np.zeros(n, np.float32), None
        for group in np.unique(groups):
            rows = np.flatnonzero(groups == group)
            memory_rows = flat(memory) if group == GLOBAL else (None, None) if tiles is None else \
                tiles.rows(None if group == POOLED else int(group))
            s = self.score(rows_of(outputs, rows), memory_rows, None if masks is None else masks[rows])
            if maps is None:
                maps = np.zeros((n, *s.token_map.shape[1:]), np.float32)
            image[rows], zero_shot[rows], maps[rows] = s.image_score, s.zero_shot_score, s.token_map
        frames, end = [], 0
        for p in plans:
            rows = slice(end, end + len(p))
            end += len(p)
            frames.append((float(image[rows].max()), float(zero_shot[rows].max()), maps[rows]))
        return frames

    def units(self, items, batch: int, tiling, roi, memory, tiles, sigma: float) -> list:
        pooled = tiles is None or tiling is None or tiling.memory == "pooled"
        out = []
        for start in range(0, len(items), batch):
            images = [read(x) for x in items[start:start + batch]]
            plans = {}
            for i, im in enumerate(images):
                if im is not None:
                    try:
                        plans[i] = self.plan(im.shape[:2], tiling, roi, tiles)
                    except RoiError:
                        pass
            if plans:
                inputs = [x for i, p in plans.items() for x in unit_inputs(images[i], p, self.size)]
                frames = dict(zip(plans, self.score_units(list(plans.values()), self.engine.run(np.stack(inputs)),
                                                          memory, tiles, pooled)))
            for i in range(len(images)):
                if i not in plans:
                    out.append(None)
                    continue
                score, zero_shot, token_maps = frames[i]
                out.append((score, zero_shot, frame_map(plans[i], token_maps, sigma), plans[i].inside, len(plans[i])))
        return out

    def references(self, items, batch: int, tiling) -> tuple[dict, dict | None]:
        """(whole-frame rows, tile rows with reference / position / grids / sizes) of the readable references."""
        whole, tiles, grids, sizes, reference, position, r = [], [], [], [], [], [], 0
        for start in range(0, len(items), batch):
            good = [im for im in (read(x) for x in items[start:start + batch]) if im is not None]
            if not good:
                continue
            if tiling is None:
                whole.append(self.engine.run(np.stack([resize_to_model(im, self.size) for im in good])))
                continue
            plans = [reference_plan(im.shape[:2], tiling, self.size, self.spec.grid) for im in good]
            outputs = self.engine.run(np.stack([x for im, p in zip(good, plans) for x in unit_inputs(im, p, self.size)]))
            keys = np.array([k for p in plans for k in p.keys])
            whole.append(rows_of(outputs, keys == GLOBAL))
            tiles.append(rows_of(outputs, keys != GLOBAL))
            for p in plans:
                reference += [r] * (len(p) - 1)
                position += list(p.keys[1:])
                grids.append(p.grid)
                sizes.append(p.size)
                r += 1
        tile_rows = None if tiling is None else {**concat(tiles), "reference": reference, "position": position,
                                                   "grids": grids, "sizes": sizes}
        return concat(whole), tile_rows


def assert_whole_frames(results, expected, threshold=None):
    assert len(results) == len(expected)
    for r, e in zip(results, expected):
        if e is None:
            assert r.error and r.score is None and r.anomaly_map is None
            continue
        assert r.error is None, r.error
        assert type(r.score) is float and type(r.zero_shot_score) is float
        assert (r.score, r.zero_shot_score) == e[:2]
        assert r.anomaly_map.dtype == e[2].dtype == np.float32 and r.anomaly_map.shape == e[2].shape
        assert r.anomaly_map.tobytes() == e[2].tobytes()
        assert r.units == 1 and r.roi is None
        assert r.threshold == threshold and r.anomalous == (None if threshold is None else r.score > threshold)


def assert_units(results, expected):
    assert len(results) == len(expected)
    for r, e in zip(results, expected):
        if e is None:
            assert r.error and r.score is None and r.anomaly_map is None
            continue
        assert r.error is None, r.error
        assert (r.score, r.zero_shot_score, r.units) == (e[0], e[1], e[4])
        assert r.anomaly_map.dtype == e[2].dtype == np.float32 and r.anomaly_map.tobytes() == e[2].tobytes()
        assert (r.roi is None) == (e[3] is None) and (r.roi is None or np.array_equal(r.roi, e[3]))


def assert_memory(memory, whole: dict):
    assert memory.image_embeddings.dtype == np.float32
    assert memory.image_embeddings.tobytes() == whole[IMAGE_EMBEDDING].tobytes()
    assert memory.patch_tokens.tobytes() == whole[PATCH_TOKENS].tobytes()
    for k, v in memory.windows.items():
        assert v.tobytes() == whole[window_output_name(k)].tobytes()


# ---------------------------------------------------------------- whole frames
def test_whole_frame_register_inspect_calibrate_and_leave_one_out(bundle, engine, tests, references):
    zero = Direct(bundle, engine, ZERO_SHOT)
    for sigma in (0.0, 2.0):
        inspector = Inspector(bundle, PRODUCT, engine=engine, options=ZERO_SHOT, sigma=sigma, tiling=None, roi=None)
        for batch in (1, 2, 8):
            assert_whole_frames(inspector.inspect(tests, batch_size=batch), zero.whole_frames(tests, batch, None, sigma))

    registrar = Inspector(bundle, PRODUCT, engine=engine, options=ZERO_SHOT, with_threshold=False, tiling=None, roi=None)
    memory, failed = register(registrar, references, batch_size=2)
    whole, _ = zero.references(references, 2, None)
    assert [r.path for r in failed] == [references[3]]
    stored = load_memory(Bundle(bundle), PRODUCT)
    assert_memory(memory, whole)
    assert_memory(stored, whole)
    assert stored.sources[:3] == ["array[0]", "array[1]", "array[2]"] and stored.tiles is None

    few = Direct(bundle, engine, FEW_SHOT)
    for sigma in (0.0, 2.0):
        inspector = Inspector(bundle, PRODUCT, engine=engine, sigma=sigma, tiling=None, roi=None, with_threshold=False)
        for batch in (1, 3, 8):
            assert_whole_frames(inspector.inspect(tests, batch_size=batch), few.whole_frames(tests, batch, stored, sigma))

    inspector = Inspector(bundle, PRODUCT, engine=engine, tiling=None, roi=None, with_threshold=False)
    threshold, failed = calibrate(inspector, tests, target_false_alarm_rate=0.3, batch_size=3)
    scores = [e[0] for e in few.whole_frames(tests, 3, stored, 0.0) if e is not None]
    assert threshold.scores == scores and [r.path for r in failed] == [tests[1]]
    assert threshold.value == choose_threshold(scores, 0.3)[0] and not threshold.leave_one_out

    loo, _ = calibrate(inspector)
    direct = []
    for r in range(stored.size):
        outputs = {IMAGE_EMBEDDING: stored.image_embeddings[r:r + 1], PATCH_TOKENS: stored.patch_tokens[r:r + 1],
                   **{window_output_name(k): v[r:r + 1] for k, v in stored.windows.items()}}
        direct.append(float(few.score(outputs, flat(stored.without(r))).image_score[0]))
    assert loo.leave_one_out and loo.scores == direct and loo.value == choose_threshold(direct, 0.0)[0]

    inspector.threshold = threshold  # decisions come from the threshold, the numbers stay the same
    assert_whole_frames(inspector.inspect(tests, batch_size=2), few.whole_frames(tests, 2, stored, 0.0), threshold.value)


# ---------------------------------------------------------------- tiles and ROI
@pytest.mark.parametrize("mode", ["position", "pooled"])
def test_tiled_register_inspect_calibrate_and_leave_one_out(bundle_copy, engine, tests, references, mode):
    tiling = TilingConfig(tile=120, memory=mode)
    refs = references[:4] if mode == "position" else references  # position matching needs one frame size
    registrar = Inspector(bundle_copy, PRODUCT, engine=engine, options=ZERO_SHOT, with_threshold=False, tiling=tiling,
                          roi=None)
    memory, failed = register(registrar, refs, batch_size=2)
    zero = Direct(bundle_copy, engine, ZERO_SHOT)
    whole, tile_rows = zero.references(refs, 2, tiling)
    stored = load_memory(Bundle(bundle_copy), PRODUCT)
    tiles = load_tile_memory(Bundle(bundle_copy), PRODUCT, stored.source_sha256)
    assert [r.path for r in failed] == [refs[3]]
    assert_memory(stored, whole)
    for t in (memory.tiles, tiles):
        assert_memory(t, tile_rows)
        assert t.reference.tolist() == tile_rows["reference"] and t.position.tolist() == tile_rows["position"]
        assert t.grids == tile_rows["grids"] and t.frame_sizes == tile_rows["sizes"]

    for roi in (None, Roi(rect=(20, 10, 150, 120)), Roi(rect=(250, 0, 40, 40))):  # the last misses 240-px wide frames
        for options, memories in ((ZERO_SHOT, (None, None)), (FEW_SHOT, (stored, tiles))):
            direct = Direct(bundle_copy, engine, options)
            for sigma, batch in ((0.0, 1), (2.0, 3)):
                inspector = Inspector(bundle_copy, PRODUCT, engine=engine, options=options, sigma=sigma, tiling=tiling,
                                      roi=roi, with_threshold=False)
                assert_units(inspector.inspect(tests, batch_size=batch),
                             direct.units(tests, batch, tiling, roi, *memories, sigma))
        inspector = Inspector(bundle_copy, PRODUCT, engine=engine, tiling=tiling, roi=roi, with_threshold=False)
        few = Direct(bundle_copy, engine, FEW_SHOT)
        scores = [e[0] for e in few.units(tests, 2, tiling, roi, stored, tiles, 0.0) if e is not None]
        if scores:
            assert calibrate(inspector, tests, batch_size=2)[0].scores == scores
        else:  # position matching and this ROI leave no frame
            with pytest.raises(CalibrationError, match="none of the calibration images"):
                calibrate(inspector, tests, batch_size=2)
        if roi is not None and roi.rect[0] >= 240:
            continue  # the references' frames are outside this ROI
        loo, _ = calibrate(inspector)
        direct = []
        for r in range(stored.size):
            plan = plan_frame(tiles.frame_sizes[r], tiling, few.size, few.spec.grid, roi)
            first = {IMAGE_EMBEDDING: stored.image_embeddings[r:r + 1], PATCH_TOKENS: stored.patch_tokens[r:r + 1],
                     **{window_output_name(k): v[r:r + 1] for k, v in stored.windows.items()}}
            outputs = concat([first, tiles.outputs_of(r, [k for k in plan.keys if k != GLOBAL])])
            direct.append(few.score_units([plan], outputs, stored.without(r), tiles.without(r), mode == "pooled")[0][0])
        assert loo.leave_one_out and loo.scores == direct


def test_roi_without_tiles_is_one_masked_unit(bundle_copy, engine, tests, references):
    register(Inspector(bundle_copy, PRODUCT, engine=engine, options=ZERO_SHOT, with_threshold=False, tiling=None,
                       roi=None), references[:3])
    stored = load_memory(Bundle(bundle_copy), PRODUCT)
    roi = Roi(rect=(20, 10, 150, 120))
    for options, memory in ((ZERO_SHOT, None), (FEW_SHOT, stored)):
        inspector = Inspector(bundle_copy, PRODUCT, engine=engine, options=options, sigma=1.0, tiling=None, roi=roi,
                              with_threshold=False)
        expected = Direct(bundle_copy, engine, options).units(tests, 3, None, roi, memory, None, 1.0)
        assert_units(inspector.inspect(tests, batch_size=3), expected)


# ---------------------------------------------------------------- eval
def _folder(root: Path) -> Path:
    def write(path: Path, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    mask = np.zeros((64, 80), np.uint8)
    mask[20:36, 30:50] = 255
    for i in range(4):
        write(root / "good" / f"{i}.png", textured_part((64 + 8 * (i % 2), 80), seed=30 + i))
    for i in range(3):
        write(root / "scratch" / f"{i}.png", textured_part((64, 80), seed=40 + i, defect=(20, 30, 16, 20)))
        write(root / "masks" / "scratch" / f"{i}.png", np.repeat(mask[:, :, None], 3, 2))
    (root / "scratch" / "broken.png").write_bytes(b"junk")
    write(root / "masks" / "scratch" / "broken.png", np.repeat(mask[:, :, None], 3, 2))
    return root


EVAL_SETTINGS = {"whole": (None, None), "tiled+roi": (TilingConfig(tile=40, memory="pooled"), Roi(rect=(5, 5, 60, 50))),
                 "one whole tile": (TilingConfig(tile=80, memory="pooled"), None)}  # every frame is one unit, tiled


@pytest.mark.parametrize("setting", list(EVAL_SETTINGS))
def test_eval_scores_and_pictures_equal_the_direct_computation(bundle_copy, engine, tmp_path, setting):
    """Per-image scores and the example maps of every draw: whole frames picture their token map, tiled runs their
    stitched map at CASE_MAP_SCALE x the grid (a tiled frame that is one whole tile too)."""
    root = _folder(tmp_path / PRODUCT)  # a folder data set is one class, named after the folder: the product
    tiling, roi = EVAL_SETTINGS[setting]
    case_size = tuple(CASE_MAP_SCALE * g for g in Bundle(bundle_copy).spec.grid)
    out = tmp_path / "out"
    run_evaluation(EvalConfig(bundle=bundle_copy, dataset="folder", root=root, out=out, shots=(0, 1, 2), seeds=2,
                              batch=3, pictures=False, progress=False, tiling=tiling, roi=roi), engine=engine,
                   log=lambda message: None)
    _, samples = read_folder(root)
    direct = Direct(bundle_copy, engine, FEW_SHOT)
    # the test images are embedded once, in batches of `batch` files; their units' rows are kept for every draw
    embedded, plans, rows = [], {}, {}
    for start in range(0, len(samples), 3):
        chunk = [(s.path, read(s.path)) for s in samples[start:start + 3]]
        good = [(p, im) for p, im in chunk if im is not None]
        for p, im in good:
            plans[p] = plan_frame(im.shape[:2], tiling, direct.size, direct.spec.grid, roi)
            rows[p] = sum(len(q) for q in plans.values()) - len(plans[p])
        inputs = [x for p, im in good for x in unit_inputs(im, plans[p], direct.size)]
        embedded.append(engine.run(np.stack(inputs)))
    outputs = concat(embedded)
    for shots in (0, 1, 2):
        for seed in (0, 1) if shots else (0,):
            refs, _ = split_references([s for s in samples if s.label == 0], shots, seed) if shots else ([], None)
            taken = {s.path for s in refs}
            kept = [s.path for s in samples if s.path not in taken and s.path in plans]
            memory, tiles = None, None
            if refs:
                whole, tile_rows = direct.references([s.path for s in refs], 3, tiling)
                memory = Memory(whole[IMAGE_EMBEDDING], {k: whole[window_output_name(k)] for k in direct.spec.scales},
                                whole[PATCH_TOKENS], [], [])
                if tile_rows is not None:
                    tiles = TileMemory.from_outputs(tile_rows, direct.spec.scales, tile_rows["reference"],
                                                    tile_rows["position"], tile_rows["grids"], tile_rows["sizes"],
                                                    tiling.tile_shape(direct.size, direct.spec.grid), tiling.overlap,
                                                    [""] * len(refs))
            scores, pictures = [], {}
            for start in range(0, len(kept), SCORE_BATCH):
                chunk = kept[start:start + SCORE_BATCH]
                if tiling is None and roi is None:
                    s = direct.score(rows_of(outputs, [rows[p] for p in chunk]), flat(memory))
                    scores += [float(v) for v in s.image_score]
                    pictures.update(zip(chunk, s.token_map))
                    continue
                index = np.concatenate([np.arange(rows[p], rows[p] + len(plans[p])) for p in chunk])
                frames = direct.score_units([plans[p] for p in chunk], rows_of(outputs, index), memory, tiles, True)
                scores += [f[0] for f in frames]
                pictures.update({p: cv2.resize(frame_map(plans[p], f[2]), case_size[::-1], interpolation=cv2.INTER_AREA)
                                 for p, f in zip(chunk, frames)})
            record = json.loads(next((out / "partial").rglob(f"{shots}shot-seed{seed}.json")).read_text())
            assert [i["path"] for i in record["images"]] == kept
            assert [i["score"] for i in record["images"]] == scores, (shots, seed)
            assert record["cases"] and all(c["token_map"] == pictures[c["path"]].tolist() for c in record["cases"])
