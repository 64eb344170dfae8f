"""Cold start: ONNX Runtime's optimised graph is saved once per machine and reloaded verified, with equal outputs."""
import shutil

import numpy as np

from conftest import textured_part
from winclip_edge.bundle import Bundle
from winclip_edge.engines import EngineConfig, create_engine
from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
from winclip_edge.engines.registry import machine_key

CPU = EngineConfig(backend="onnxruntime", options=OnnxRuntimeOptions(provider="cpu"))


def _run(bundle: Bundle, config: EngineConfig = CPU):
    engine = create_engine(bundle, config)
    out = engine.run(np.stack([textured_part(seed=s) for s in range(2)]))
    engine.close()
    return engine.graph_cache, out


def test_optimised_graph_saved_once_then_reloaded_with_identical_outputs(bundle_copy):
    shutil.rmtree(bundle_copy / "engines", ignore_errors=True)  # the shared tiny bundle may carry a cache already
    bundle = Bundle(bundle_copy)
    first, a = _run(bundle)
    assert not first.hit and first.path.is_file() and first.sidecar.is_file()
    assert first.path.parent == bundle_copy / "engines" / f"onnxruntime-cpu-{machine_key()}"
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    second, b = _run(bundle)
    assert second.hit
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_damaged_cache_is_rebuilt_not_trusted(bundle_copy):
    bundle = Bundle(bundle_copy)
    cache, a = _run(bundle)
    data = bytearray(cache.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cache.path.write_bytes(bytes(data))
    rebuilt, b = _run(bundle)
    assert not rebuilt.hit
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert _run(bundle)[0].hit


def test_unwritable_cache_folder_runs_without_cache(bundle_copy, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    cache, out = _run(Bundle(bundle_copy), EngineConfig(backend="onnxruntime", engine_dir=blocker / "x",
                                                     options=OnnxRuntimeOptions(provider="cpu")))
    assert not cache.hit and not cache.path.exists() and out
