"""The one loader of model inputs (winclip_edge/samples.py): given files, else references, textile normals or
synthetic frames; unreadable files skipped and reported; and every caller (OpenVINO and TensorRT int8 calibration,
quantize, tune, bench) gets exactly the loader's images."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import textured_part
from winclip_edge.bundle import Bundle
from winclip_edge.preprocess import read_image, resize_to_model
from winclip_edge.products import load_memory, save_memory
from winclip_edge.samples import REFERENCES, SYNTHETIC, TEXTILE, decode, load_model_inputs

SIZE = (240, 240)


@pytest.fixture
def files(tmp_path) -> list[str]:
    """Three parts of other sizes around an unreadable file."""
    paths = []
    for i, size in enumerate([(300, 400), (120, 90), (240, 240)]):
        path = tmp_path / f"part_{i}.png"
        assert cv2.imwrite(str(path), cv2.cvtColor(textured_part(size, seed=i), cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    return [paths[0], str(junk), *paths[1:]]


def expected(paths) -> np.ndarray:
    return np.stack([resize_to_model(read_image(p), SIZE) for p in paths])


def with_references(bundle_path, sources) -> Bundle:
    """The bundle's product with a memory whose references are ``sources`` (rows are not read by the loader)."""
    from winclip_edge import Inspector
    from winclip_edge.scoring import ScoringOptions

    bundle = Bundle(bundle_path)
    inspector = Inspector(bundle, "widget", options=ScoringOptions(use_memory=False), with_threshold=False)
    memory, _ = inspector.embed_references([textured_part(seed=s) for s in range(len(sources))])
    memory.sources = list(sources)
    save_memory(bundle, "widget", memory)
    assert load_memory(bundle, "widget").sources == list(sources)
    return bundle


def test_given_files_are_decoded_like_inspected_frames_and_bad_ones_reported(files):
    loaded = load_model_inputs(SIZE, files)
    assert loaded.images.dtype == np.uint8 and loaded.images.shape == (3, *SIZE, 3)
    assert loaded.images.tobytes() == expected([files[0], *files[2:]]).tobytes()
    assert loaded.images.tobytes() == np.stack([decode(p, SIZE, p).model_input for p in files if "junk" not in p]).tobytes()
    assert [p for p, _ in loaded.skipped] == [files[1]] and "not an image" in loaded.skipped[0][1]
    assert (loaded.described, loaded.tried) == ("3 given images", 4)
    first = load_model_inputs(SIZE, files, limit=2)  # stops at 2 readable images: the files after are not read
    assert first.images.tobytes() == expected([files[0], files[2]]).tobytes() and first.tried == 3
    nothing = load_model_inputs(SIZE, [files[1]])
    assert nothing.images.shape == (0, *SIZE, 3) and nothing.described == "0 given images" and nothing.tried == 1


def test_fallbacks_in_order_references_then_synthetic(bundle_copy, files):
    bundle = Bundle(bundle_copy)
    synthetic = load_model_inputs(SIZE, bundle=bundle, product="widget", fallbacks=(REFERENCES, SYNTHETIC), limit=3)
    assert synthetic.images.shape == (3, *SIZE, 3) and synthetic.images.std() > 0  # no references on disk yet
    assert synthetic.described == "3 synthetic frames (no reference images on disk)"
    again = load_model_inputs(SIZE, fallbacks=(SYNTHETIC,), limit=3)
    assert again.images.tobytes() == synthetic.images.tobytes() and again.described == "3 synthetic frames"

    bundle = with_references(bundle_copy, files)
    refs = load_model_inputs(SIZE, bundle=bundle, product="widget", fallbacks=(REFERENCES, SYNTHETIC), limit=8)
    assert refs.described == "3 the product's registered reference images" and refs.skipped[0][0] == files[1]
    assert refs.images.tobytes() == expected([files[0], *files[2:]]).tobytes()
    every_product = load_model_inputs(SIZE, bundle=bundle, fallbacks=(REFERENCES,), limit=8)
    assert every_product.images.tobytes() == refs.images.tobytes()
    given = load_model_inputs(SIZE, files[2:], bundle=bundle, fallbacks=(REFERENCES, SYNTHETIC))
    assert given.described == "2 given images"  # given files come first

    with_references(bundle_copy, [files[1]])  # references on disk, none readable: no silent fall-through
    unreadable = load_model_inputs(SIZE, bundle=bundle, product="widget", fallbacks=(REFERENCES, SYNTHETIC), limit=3)
    assert len(unreadable.images) == 0 and unreadable.source == "the product's registered reference images"
    assert load_model_inputs(SIZE).described == "0 no images"
    with pytest.raises(ValueError, match="unknown fallback"):
        load_model_inputs(SIZE, fallbacks=("camera",))


def test_textile_normals_fallback():
    pytest.importorskip("conformal_clip_data")
    from winclip_edge.evaluation.datasets import textile_root

    loaded = load_model_inputs(SIZE, fallbacks=(TEXTILE, SYNTHETIC), limit=2)
    root = textile_root() / "nominal"
    assert loaded.described == f"2 normal images of the textile data set ({root})"
    assert loaded.images.tobytes() == expected(sorted(str(p) for p in root.iterdir() if p.is_file())[:2]).tobytes()


def test_every_caller_gets_the_loaders_images(bundle_copy, files, capsys):
    from winclip_edge.builders.openvino import calibration_images
    from winclip_edge.builders.tensorrt import calibration_batches
    from winclip_edge.engines.onnx_variants import VariantError
    from winclip_edge.performance.tuning import TuneConfig, _fidelity_images

    bundle = with_references(bundle_copy, files)
    loaded = load_model_inputs(SIZE, files)
    images, described = calibration_images(bundle, "widget")  # OpenVINO int8: the references
    assert images.tobytes() == loaded.images.tobytes() and described == "3 the product's registered reference images"
    assert f"skipping {files[1]}: {files[1]}: not an image" in capsys.readouterr().err
    with pytest.raises(VariantError, match="no readable calibration image among 1 from given images"):
        calibration_images(bundle, "widget", paths=[files[1]])

    messages = []
    images, described = _fidelity_images(bundle, TuneConfig(fidelity_images=2), "widget", messages.append)
    assert images.tobytes() == loaded.images[:2].tobytes() and described.startswith("2 the product's")
    assert messages and files[1] in messages[0]

    batches = list(calibration_batches(files, SIZE, 2, messages.append))  # TensorRT: batches of the loader's images
    assert [b.shape[0] for b in batches] == [2] and batches[0].tobytes() == loaded.images[:2].tobytes()
    assert messages[-1] == "calibration: 2 image(s) used in batches of 2, 1 unreadable"
