"""The pure parts of benchmarks/anomalib_compare.py on a tiny model: anomalib's window order vs ours, the
prompt/prototype conversion, anomalib 2.7's flat windows and the harness's correction, and agreement of
anomalib's zero-/few-shot outputs with our runtime given the same weights, text and input.

Skipped where anomalib is not installed; `.ci/run` builds anomalib's own venv (.venv-anomalib/) and runs it there:
    .venv-anomalib/bin/python -m pytest -q tests/test_anomalib_compare.py
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("anomalib", reason="anomalib is not installed (see docs/anomalib_comparison.md)")
torch = pytest.importorskip("torch")

from conftest import textured_part  # noqa: E402

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "anomalib_compare.py"
PRODUCT = "widget"
EMBEDDING_TOLERANCE = 1e-5  # unit vectors, fp32, torch eager vs ONNX Runtime
ANSWER_TOLERANCE = 1e-4  # the harness's "same answer" bound
FLAT = 1e-5  # std across windows below this: every window has the same embedding
SHOTS = 2
ANSWER_KEYS = ("score", "map", "token_map", "zero_shot_token_map", "zero_shot_score")


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("anomalib_compare", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def pair(harness, make_bundle, config_dir, tmp_path_factory):
    """The tiny bundle (patch layer last) with anomalib's prototypes, and anomalib's model on the same weights."""
    from winclip_edge.export.models import load_model
    from winclip_edge.bundle import Bundle
    from winclip_edge.products import save_text

    folder = tmp_path_factory.mktemp("anomalib")
    bundle_dir = folder / "bundle"
    shutil.copytree(make_bundle("tiny240", products=(), patch_layer="last"), bundle_dir)
    bundle = Bundle(bundle_dir)
    loaded = load_model(str(config_dir / "tiny240.json"), "none", seed=0)
    assert loaded.weights["id"] == bundle.manifest.weights_id
    checkpoint = folder / "clip.pt"
    torch.save(loaded.model.state_dict(), checkpoint)
    model = harness.build_anomalib_model(bundle.manifest.model, checkpoint, PRODUCT)
    save_text(bundle, PRODUCT, harness.text_prototypes_from_anomalib(model.text_embeddings.numpy(), PRODUCT))
    images = np.stack([textured_part(seed=i, defect=(40, 60, 48, 48) if i % 2 else None) for i in range(3)])
    references = np.stack([textured_part(seed=10 + i) for i in range(SHOTS)])
    m = bundle.manifest
    return SimpleNamespace(bundle=bundle, model=model, recorder=harness.AnomalibRecorder(model), images=images,
                           references=references, mean=m.mean, std=m.std, weights_id=loaded.weights["id"],
                           checkpoint=checkpoint)


@pytest.mark.parametrize("grid, k, stride", [((15, 15), 2, 1), ((15, 15), 3, 1), ((6, 8), 3, 1), ((15, 15), 3, 2)])
def test_anomalib_masks_are_our_windows_transposed(harness, grid, k, stride):
    from anomalib.models.image.winclip.utils import make_masks

    from winclip_edge.windows import window_token_index

    np.testing.assert_array_equal(harness.anomalib_window_index(make_masks(grid, k, stride)),
                                  window_token_index(grid, k, stride))


def test_same_weights_in_anomalib(pair):
    from winclip_edge.export.models import weights_id

    assert weights_id(pair.model.clip) == pair.weights_id


def test_prototypes_give_anomalibs_class_scores(harness, pair):
    from anomalib.models.image.winclip.prompting import create_prompt_ensemble
    from anomalib.models.image.winclip.utils import class_scores as anomalib_scores

    from winclip_edge.products import load_text
    from winclip_edge.scoring import class_scores

    text = load_text(pair.bundle, PRODUCT)
    np.testing.assert_allclose(np.linalg.norm([text.t_normal, text.t_anomalous], axis=1), 1.0, atol=1e-6)
    assert (list(text.normal_prompts), list(text.anomalous_prompts)) == create_prompt_ensemble(PRODUCT)
    f = harness.unit(np.random.default_rng(0).normal(size=(50, text.t_normal.shape[0])))
    theirs = anomalib_scores(torch.from_numpy(f), pair.model.text_embeddings, pair.model.temperature,
                             target_class=harness.TARGET_CLASS).numpy()
    np.testing.assert_allclose(class_scores(f, text.t_normal, text.t_anomalous, pair.model.temperature), theirs, atol=1e-6)


def test_prototype_conversion_refuses_other_shapes(harness):
    with pytest.raises(ValueError, match=r"expected \[2, D\]"):
        harness.text_prototypes_from_anomalib(np.ones((3, 8), np.float32), PRODUCT)


def test_shipped_windows_are_flat_and_the_correction_gives_ours(harness, pair):
    from winclip_edge.engines import EngineConfig, create_engine
    from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions

    r = pair.recorder
    harness.remove_window_fix(pair.model)
    shipped = r.record(r.infer(pair.images[:1], pair.mean, pair.std))
    assert harness.window_spread(shipped["windows_k2"]) < FLAT
    assert harness.window_spread(shipped["windows_k3"]) < FLAT
    assert float(shipped["zero_shot_token_map"].std()) < FLAT
    harness.apply_window_fix(pair.model)
    corrected = r.record(r.infer(pair.images[:1], pair.mean, pair.std))
    ours = create_engine(pair.bundle, EngineConfig(backend="onnxruntime",
                                                   options=OnnxRuntimeOptions(provider="cpu"))).run(pair.images[:1])
    for k in (2, 3):
        assert harness.window_spread(corrected[f"windows_k{k}"]) > 100 * FLAT
        assert harness.max_abs_diff(corrected[f"windows_k{k}"], ours[f"window_embeddings_k{k}"]) < EMBEDDING_TOLERANCE
    assert harness.max_abs_diff(corrected["patch_tokens"], ours["patch_tokens"]) < EMBEDDING_TOLERANCE


def _assert_same_answer(harness, ours: dict, theirs: dict) -> None:
    diffs = harness.compare_records(ours, theirs)
    assert set(diffs) >= {*ANSWER_KEYS, "window_scores_k2", "window_scores_k3", "image_embedding"}
    for key in ANSWER_KEYS:
        assert diffs[key] <= ANSWER_TOLERANCE, (key, diffs[key])


def _inspector(harness, pair):
    from winclip_edge.engines import EngineConfig, create_engine
    from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
    from winclip_edge.inspector import Inspector
    from winclip_edge.scoring import ScoringOptions

    engine = harness.RecordingEngine(create_engine(pair.bundle, EngineConfig(backend="onnxruntime",
                                                                             options=OnnxRuntimeOptions(provider="cpu"))))
    return Inspector(pair.bundle, PRODUCT, options=ScoringOptions(temperature=pair.model.temperature), engine=engine)


def test_zero_shot_outputs_agree(harness, pair):
    harness.apply_window_fix(pair.model)
    inspector = _inspector(harness, pair)
    assert inspector.memory is None and pair.model.k_shot == 0
    theirs = pair.recorder.record(pair.recorder.infer(pair.images, pair.mean, pair.std))
    ours = harness.ours_record(inspector, inspector.engine, inspector.inspect(list(pair.images), batch_size=len(pair.images)))
    _assert_same_answer(harness, ours, theirs)


def test_few_shot_outputs_agree(harness, pair, tmp_path):
    from winclip_edge.bundle import Bundle
    from winclip_edge.inspector import Inspector
    from winclip_edge.products import save_memory

    bundle = Bundle(shutil.copytree(pair.bundle.root, tmp_path / "bundle"))
    model = harness.build_anomalib_model(bundle.manifest.model, pair.checkpoint, PRODUCT)  # its own: setup() sticks
    harness.apply_window_fix(model)
    recorder = harness.AnomalibRecorder(model)
    model.setup(reference_images=harness.normalised_tensor(pair.references, pair.mean, pair.std))
    zero_shot = _inspector(harness, SimpleNamespace(bundle=bundle, model=model))
    memory, failed = zero_shot.embed_references(list(pair.references))
    assert not failed and memory.size == SHOTS == model.k_shot
    save_memory(bundle, PRODUCT, memory)
    inspector = Inspector(bundle, PRODUCT, options=zero_shot.options, engine=zero_shot.engine)
    theirs = recorder.record(recorder.infer(pair.images, pair.mean, pair.std))
    ours = harness.ours_record(inspector, inspector.engine, inspector.inspect(list(pair.images), batch_size=len(pair.images)))
    _assert_same_answer(harness, ours, theirs)
    # the few-shot part must change the map, or this test would only repeat the zero-shot one
    assert harness.max_abs_diff(theirs["token_map"], theirs["zero_shot_token_map"]) > 100 * ANSWER_TOLERANCE
