"""Export: ONNX agrees with torch, the bundle round-trips, damage is detected."""
import numpy as np
import pytest

from winclip_edge.bundle import Bundle, BundleError
from winclip_edge.contract import output_names
from winclip_edge.engines import EngineConfig, create_engine
from winclip_edge.products import load_text


@pytest.mark.parametrize("config,scales", [("tiny240", (2, 3)), ("tiny224p32", (2, 3, 4)), ("tinyrect", (2, 3))])
def test_bundle_is_verified_and_round_trips(make_bundle, config, scales):
    bundle = Bundle(make_bundle(config, scales=scales))
    m = bundle.manifest
    assert m.scales == scales and m.format_version == 1 and m.weights["source"] == "none"
    assert max(m.verification["max_abs_diff"].values()) <= 1e-4
    assert set(m.verification["max_abs_diff"]) == set(output_names(scales))
    text = load_text(bundle, "widget")
    assert text.t_normal.shape == (m.embed_dim,) and np.linalg.norm(text.t_normal) == pytest.approx(1, abs=1e-5)
    assert len(text.normal_prompts) == 154 and len(text.anomalous_prompts) == 88
    assert text.prompt_spec["object_name"] == "widget"
    # the runtime engine agrees with the shapes of the contract at another batch size
    engine = create_engine(bundle, EngineConfig(backend="onnxruntime"))
    images = np.random.default_rng(0).integers(0, 256, (5, *m.image_size, 3), dtype=np.uint8)
    out = engine.run(images)
    for name, shape in m.spec.output_shapes().items():
        assert out[name].shape == (5, *shape[1:])
        assert np.allclose(np.linalg.norm(out[name], axis=-1), 1, atol=1e-4)


def test_onnx_equals_torch_on_a_fresh_batch(tiny_bundle):
    """Independent of the export's own check: ORT engine vs the torch reference engine."""
    bundle = Bundle(tiny_bundle)
    images = np.random.default_rng(7).integers(0, 256, (2, 240, 240, 3), dtype=np.uint8)
    a = create_engine(bundle, EngineConfig(backend="onnxruntime")).run(images)
    b = create_engine(bundle, EngineConfig(backend="torch")).run(images)
    for name in a:
        assert np.abs(a[name] - b[name]).max() < 1e-4, name


def test_tampered_onnx_is_detected(bundle_copy):
    path = bundle_copy / "visual.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle(bundle_copy)


def test_tampered_text_is_detected(bundle_copy):
    import io

    path = bundle_copy / "products" / "widget" / "text.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["t_normal"] = arrays["t_normal"] * 0.5
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(BundleError, match="sha256"):
        load_text(Bundle(bundle_copy), "widget")


def test_failed_verification_leaves_no_bundle(tmp_path, config_dir):
    from winclip_edge.export.onnx_export import ExportOptions, ExportVerificationError, export_bundle

    out = tmp_path / "b"
    with pytest.raises(ExportVerificationError, match="no bundle was written"):
        export_bundle(out, ExportOptions(model=str(config_dir / "tiny224p32.json"), pretrained="none", tolerance=0.0),
                      show_progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_offline_pretrained_tag_gives_clear_error(monkeypatch):
    from winclip_edge.export.models import WeightsUnavailableError, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="--pretrained PATH"):
        load_model("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(WeightsUnavailableError, match="neither a pretrained tag"):
        load_model("ViT-B-32", "no-such-tag")


def test_local_checkpoint_path(tmp_path, config_dir):
    """The offline path: --pretrained PATH loads an open_clip checkpoint and records its sha256."""
    import torch

    from winclip_edge.export.models import load_model

    source = load_model(str(config_dir / "tiny224p32.json"), "none", seed=5)
    ckpt = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), ckpt)
    loaded = load_model(str(config_dir / "tiny224p32.json"), str(ckpt))
    assert loaded.weights["source"] == "checkpoint" and len(loaded.weights["sha256"]) == 64
    assert loaded.weights["id"] == source.weights["id"]
