"""Engine caches with a bound (winclip_edge/engines/caches.py): a bundle used across package upgrades keeps at most the
configured number of machine-keyed caches, this machine's key is never removed, a stale one goes atomically, a
process that loses its cache mid-start runs (and rebuilds), a read-only bundle runs without caches, and
``winclip-edge cache list|clear`` shows and removes them. A package upgrade is simulated by changing the library
versions the machine key is made of; the caches are made by the real engines on the tiny bundle."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import textured_part
from winclip_edge.bundle import Bundle
from winclip_edge.cli import main
from winclip_edge.engines import EngineConfig, EngineError, caches, create_engine, registry
from winclip_edge.engines.cache_dir import ENGINE_DIR_ENV
from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
from winclip_edge.engines.ort_cache import OptimizedGraphCache

ORT_CPU = EngineConfig(backend="onnxruntime", options=OnnxRuntimeOptions(provider="cpu"))
OPENVINO = EngineConfig(backend="openvino")
IMAGES = np.stack([textured_part(seed=s) for s in range(2)])


@pytest.fixture
def upgrade(monkeypatch):
    """``upgrade(n)``: from now on this process has the n-th onnxruntime version (a new machine key); -> the key."""
    real = registry.machine_identity()

    def to(n: int) -> str:
        identity = {**real, "versions": {**real["versions"], "onnxruntime": f"1.{n}.0"}}
        monkeypatch.setattr(registry, "machine_identity", lambda: identity)
        return registry.machine_key()

    for name in (caches.KEEP_ENV, caches.MAX_MIB_ENV, ENGINE_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    return to


@pytest.fixture
def bundle(bundle_copy) -> Bundle:
    shutil.rmtree(bundle_copy / "engines", ignore_errors=True)  # the shared tiny bundle may carry a cache already
    return Bundle(bundle_copy)


def start(bundle: Bundle, config: EngineConfig = ORT_CPU):
    engine = create_engine(bundle, config)
    out = engine.run(IMAGES)
    engine.close()
    return engine, out


def cycle(bundle: Bundle, upgrade, n: int, config: EngineConfig = ORT_CPU) -> str:
    """Upgrade to the n-th version and start an engine (which makes its cache); -> the new key."""
    key = upgrade(n)
    start(bundle, config)
    return key


def keyed(bundle: Bundle, kind: str) -> set[str]:
    """The machine keys of ``kind`` in the bundle's engine folder."""
    return {e.key for e in caches.list_caches(bundle.root / "engines") if e.kind == kind}


def hidden(bundle: Bundle) -> list[str]:
    return [p.name for p in (bundle.root / "engines").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- the bound across package upgrades
def test_package_upgrades_keep_the_two_newest_keys_and_outputs_stay_identical(bundle, upgrade):
    reference = None
    keys = []
    for n in range(1, 5):
        keys.append(upgrade(n))
        engine, out = start(bundle)
        assert not engine.graph_cache.hit and engine.graph_cache.path.is_file()  # a new key: a new cache
        assert keyed(bundle, caches.ORT_CPU) == set(keys[-2:])  # this key + the one before (default keep 2)
        reference = reference or out
        for name in out:
            np.testing.assert_array_equal(out[name], reference[name])
    assert start(bundle)[0].graph_cache.hit  # the current key's cache survived its own pruning
    assert hidden(bundle) == []  # no tombstone or temporary file left


def test_a_rollback_reuses_the_kept_key_and_the_least_recently_used_goes(bundle, upgrade):
    one = upgrade(1)
    start(bundle)
    upgrade(2)
    start(bundle)
    upgrade(1)  # the package downgraded again: its cache is still there
    assert start(bundle)[0].graph_cache.hit
    three = upgrade(3)
    start(bundle)
    assert keyed(bundle, caches.ORT_CPU) == {three, one}  # 2 was used less recently than 1


def test_each_kind_has_its_own_bound(bundle, upgrade):
    pytest.importorskip("openvino")
    keys = []
    for n in range(1, 4):
        keys.append(upgrade(n))
        start(bundle, ORT_CPU)
        engine, _ = start(bundle, OPENVINO)
        assert engine.cache == bundle.root / "engines" / f"openvino-{keys[-1]}" and any(engine.cache.iterdir())
    assert keyed(bundle, caches.ORT_CPU) == keyed(bundle, caches.OPENVINO) == set(keys[-2:])


@pytest.mark.parametrize("keep", [1, 3])
def test_keep_is_configurable(bundle, upgrade, monkeypatch, keep):
    monkeypatch.setenv(caches.KEEP_ENV, str(keep))
    keys = [cycle(bundle, upgrade, n) for n in range(1, 5)]
    assert keyed(bundle, caches.ORT_CPU) == set(keys[-keep:])


def test_size_cap_removes_the_least_recently_used_stale_caches_never_this_machines(bundle, upgrade, monkeypatch):
    upgrade(1)
    size = start(bundle)[0].graph_cache.path.stat().st_size
    monkeypatch.setenv(caches.KEEP_ENV, "10")
    monkeypatch.setenv(caches.MAX_MIB_ENV, f"{2.5 * size / caches.MIB}")  # room for two caches
    keys = [cycle(bundle, upgrade, n) for n in range(2, 6)]
    assert keyed(bundle, caches.ORT_CPU) == set(keys[-2:])
    monkeypatch.setenv(caches.MAX_MIB_ENV, "0")  # smaller than this machine's own cache: that one still stays
    six = upgrade(6)
    start(bundle)
    assert keyed(bundle, caches.ORT_CPU) == {six}
    assert start(bundle)[0].graph_cache.hit


def test_the_bound_never_drops_this_machines_key():
    def entry(kind, key, used, current=False, size=100 * caches.MIB):
        return caches.CacheEntry(kind, f"{kind}-{key}", (Path(f"{kind}-{key}"),), key, size, used, current)

    here = entry(caches.ORT_CPU, "a" * 12, used=0.0, current=True)  # the oldest of all, and the largest share
    stale = [entry(caches.ORT_CPU, c * 12, used=float(i + 1)) for i, c in enumerate("bcd")]
    legacy = caches.CacheEntry(caches.ORT_TENSORRT, caches.ORT_TENSORRT, (Path("x"),), None, 1, 9.0, False)
    plan = caches.CacheEntry(caches.TENSORRT, "gpu-plan", (Path("p.plan"),), None, 10 ** 10, 0.0, False)
    entries = [here, *stale, legacy, plan]
    for bound in (caches.CacheBound(keep=1), caches.CacheBound(keep=1, max_mib=0), caches.CacheBound(keep=5, max_mib=0)):
        for kind in caches.KEYED_KINDS:
            drop = caches.over_bound(entries, kind, bound)
            assert here not in drop and plan not in drop
    assert set(caches.over_bound(entries, caches.ORT_CPU, caches.CacheBound())) == set(stale[:2])  # d: the newest stale
    assert caches.over_bound(entries, caches.ORT_TENSORRT, caches.CacheBound()) == [legacy]  # unkeyed: never read again
    assert set(caches.over_bound(entries, caches.OPENVINO, caches.CacheBound(max_mib=150))) == set(stale)


# ---------------------------------------------------------------- atomic removal, concurrent processes
def test_a_stale_cache_goes_by_tombstone_and_a_killed_removal_is_swept(bundle, upgrade, monkeypatch):
    one = upgrade(1)
    start(bundle)
    upgrade(2)
    start(bundle)
    monkeypatch.setattr(caches, "_delete", lambda path: None)  # killed right after the rename
    monkeypatch.setenv(caches.KEEP_ENV, "1")
    upgrade(3)
    start(bundle)
    assert one not in keyed(bundle, caches.ORT_CPU) and len(keyed(bundle, caches.ORT_CPU)) == 1
    tombs = hidden(bundle)
    assert len(tombs) == 2 and all(t.startswith(caches.TOMBSTONE) for t in tombs)  # hidden: never listed, never loaded
    monkeypatch.undo()
    caches.sweep(bundle.root / "engines")
    assert hidden(bundle) == []


@pytest.mark.parametrize("when", ["cached", "saving"])
def test_a_process_whose_cache_is_removed_mid_start_runs_and_rebuilds(bundle, upgrade, monkeypatch, when):
    """Another process of a newer key prunes this (older) key's folder between the check and ONNX Runtime's load
    (``cached``), or while ONNX Runtime is about to save the optimised graph into it (``saving``)."""
    upgrade(1)
    _, reference = start(bundle)
    if when == "saving":
        shutil.rmtree(bundle.root / "engines")
    real = OptimizedGraphCache.prepare

    def prepare_then_lose_it(self, options):
        path = real(self, options)
        assert self.hit == (when == "cached")
        for entry in caches.list_caches(self.engine_dir):
            assert caches.remove(entry)
        return path

    monkeypatch.setattr(OptimizedGraphCache, "prepare", prepare_then_lose_it)
    engine, out = start(bundle)
    assert engine.graph_cache is None  # ran from the bundle's graph
    for name in reference:
        np.testing.assert_array_equal(out[name], reference[name])
    monkeypatch.setattr(OptimizedGraphCache, "prepare", real)
    assert not start(bundle)[0].graph_cache.hit and start(bundle)[0].graph_cache.hit  # rebuilt, then used
    assert hidden(bundle) == []


def test_an_engine_keeps_running_when_its_stale_cache_is_removed_under_it(bundle, upgrade, monkeypatch):
    upgrade(1)
    start(bundle)
    running = create_engine(bundle, ORT_CPU)  # a station of the old version, started from its cache
    assert running.graph_cache.hit
    before = running.run(IMAGES)
    monkeypatch.setenv(caches.KEEP_ENV, "1")
    two = upgrade(2)
    start(bundle)  # the new version's process: its bound removes the old key's folder
    assert keyed(bundle, caches.ORT_CPU) == {two} and not running.graph_cache.path.exists()
    after = running.run(IMAGES)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


# ---------------------------------------------------------------- read-only bundles, a moved engine folder
def test_a_read_only_bundle_runs_without_caches(bundle, upgrade, monkeypatch):
    real_access = os.access
    engines = bundle.root / "engines"
    # root may write anywhere, so the read-only bundle is what os.access says (as on a read-only mount)
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(engines)) and mode == os.W_OK
                        else real_access(p, mode))
    upgrade(1)
    engine, out = start(bundle)
    assert not engine.graph_cache.hit and engine.graph_cache.pending is None and not engine.graph_cache.path.exists()
    if importlib.util.find_spec("openvino") is not None:
        assert start(bundle, OPENVINO)[0].cache is None


def test_a_read_only_bundle_whose_folder_cannot_be_made_runs(bundle, upgrade, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    engine, out = start(bundle)
    assert not engine.graph_cache.hit and not (bundle.root / "engines").exists() and out


def test_engine_dir_env_moves_the_caches_and_the_flag_wins(bundle, upgrade, monkeypatch, tmp_path, capsys):
    key = upgrade(1)
    monkeypatch.setenv(ENGINE_DIR_ENV, str(tmp_path / "moved"))
    engine, _ = start(bundle)
    assert engine.graph_cache.path.parent == tmp_path / "moved" / f"onnxruntime-cpu-{key}"
    assert not (bundle.root / "engines").exists()
    flagged = EngineConfig(backend="onnxruntime", engine_dir=tmp_path / "flag", options=OnnxRuntimeOptions(provider="cpu"))
    assert start(bundle, flagged)[0].graph_cache.path.parent == tmp_path / "flag" / f"onnxruntime-cpu-{key}"
    assert main(["cache", "list", "--bundle", str(bundle.root)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "moved") in out and f"onnxruntime-cpu-{key}" in out and "this machine" in out


def test_a_bad_bound_is_one_line_naming_the_variable(bundle, upgrade, monkeypatch, capsys):
    monkeypatch.setenv(caches.KEEP_ENV, "two")
    with pytest.raises(EngineError, match=f"{caches.KEEP_ENV}='two' is not a whole number"):
        create_engine(bundle, ORT_CPU)
    monkeypatch.setenv(caches.KEEP_ENV, "0")
    with pytest.raises(EngineError, match="keep 0 < 1"):
        create_engine(bundle, ORT_CPU)
    monkeypatch.setenv(caches.KEEP_ENV, "2")
    monkeypatch.setenv(caches.MAX_MIB_ENV, "lots")
    assert main(["cache", "list", "--bundle", str(bundle.root)]) == 2
    err = capsys.readouterr().err
    assert f"{caches.MAX_MIB_ENV}='lots' is not a number of MiB" in err and "Traceback" not in err


# ---------------------------------------------------------------- ONNX Runtime's TensorRT provider (no GPU needed)
def test_tensorrt_provider_caches_are_keyed_and_bounded(bundle, upgrade, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    real = ort.InferenceSession
    created = []

    def session(path, sess_options=None, providers=None):
        created.append(providers)
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    legacy = bundle.root / "engines" / caches.ORT_TENSORRT  # the unkeyed folder of earlier versions
    legacy.mkdir(parents=True)
    (legacy / "TensorrtExecutionProvider_cache_sm87.timing").write_bytes(b"x")
    trt = EngineConfig(backend="onnxruntime", options=OnnxRuntimeOptions(provider="tensorrt"))
    keys = []
    for n in range(1, 4):
        keys.append(upgrade(n))
        start(bundle, trt)
        folder = Path(created[-1][0][1]["trt_engine_cache_path"])
        assert folder == bundle.root / "engines" / f"onnxruntime-tensorrt-{keys[-1]}" and folder.is_dir()
        (folder / "engine.engine").write_bytes(b"built")  # what the provider writes on a GPU
        assert not legacy.exists()
    assert keyed(bundle, caches.ORT_TENSORRT) == set(keys[-2:])


# ---------------------------------------------------------------- TensorRT plans: listed, never bounded
def test_tensorrt_plans_are_not_bounded_and_cleared_only_when_named(bundle, upgrade, monkeypatch, capsys):
    from test_tensorrt import FakeCudart, fake_tensorrt
    from winclip_edge.builders import tensorrt as trt_build
    from winclip_edge.builders.tensorrt import BuildOptions, build_engine

    cudart = FakeCudart()
    fake = fake_tensorrt(cudart)
    monkeypatch.setattr(trt_build, "load_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_build, "load_cudart", lambda: cudart)
    cached = build_engine(bundle, BuildOptions(), log=lambda _: None)
    built = sorted(p.name for p in (bundle.root / "engines").iterdir())
    monkeypatch.setenv(caches.KEEP_ENV, "1")
    monkeypatch.setenv(caches.MAX_MIB_ENV, "0")
    for n in range(1, 4):
        upgrade(n)
        start(bundle)
    assert cached.plan.is_file() and cached.plan.with_suffix(".json").is_file()
    assert {p.name for p in (bundle.root / "engines").iterdir()} >= set(built)

    root = str(bundle.root)
    assert main(["cache", "list", "--bundle", root]) == 0
    listing = capsys.readouterr().out
    assert cached.plan.stem in listing and "engine build's (not bounded" in listing
    assert main(["cache", "clear", "--bundle", root]) == 0  # the self-remaking caches only
    assert "TensorRT plans kept" in capsys.readouterr().out
    assert keyed(bundle, caches.ORT_CPU) == set() and cached.plan.is_file()
    assert main(["cache", "clear", "--bundle", root, "--kind", "tensorrt", "--stale"]) == 2
    assert "--stale cannot tell which TensorRT plans fit" in capsys.readouterr().err
    assert main(["cache", "clear", "--bundle", root, "--kind", "tensorrt"]) == 0
    assert not any((bundle.root / "engines").iterdir())


# ---------------------------------------------------------------- the commands
def test_cache_list_clear_and_info(bundle, upgrade, monkeypatch, capsys):
    monkeypatch.setenv(caches.KEEP_ENV, "3")
    old = [cycle(bundle, upgrade, n) for n in (1, 2)]
    here = cycle(bundle, upgrade, 3)
    root = str(bundle.root)
    assert main(["cache", "list", "--bundle", root]) == 0
    out = capsys.readouterr().out
    assert f"this machine's key {here}" in out and "kept: the 3 most recently used" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("  onnxruntime-cpu")}
    assert "this machine" in lines[f"onnxruntime-cpu-{here}"]
    assert all("stale" in lines[f"onnxruntime-cpu-{k}"] for k in old)
    assert "stale" in out.splitlines()[-1] and "cache clear" in out.splitlines()[-1]
    assert main(["info", "--bundle", root]) == 0
    info = [line for line in capsys.readouterr().out.splitlines() if "engine caches in" in line]
    assert len(info) == 1 and "onnxruntime-cpu" in info[0] and "MiB" in info[0] and "in 2" in info[0]

    assert main(["cache", "clear", "--bundle", root, "--stale"]) == 0
    assert "removed 2 cache(s)" in capsys.readouterr().out
    assert keyed(bundle, caches.ORT_CPU) == {here} and start(bundle)[0].graph_cache.hit
    assert main(["cache", "clear", "--bundle", root, "--kind", "onnxruntime-cpu"]) == 0
    assert keyed(bundle, caches.ORT_CPU) == set() and hidden(bundle) == []
    assert not start(bundle)[0].graph_cache.hit  # remade at the next start

    monkeypatch.setattr(os, "rename", lambda *a: (_ for _ in ()).throw(PermissionError(30, "Read-only file system")))
    assert main(["cache", "clear", "--bundle", root]) == 1  # a read-only bundle: said, not crashed
    assert "cannot remove" in capsys.readouterr().err and keyed(bundle, caches.ORT_CPU) == {here}
    assert main(["cache", "list", "--bundle", str(bundle.root / "products")]) == 2  # not a bundle: one line


def test_openvino_whose_cache_folder_went_mid_start_compiles_without_it(bundle, upgrade, monkeypatch, tmp_path):
    pytest.importorskip("openvino")
    from winclip_edge.engines import openvino as ov_backend

    blocker = tmp_path / "file"
    blocker.write_text("")  # OpenVINO cannot remake the folder below a file: its compile with CACHE_DIR fails
    monkeypatch.setattr(ov_backend, "cache_dir", lambda bundle, config, bound=None: (blocker / "gone", False))
    engine, out = start(bundle, OPENVINO)
    assert engine.cache is None
    _, reference = start(bundle, ORT_CPU)
    for name in reference:
        np.testing.assert_allclose(out[name], reference[name], rtol=0, atol=1e-5)
