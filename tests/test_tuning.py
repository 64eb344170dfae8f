"""tune + --backend auto: candidates timed and gated on fidelity, the winner recorded per machine and used by auto."""
import json

import numpy as np
import pytest

from winclip_edge.bundle import Bundle
from winclip_edge.cli import EXIT_OK, main
from winclip_edge.engines import EngineConfig, create_engine
from winclip_edge.engines import auto
from winclip_edge.performance.tuning import TuneConfig, render_table, run_tune, save_record

FAST = dict(fidelity_images=2, warmup=0, backends=("onnxruntime",), build_variants=False)


class NoisyEngine:
    """A deliberately broken candidate: the real engine's outputs plus noise (as a bad int8 model would give)."""

    def __init__(self, engine, scale: float):
        self.engine, self.scale = engine, scale
        self.name, self.device = engine.name, f"{engine.device} + noise"
        self.rng = np.random.default_rng(0)

    def run(self, images):
        out = self.engine.run(images)
        return {k: v + self.rng.normal(0, self.scale, v.shape).astype(np.float32) for k, v in out.items()}

    def close(self):
        self.engine.close()


def _factory(noisy: dict):
    """create_engine, except that configs in ``noisy`` (config -> noise scale) get noise added."""
    def make(bundle, config):
        engine = create_engine(bundle, config)
        return NoisyEngine(engine, noisy[config]) if config in noisy else engine
    return make


@pytest.fixture(scope="module")
def tuned(tiny_bundle, tmp_path_factory):
    """A tuned copy of the tiny bundle: ORT fp32 at 1 and 2 threads, a faithful 'fast' one, a broken one."""
    import shutil

    root = tmp_path_factory.mktemp("tuned") / "bundle"
    shutil.copytree(tiny_bundle, root)
    bundle = Bundle(root)
    record = run_tune(bundle, TuneConfig(**{**FAST, "threads": (1, 2)}),
                      factory=_factory({EngineConfig(backend="onnxruntime", precision="fp32", threads=1): 1e-2}))
    save_record(bundle, record)
    return bundle, record


def test_fidelity_gate_rejects_the_broken_candidate(tuned):
    _, record = tuned
    rows = {(c["backend"], c["precision"], c["threads"]): c for c in record["candidates"]}
    broken = rows[("onnxruntime", "fp32", 1)]
    assert broken["status"] == "rejected" and "unfaithful" in broken["reason"]
    assert broken["score_max_abs"] > 2e-3 or broken["map_max_abs"] > 1e-2
    for threads in (0, 2):  # the reference (library default threads) and the faithful 2-thread candidate
        good = rows[("onnxruntime", "fp32", threads)]
        assert good["status"] == "accepted" and good["ms_per_image"] > 0 and good["score_max_abs"] < 1e-5
    assert record["winner"]["status"] == "accepted" and record["winner"]["threads"] in (0, 2)
    skipped = [c for c in record["candidates"] if c["status"] == "skipped"]
    assert any(c["precision"] == "int8" for c in skipped)  # no int8 variant and --no-build: said, not dropped
    table = render_table(record)
    assert "AMD" in table or record["machine"]["cpu"] in table
    assert "rejected" in table and "unfaithful" in table


def test_record_is_checksummed_and_keyed_by_machine(tuned):
    bundle, record = tuned
    path = auto.record_path(bundle)
    assert path.parent.name == "tuning" and path.stem == record["machine_key"]
    assert auto.load_record(bundle)["winner"] == record["winner"]
    body = json.loads(path.read_text())
    body["winner"]["precision"] = "int8"  # edited by hand: refused, auto falls back
    path.write_text(json.dumps(body))
    selection = auto.select(bundle, EngineConfig(backend="auto"))
    assert selection.config.backend == "onnxruntime" and selection.config.precision == "fp32"
    assert "checksum" in selection.reason or "damaged" in selection.reason
    save_record(bundle, record)


def test_auto_picks_the_recorded_winner_and_falls_back_on_another_machine(tuned, monkeypatch):
    bundle, record = tuned
    selection = auto.select(bundle, EngineConfig(backend="auto"))
    assert selection.config == EngineConfig(backend="onnxruntime", precision="fp32", threads=record["winner"]["threads"])
    assert "tuned winner" in selection.reason
    engine = create_engine(bundle, EngineConfig(backend="auto"))
    assert engine.name == "onnxruntime"
    monkeypatch.setattr(auto, "machine_key", lambda: "another0machine")
    selection = auto.select(bundle, EngineConfig(backend="auto"))
    assert selection.record is None and selection.config == EngineConfig(backend="onnxruntime", precision="fp32")
    assert "no tune record for this machine" in selection.reason and record["machine_key"] in selection.reason


def test_auto_with_a_precision_takes_the_fastest_accepted_engine_of_that_precision(tuned):
    bundle, record = tuned
    faithful = [c for c in record["candidates"] if c["status"] == "accepted" and c["precision"] == "fp32"]
    fastest = min(faithful, key=lambda c: c["ms_per_image"])
    selection = auto.select(bundle, EngineConfig(backend="auto", precision="fp32"))
    assert selection.config == EngineConfig(backend=fastest["backend"], precision="fp32", threads=fastest["threads"])
    assert "fastest fp32 engine `tune` measured" in selection.reason
    assert selection.config.threads != 1  # the rejected (noisy) 1-thread candidate is never chosen
    body = json.loads(auto.record_path(bundle).read_text())
    rows = [c for c in body["candidates"] if c["precision"] == "fp32" and c["status"] == "accepted"]
    assert auto.fastest_accepted(body, "fp32") == min(rows, key=lambda c: c["ms_per_image"])
    selection = auto.select(bundle, EngineConfig(backend="auto", precision="int8"))  # tune accepted no int8 engine
    assert selection.record is None and selection.config == EngineConfig(backend="onnxruntime", precision="int8")
    assert "accepted no int8 engine" in selection.reason


def test_auto_refuses_a_record_of_another_graph(tuned, tmp_path):
    import shutil

    bundle, _ = tuned
    copy = tmp_path / "b"
    shutil.copytree(bundle.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["visual.onnx"] = "0" * 64  # as if re-exported
    (copy / "manifest.json").write_text(json.dumps(manifest))
    selection = auto.select(Bundle(copy, verify=False), EngineConfig(backend="auto"))
    assert selection.record is None and "another visual.onnx" in selection.reason


def test_cli_tune_then_infer_says_which_engine_and_why(bundle_copy, tmp_path, capsys):
    from conftest import textured_part
    import cv2

    image = tmp_path / "part.png"
    cv2.imwrite(str(image), textured_part())
    argv = ["tune", "--bundle", str(bundle_copy), "--fidelity-images", "1", "--warmup", "0",
            "--backends", "onnxruntime,openvino", "--no-build"]
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert "winner on this machine" in out and "| rank |" in out and "--precision fp32 runs it" in out
    winner = auto.load_record(Bundle(bundle_copy))["winner"]
    assert main(["infer", "--bundle", str(bundle_copy), "--product", "widget", "--out", str(tmp_path / "r"),
                 str(image)]) == EXIT_OK
    err = capsys.readouterr().err
    assert f"engine: {winner['backend']} {winner['precision']}: tuned winner for this machine" in err
    fastest_fp32 = auto.fastest_accepted(auto.load_record(Bundle(bundle_copy)), "fp32")
    assert main(["infer", "--bundle", str(bundle_copy), "--product", "widget", "--precision", "fp32",
                 "--out", str(tmp_path / "r2"), str(image)]) == EXIT_OK
    assert (f"engine: {fastest_fp32['backend']} fp32: fastest fp32 engine `tune` measured for this machine"
            in capsys.readouterr().err)
    assert main(["infer", "--bundle", str(bundle_copy), "--product", "widget", "--provider", "cpu",
                 "--out", str(tmp_path / "r3"), str(image)]) == EXIT_OK
    assert "engine: onnxruntime fp32 (--provider given without --backend)" in capsys.readouterr().err
    assert main(["info", "--bundle", str(bundle_copy)]) == EXIT_OK
    info = capsys.readouterr().out
    assert "engine (--backend auto) on this machine: " + f"{winner['backend']} {winner['precision']}" in info
    assert "so a threshold calibrated under one holds under another to within" in info
    assert f"fastest exact engine on this machine (--precision fp32): {fastest_fp32['backend']} fp32" in info
