"""Bundle integrity: a damaged, half-copied or mismatched bundle is refused at load with a message that
names the file and says what to do -- never loaded into different answers (docs/reliability.md)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import textured_part
from winclip_edge import cli
from winclip_edge.bundle import FORMAT_VERSION, MANIFEST, MEMORY, PRODUCTS, TEXT, THRESHOLD, VISUAL_ONNX, Bundle, \
    BundleError
from winclip_edge.inspector import Inspector
from winclip_edge.products import TextPrototypes, load_memory, save_memory, save_text

PRODUCT = "widget"
OTHER_SEED = 1  # the same tiny config with other random weights


def product_file(bundle: Path, name: str, product: str = PRODUCT) -> Path:
    return bundle / PRODUCTS / product / name


def edit_manifest(bundle: Path, **changes) -> None:
    path = bundle / MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def register(bundle: Path, seeds=range(3)) -> None:
    inspector = Inspector(bundle, PRODUCT)
    memory, failed = inspector.embed_references([textured_part(seed=s) for s in seeds])
    assert not failed
    save_memory(inspector.bundle, PRODUCT, memory)


def refusal(bundle: Path, product: str = PRODUCT) -> str:
    """The message of the BundleError raised when an Inspector loads ``bundle``."""
    with pytest.raises(BundleError) as info:
        Inspector(bundle, product)
    return str(info.value)


# ---------------------------------------------------------------- visual.onnx
def test_flipped_byte_in_visual_onnx(bundle_copy):
    path = bundle_copy / VISUAL_ONNX
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    message = refusal(bundle_copy)
    assert str(path) in message and "sha256" in message
    assert "copy the bundle again or re-export it" in message


def test_half_copied_visual_onnx(bundle_copy):
    path = bundle_copy / VISUAL_ONNX
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = refusal(bundle_copy)
    assert str(path) in message and "partly copied" in message


def test_missing_visual_onnx(bundle_copy):
    (bundle_copy / VISUAL_ONNX).unlink()
    message = refusal(bundle_copy)
    assert "visual.onnx is missing" in message and "copy the whole bundle folder again" in message


# ---------------------------------------------------------------- manifest
@pytest.mark.parametrize("version, words", [(FORMAT_VERSION + 1, ("newer than this winclip-edge reads",
                                                                   "upgrade winclip-edge or re-export")),
                                            (FORMAT_VERSION - 1, ("older than", "re-export the bundle"))])
def test_manifest_of_another_format_version(bundle_copy, version, words):
    edit_manifest(bundle_copy, format_version=version)
    message = refusal(bundle_copy)
    assert f"bundle format {version}" in message and all(w in message for w in words)


def test_unknown_future_fields_are_tolerated_and_kept(bundle_copy, tiny_bundle):
    future = {"calibration_images_hash": "ab" * 32, "ui": {"colour": "green", "levels": [1, 2]}}
    edit_manifest(bundle_copy, **future)
    bundle = Bundle(bundle_copy)
    assert bundle.manifest.extra == future
    assert {k: bundle.manifest.to_dict()[k] for k in future} == future  # kept when written again
    image = textured_part(seed=5)
    with_extra = Inspector(bundle, PRODUCT).inspect([image])[0]
    plain = Inspector(tiny_bundle, PRODUCT).inspect([image])[0]
    assert with_extra.score == plain.score and np.array_equal(with_extra.anomaly_map, plain.anomaly_map)


def test_unknown_fields_of_a_newer_version_are_still_refused(bundle_copy):
    edit_manifest(bundle_copy, format_version=FORMAT_VERSION + 1, new_thing=1)
    assert "newer than this winclip-edge reads" in refusal(bundle_copy)


def test_half_copied_manifest(bundle_copy):
    path = bundle_copy / MANIFEST
    path.write_text(path.read_text()[:200])
    message = refusal(bundle_copy)
    assert str(path) in message and "not valid JSON" in message and "re-export" in message


@pytest.mark.parametrize("change", [{"scales": 2}, {"grid": "15x15"}, {"weights": "abc"}, {"files": ["visual.onnx"]},
                                    {"embed_dim": "32"}, {"mean": [0.5, 0.5]}])
def test_manifest_field_of_the_wrong_type(bundle_copy, change):
    edit_manifest(bundle_copy, **change)
    message = refusal(bundle_copy)
    field = next(iter(change))
    assert MANIFEST in message and field in message and "re-export the bundle" in message


def test_manifest_that_is_not_an_object(bundle_copy):
    (bundle_copy / MANIFEST).write_text("[]")
    message = refusal(bundle_copy)
    assert "expected a JSON object" in message and "re-export the bundle" in message


# ---------------------------------------------------------------- product files
def test_missing_product(bundle_copy):
    message = refusal(bundle_copy, "gadget")
    assert "product 'gadget' is not in bundle" in message and "products: widget" in message
    assert f"winclip-edge product add --bundle {bundle_copy} gadget" in message


def test_text_from_a_bundle_of_another_dimension(bundle_copy, make_bundle):
    other = make_bundle("tiny224p32")  # D = 24 instead of 32, other weights
    shutil.copy(product_file(other, TEXT), product_file(bundle_copy, TEXT))
    message = refusal(bundle_copy)
    assert str(product_file(bundle_copy, TEXT)) in message and "made with other model weights" in message
    assert "winclip-edge product add" in message and "--force" in message


def test_text_of_another_dimension_with_this_bundles_weights(bundle_copy):
    bundle = Bundle(bundle_copy)
    d = bundle.manifest.embed_dim + 8
    unit = np.ones(d, np.float32) / np.sqrt(d)
    save_text(bundle, PRODUCT, TextPrototypes(unit, -unit, ("a",), ("b",), {"object_name": "widget"}))
    message = refusal(bundle_copy)
    assert f"has shape ({d},), the bundle's embedding is ({d - 8},)" in message
    assert "winclip-edge product add" in message


def test_half_copied_text(bundle_copy):
    path = product_file(bundle_copy, TEXT)
    path.write_bytes(path.read_bytes()[:-100])
    message = refusal(bundle_copy)
    assert str(path) in message and "damaged" in message


def test_memory_from_another_bundle_is_refused(bundle_copy, make_bundle, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(make_bundle(seed=OTHER_SEED), other)
    register(other)
    shutil.copy(product_file(other, MEMORY), product_file(bundle_copy, MEMORY))
    message = refusal(bundle_copy)
    assert str(product_file(bundle_copy, MEMORY)) in message and "made with other model weights" in message
    assert "winclip-edge register" in message


def test_half_copied_memory(bundle_copy):
    register(bundle_copy)
    path = product_file(bundle_copy, MEMORY)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    message = refusal(bundle_copy)
    assert str(path) in message and "damaged" in message and "winclip-edge register" in message


def test_edited_threshold(bundle_copy):
    register(bundle_copy)
    assert cli.main(["calibrate", "--bundle", str(bundle_copy), "--product", PRODUCT, "--quiet"]) == cli.EXIT_OK
    path = product_file(bundle_copy, THRESHOLD)
    obj = json.loads(path.read_text())
    obj["value"] = 0.99
    path.write_text(json.dumps(obj))
    message = refusal(bundle_copy)
    assert str(path) in message and "sha256" in message and "winclip-edge calibrate" in message


def test_refusals_reach_the_cli_as_one_line(bundle_copy, tmp_path, capsys):
    import cv2

    image = tmp_path / "part.png"
    cv2.imwrite(str(image), textured_part(seed=3))
    edit_manifest(bundle_copy, format_version=FORMAT_VERSION + 1)
    code = cli.main(["infer", "--bundle", str(bundle_copy), "--product", PRODUCT, "--out", str(tmp_path / "o"),
                     "--quiet", str(image)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_ERROR and len(err) == 1 and err[0].startswith("winclip-edge infer: error:")
    assert "upgrade winclip-edge" in err[0]


def test_a_memory_survives_its_load(bundle_copy):
    """The checks above are not over-eager: an intact bundle with memory and threshold loads."""
    register(bundle_copy)
    assert cli.main(["calibrate", "--bundle", str(bundle_copy), "--product", PRODUCT, "--quiet"]) == cli.EXIT_OK
    inspector = Inspector(bundle_copy, PRODUCT)
    assert inspector.memory.size == 3 and inspector.threshold is not None
    assert load_memory(inspector.bundle, PRODUCT).checksum == inspector.memory.checksum


def test_bundle_files_follow_the_umask_like_any_file(tiny_bundle, bundle_copy):
    """Temporary files are private (0600, folders 0700): the atomic writes must not carry that into the bundle,
    or a service account could not read a bundle that another account exported or registered."""
    from winclip_edge.fileio import DIR_MODE, FILE_MODE

    assert tiny_bundle.stat().st_mode & 0o777 == DIR_MODE
    for path in (tiny_bundle / MANIFEST, tiny_bundle / VISUAL_ONNX, product_file(tiny_bundle, TEXT)):
        assert path.stat().st_mode & 0o777 == FILE_MODE, path
    register(bundle_copy)
    assert product_file(bundle_copy, MEMORY).stat().st_mode & 0o777 == FILE_MODE
