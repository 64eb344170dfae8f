"""The text encoder in the bundle: export, add-text-encoder, torch-free add-product, tamper checks, variants."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import textured_part
from winclip_edge.bundle import Bundle, BundleError
from winclip_edge.products import load_text
from winclip_edge.prompts import PromptSpec
from winclip_edge.text_encoder import TEXT_ONNX, TextEncoder, text_prototypes
from winclip_edge.tokenizer import TOKENIZER_JSON

REPO = Path(__file__).resolve().parents[1]
# Loaded first by every Python started with it on PYTHONPATH: torch and open_clip cannot be imported, and any
# attempt is written to stderr (a fallback that catches the ImportError would still be seen).
SITECUSTOMIZE = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "open_clip", "torchvision"):
                sys.stderr.write(f"BLOCKED IMPORT {name}\\n")
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, _Block())
""")


@pytest.fixture(scope="module")
def text_bundle(make_bundle) -> Path:
    return make_bundle(with_text_encoder=True)


@pytest.fixture
def text_copy(text_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(text_bundle, dst)
    return dst


def _export_stage_prototypes(bundle: Bundle, spec: PromptSpec):
    from winclip_edge.export.models import load_from_manifest
    from winclip_edge.export.text import text_prototypes as torch_prototypes

    loaded = load_from_manifest(bundle.manifest)
    return torch_prototypes(loaded.model, loaded.tokenizer, spec, show_progress=False)


def _cli(args, env_path: Path | None = None, timeout=120) -> subprocess.CompletedProcess:
    env = None
    if env_path is not None:
        import os

        env = {**os.environ, "PYTHONPATH": f"{env_path}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-m", "winclip_edge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_export_writes_a_verified_text_encoder(text_bundle):
    bundle = Bundle(text_bundle)
    section = bundle.manifest.text_encoder
    assert section["context_length"] == 77 and section["verification"]["max_abs_diff"] <= 1e-4
    for name in (TEXT_ONNX, TOKENIZER_JSON):
        assert (text_bundle / name).is_file() and len(section["files"][name]) == 64
    embeddings = TextEncoder(bundle).encode(["a photo of a widget.", "a photo of a damaged widget."] * 40)
    assert embeddings.shape == (80, bundle.manifest.embed_dim)  # a batch larger than one graph call
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)


def test_runtime_prototypes_equal_the_export_stage(text_bundle):
    bundle = Bundle(text_bundle)
    spec = PromptSpec(object_name="metal nut", extra_normal_states=("shiny {o}",), extra_templates=("{c}, top view.",))
    ours = text_prototypes(TextEncoder(bundle), spec, show_progress=False)
    reference = _export_stage_prototypes(bundle, spec)
    assert ours.normal_prompts == reference.normal_prompts and ours.anomalous_prompts == reference.anomalous_prompts
    assert np.abs(ours.t_normal - reference.t_normal).max() < 1e-5
    assert np.abs(ours.t_anomalous - reference.t_anomalous).max() < 1e-5
    assert np.abs(ours.t_normal - ours.t_anomalous).max() > 1e-3  # the two states do differ


def test_add_product_without_torch_then_infer(text_copy, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                           env={"PYTHONPATH": str(blocker)})
    assert probe.returncode != 0 and "BLOCKED IMPORT torch" in probe.stderr  # the blocker works

    run = _cli(["add-product", "--bundle", str(text_copy), "cable", "--normal-state", "{o} with clean insulation",
                "--quiet"], env_path=blocker)
    assert run.returncode == 0, run.stderr
    assert "BLOCKED IMPORT" not in run.stderr, run.stderr
    bundle = Bundle(text_copy)
    added = load_text(bundle, "cable")
    spec = PromptSpec(object_name="cable", extra_normal_states=("{o} with clean insulation",))
    reference = _export_stage_prototypes(bundle, spec)
    assert np.abs(added.t_normal - reference.t_normal).max() < 1e-5
    assert np.abs(added.t_anomalous - reference.t_anomalous).max() < 1e-5
    assert added.encoder["source"] == TEXT_ONNX and added.encoder["precision"] == "fp32"

    import cv2

    image = tmp_path / "part.png"
    cv2.imwrite(str(image), textured_part(seed=3, defect=(60, 60, 60, 60)))
    out = tmp_path / "out"
    run = _cli(["infer", "--bundle", str(text_copy), "--product", "cable", "--quiet", "--out", str(out), str(image)],
               env_path=blocker)
    assert run.returncode == 0 and "BLOCKED IMPORT" not in run.stderr, run.stderr
    (line,) = (out / "results.jsonl").read_text().splitlines()
    result = json.loads(line)
    from winclip_edge import Inspector

    expected = Inspector(text_copy, "cable").inspect([str(image)])[0]
    other = Inspector(text_copy, "widget").inspect([str(image)])[0]
    assert result["error"] is None and abs(result["score"] - expected.score) < 1e-6
    assert abs(result["score"] - other.score) > 1e-6  # the score is the new product's, not any product's


def test_add_product_refuses_an_existing_product_and_bad_states(text_copy):
    run = _cli(["add-product", "--bundle", str(text_copy), "widget", "--quiet"])
    assert run.returncode == 2 and "--force" in run.stderr
    run = _cli(["add-product", "--bundle", str(text_copy), "cable", "--normal-state", "no placeholder", "--quiet"])
    assert run.returncode == 2 and "placeholder" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("name", [TEXT_ONNX, TOKENIZER_JSON])
def test_a_tampered_text_file_is_refused(text_copy, name):
    path = text_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        TextEncoder(Bundle(text_copy))
    run = _cli(["add-product", "--bundle", str(text_copy), "cable", "--quiet"])
    assert run.returncode == 2 and "sha256" in run.stderr and not (text_copy / "products" / "cable").exists()


def test_add_text_encoder_to_an_existing_bundle(bundle_copy, config_dir, capsys):
    from winclip_edge.export.models import load_from_manifest, load_model
    from winclip_edge.export.text_encoder import TextExportError, add_text_encoder

    bundle = Bundle(bundle_copy)
    assert not bundle.manifest.text_encoder
    with pytest.raises(BundleError, match="no text encoder"):
        TextEncoder(bundle)
    other = load_model(str(config_dir / "tiny240.json"), "none", seed=1)
    with pytest.raises(TextExportError, match="weights differ"):
        add_text_encoder(bundle, other)
    assert not (bundle_copy / TEXT_ONNX).exists() and not Bundle(bundle_copy).manifest.text_encoder

    from winclip_edge.cli import main

    (bundle_copy / ".text-encoder-killed").mkdir()  # what a killed run leaves
    assert main(["add-text-encoder", "--bundle", str(bundle_copy)]) == 0
    bundle = Bundle(bundle_copy)
    assert bundle.manifest.text_encoder["files"][TEXT_ONNX]
    assert not [p for p in bundle_copy.iterdir() if p.name.startswith(".")]  # no temporary folder left
    capsys.readouterr()
    assert main(["info", "--bundle", str(bundle_copy)]) == 0
    assert "text encoder: text.onnx + tokenizer.json" in capsys.readouterr().out
    assert main(["add-text-encoder", "--bundle", str(bundle_copy)]) == 2
    assert "--force" in capsys.readouterr().err
    with pytest.raises(TextExportError, match="already has"):
        add_text_encoder(bundle, load_from_manifest(bundle.manifest))


def test_text_variants(text_copy):
    from winclip_edge.builders.variants import make_variant

    bundle = Bundle(text_copy)
    spec = PromptSpec(object_name="widget")
    fp32 = text_prototypes(TextEncoder(bundle), spec, show_progress=False)
    for precision in ("fp16", "int8"):
        info = make_variant(bundle, precision, graph="text")
        assert info.path.name == f"text.{precision}.onnx"
        run = _cli(["add-product", "--bundle", str(text_copy), f"widget_{precision}", "--object-name", "widget",
                    "--text-precision", precision, "--quiet"])
        assert run.returncode == 0, run.stderr
        low = load_text(Bundle(text_copy), f"widget_{precision}")
        assert low.encoder["precision"] == precision
        assert float(low.t_normal @ fp32.t_normal) > 0.99 and float(low.t_anomalous @ fp32.t_anomalous) > 0.99
    (text_copy / "variants" / "text.int8.onnx").write_bytes(b"damaged")
    run = _cli(["add-product", "--bundle", str(text_copy), "other", "--text-precision", "int8", "--quiet"])
    assert run.returncode == 2 and "sha256" in run.stderr
