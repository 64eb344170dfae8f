"""Backends as a registry: built-ins and entry-point plugins alike, `auto` resolved once in the library, options a
backend does not take refused by name, one bundle opened per command, the machine key unchanged."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import textured_part
from winclip_edge.bundle import Bundle, json_with_checksum
from winclip_edge.cli import EXIT_ERROR, EXIT_OK, build_parser, main
from winclip_edge.cli.common import engine_config
from winclip_edge.engines import EngineConfig, EngineError, create_engine, registry, select
from winclip_edge.engines.auto import record_path
from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
from winclip_edge.engines.openvino import OpenVinoOptions
from winclip_edge.engines.torch import TorchOptions
from winclip_edge.fileio import atomic_write_json

# The plugin: one file outside the package, registered as an entry point of a (fake) installed distribution.
PLUGIN = '''
"""A backend defined outside winclip_edge: ONNX Runtime under other names."""
from dataclasses import dataclass

from winclip_edge.engines.config import EngineConfig
from winclip_edge.engines.onnxruntime import OnnxRuntimeEngine
from winclip_edge.engines.registry import BackendRecord, option


@dataclass(frozen=True)
class WrappedOptions:
    label: str = option("plain", help="a word for the device description")


class WrappedEngine:
    name = "wrapped"

    def __init__(self, bundle, config):
        label = (config.options or WrappedOptions()).label
        self.inner = OnnxRuntimeEngine(bundle, EngineConfig(backend="onnxruntime", precision=config.precision,
                                                            threads=config.threads))
        self.device = f"{label} {self.inner.device}"

    def run(self, images):
        return self.inner.run(images)

    def close(self):
        self.inner.close()


BACKEND = BackendRecord(name="wrapped", create=WrappedEngine, precisions=("fp32",), options=WrappedOptions,
                        takes=("threads",), summary="ONNX Runtime, wrapped")


class BareEngine(WrappedEngine):
    """ONNX Runtime as a bare class."""

    name = "bare"
    precisions = ("fp32",)
'''
ENTRY_POINTS = """[winclip_edge.backends]
wrapped = winclip_test_plugin:BACKEND
bare = winclip_test_plugin:BareEngine
broken = winclip_test_missing_module:Engine
onnxruntime = winclip_test_plugin:BareEngine
"""
OLD_ENGINE_PACKAGES = ("onnxruntime", "onnxruntime-gpu", "openvino", "torch", "tensorrt", "numpy")


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """A folder that, on sys.path, holds the plugin module and the dist-info that declares its entry points."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "winclip_test_plugin.py").write_text(PLUGIN)
    info = root / "winclip_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: winclip-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def plugin(plugin_dir, monkeypatch):
    """The plugin installed in this process (sys.path + a fresh registry), removed afterwards."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    registry.refresh()
    yield plugin_dir
    monkeypatch.undo()
    sys.modules.pop("winclip_test_plugin", None)
    registry.refresh()


def _images(n: int = 2) -> np.ndarray:
    return np.stack([textured_part(seed=s) for s in range(n)])


def _reference(bundle: Bundle, images: np.ndarray) -> dict:
    return create_engine(bundle, EngineConfig(backend="onnxruntime")).run(images)


# ---------------------------------------------------------------- the registry and its plugins
def test_builtins_are_records_in_the_default_order():
    records = registry.backends()
    assert list(records)[:5] == ["onnxruntime", "openvino", "torch", "tensorrt", "triton"]
    assert all(r.builtin for r in records.values())
    assert records["tensorrt"].default_precision == "fp16" and records["torch"].takes == ("device",)
    assert records["onnxruntime"].options is OnnxRuntimeOptions and records["triton"].takes == ()


def test_machine_key_is_the_one_of_the_old_package_list():
    """The same installed packages give the same key as before the registry (caches and tune records stay valid)."""
    from winclip_edge.performance import machine

    assert registry.engine_packages() == OLD_ENGINE_PACKAGES
    assert registry.machine_key() == machine.machine_key(machine.machine_identity(OLD_ENGINE_PACKAGES))


def test_plugins_load_by_entry_point_and_a_broken_one_is_reported_not_fatal(plugin, tiny_bundle):
    records, broken = registry.backends(), registry.broken_backends()
    assert records["wrapped"].origin == "winclip_test_plugin:BACKEND" and not records["wrapped"].builtin
    assert records["bare"].precisions == ("fp32",) and records["bare"].options is None and records["bare"].takes == ()
    assert "ModuleNotFoundError" in broken["broken"] and "winclip_test_missing_module" in broken["broken"]
    assert "taken by the built-in" in broken["onnxruntime"]  # a plugin may not replace a built-in
    assert records["onnxruntime"].builtin and records["onnxruntime"].create.__name__ == "OnnxRuntimeEngine"
    with pytest.raises(EngineError, match=r"backend 'broken' could not be loaded \(.*ModuleNotFoundError"):
        create_engine(Bundle(tiny_bundle), EngineConfig(backend="broken"))
    bundle, images = Bundle(tiny_bundle), _images()
    expected = _reference(bundle, images)  # the built-ins still work
    for name in ("wrapped", "bare"):
        engine = create_engine(bundle, EngineConfig(backend=name))
        out = engine.run(images)
        assert set(out) == set(expected) and all(np.array_equal(out[k], expected[k]) for k in expected)
    engine = create_engine(bundle, EngineConfig(backend="wrapped", threads=1,
                                                options=registry.backend("wrapped").options(label="shiny")))
    assert engine.device.startswith("shiny ")


def test_a_plugin_is_run_by_infer_with_the_scores_of_onnxruntime_and_listed_in_help(plugin_dir, tiny_bundle,
                                                                                   tmp_path):
    """The done-when of the registry: `winclip-edge infer --backend NAME` with a backend defined in one file outside
    the package and registered by entry point, in a fresh process, gives the scores of --backend onnxruntime."""
    images = tmp_path / "images"
    images.mkdir()
    for s in range(2):
        cv2.imwrite(str(images / f"part{s}.png"), textured_part(seed=s, defect=(60, 80, 40, 40) if s else None))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-c", "import sys; from winclip_edge.cli import main; sys.exit(main(sys.argv[1:]))"]
    common = ["--bundle", str(tiny_bundle), "--product", "widget", "--quiet"]
    runs = {}
    for backend in ("wrapped", "onnxruntime"):
        out = tmp_path / backend
        done = subprocess.run([*cli, "infer", *common, "--backend", backend, "--out", str(out), str(images)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == EXIT_OK, done.stderr
        assert f"with {backend} (" in done.stderr  # the plugin's engine ran, not a fallback
        runs[backend] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        runs[backend + " maps"] = {p.name: np.load(p) for p in sorted((out / "maps").glob("*.npy"))}
    assert [r["score"] for r in runs["wrapped"]] == [r["score"] for r in runs["onnxruntime"]]
    assert all(r["score"] is not None for r in runs["wrapped"]) and len(runs["wrapped"]) == 2
    maps, reference = runs["wrapped maps"], runs["onnxruntime maps"]
    assert maps.keys() == reference.keys() and all(np.array_equal(maps[k], reference[k]) for k in maps)
    shown = subprocess.run([*cli, "infer", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    usage = " ".join(shown.stdout.split())
    assert "{auto,onnxruntime,openvino,torch,tensorrt,triton,wrapped,bare}" in usage
    assert "--wrapped-label" in usage and "plugins: wrapped (winclip_test_plugin:BACKEND)" in usage
    assert "plugins that failed to load: broken" in usage


def test_info_lists_the_backends_and_the_broken_plugin(plugin, tiny_bundle, capsys):
    assert main(["info", "--bundle", str(tiny_bundle)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "  onnxruntime: onnxruntime " in out and "precisions fp32, fp16, int8" in out
    assert "wrapped (plugin winclip_test_plugin:BACKEND)" in out and "flags --threads, --wrapped-label" in out
    assert "broken: plugin failed to load" in out


# ---------------------------------------------------------------- what a backend does not take is an error
def test_an_option_the_backend_does_not_take_is_an_error_naming_it(tiny_bundle, plugin):
    bundle = Bundle(tiny_bundle)
    cases = [(EngineConfig(backend="torch", threads=2), r"threads is not an option of the torch backend \(it takes: device\)"),
             (EngineConfig(backend="tensorrt", device="cuda:1"), "device is not an option of the tensorrt backend"),
             (EngineConfig(backend="triton", engine_dir=Path("x")), r"engine_dir is not an option of the triton backend"),
             (EngineConfig(backend="bare", threads=2),
              r"threads is not an option of the bare backend \(it takes: none of threads, device, engine_dir\)"),
             (EngineConfig(backend="openvino", options=OnnxRuntimeOptions(provider="cpu")),
              r"OnnxRuntimeOptions \(the onnxruntime backend's options\) is not an option of the openvino backend "
              r"\(it takes OpenVinoOptions\)"),
             (EngineConfig(backend="bare", options=TorchOptions()), "it takes no options"),
             (EngineConfig(backend="onnxruntime", device="npu"), r"device 'npu' is not valid for the onnxruntime"),
             (EngineConfig(backend="wrapped", precision="int8"), "the wrapped backend runs precision fp32, not int8")]
    for config, message in cases:
        with pytest.raises(EngineError, match=message):
            create_engine(bundle, config)
    with pytest.raises(EngineError, match="options type of no backend"):
        select(bundle, EngineConfig(options=object()))


@pytest.mark.parametrize("flags, message", [
    (["--backend", "torch", "--threads", "2"],
     "--threads is not an option of the torch backend (it takes: --device, --cuda-graphs); --threads is for: "
     "onnxruntime, openvino"),
    (["--backend", "triton", "--performance-hint", "throughput"],
     "--performance-hint is not an option of the triton backend (it takes: --triton-url, --triton-protocol, "
     "--triton-model, --triton-timeout); --performance-hint is for: openvino"),
    (["--backend", "onnxruntime", "--cuda-graphs"], "--cuda-graphs is not an option of the onnxruntime backend"),
    (["--provider", "cuda", "--cuda-graphs"], "--provider (onnxruntime), --cuda-graphs (torch): flags of different "
                                              "backends; name one with --backend"),
    (["--cuda-graphs", "--threads", "2"], "--threads is not an option of the torch backend"),
    (["--backend", "wrapped", "--provider", "cpu"], "--provider is not an option of the wrapped backend (it takes: "
                                                    "--threads, --wrapped-label); --provider is for: onnxruntime "
                                                    "(plugin winclip_test_plugin:BACKEND)"),
])
def test_cli_refuses_a_flag_the_backend_does_not_take(plugin, tiny_bundle, tmp_path, capsys, flags, message):
    assert main(["infer", "--bundle", str(tiny_bundle), "--product", "widget", *flags, "--out", str(tmp_path / "o"),
                 str(tmp_path / "none.png")]) == EXIT_ERROR
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- auto: one default, resolved once, the same for all
def _args(bundle: Path, *flags: str):
    return build_parser().parse_args(["infer", "--bundle", str(bundle), "--product", "widget", "--out", "o", "x.png",
                                      *flags])


def _fake_record(bundle: Bundle, winner: dict) -> None:
    """A tune record of this machine whose winner is ``winner`` (select only reads it; nothing is run)."""
    from winclip_edge.bundle import VISUAL_ONNX
    from winclip_edge.engines.auto import RECORD_FORMAT

    row = {"threads": 0, "device": "auto", "status": "accepted", "ms_per_image": 10.0, "score_max_abs": 1e-6,
           "map_max_abs": 1e-6, "reason": "", "runs_on": "x", "ms_min": 9.0, "embedding_max_abs": {}, **winner}
    reference = {**row, "backend": "onnxruntime", "precision": "fp32", "ms_per_image": 20.0, "provider": "auto"}
    identity = registry.machine_identity()
    record = {"format": RECORD_FORMAT, "machine_key": registry.machine_key(identity), "machine": identity,
              "date": "2024-01-01T00:00:00+00:00", "visual_sha256": bundle.manifest.files[VISUAL_ONNX],
              "tolerance": {"score": 2e-3, "map": 1e-2}, "reference_ms_per_image": 20.0,
              "candidates": [row, reference], "winner": row}
    atomic_write_json(record_path(bundle), json_with_checksum(record))


def test_the_one_default_is_auto_for_python_and_the_cli(tiny_bundle):
    assert EngineConfig().backend == "auto"
    args = _args(tiny_bundle)
    assert args.backend == "auto" and engine_config(args) == EngineConfig()
    selection = select(Bundle(tiny_bundle), EngineConfig())
    assert selection.config == EngineConfig(backend="onnxruntime", precision="fp32")
    assert "the exact default: no tune record for this machine" in selection.reason


def test_python_and_the_cli_pick_the_same_engine_for_the_same_inputs(bundle_copy):
    bundle = Bundle(bundle_copy)
    _fake_record(bundle, {"backend": "openvino", "precision": "fp32", "performance_hint": "latency"})
    same = [((), EngineConfig()),
            (("--provider", "cpu"), EngineConfig(options=OnnxRuntimeOptions(provider="cpu"))),
            (("--performance-hint", "throughput"), EngineConfig(options=OpenVinoOptions(performance_hint="throughput"))),
            (("--threads", "2"), EngineConfig(threads=2)),
            (("--device", "cuda:1"), EngineConfig(device="cuda:1")),
            (("--precision", "int8"), EngineConfig(precision="int8")),
            (("--backend", "torch", "--cuda-graphs"), EngineConfig(backend="torch", options=TorchOptions(True)))]
    chosen = {}
    for flags, python in same:
        cli = engine_config(_args(bundle_copy, *flags))
        assert cli == python, flags
        a, b = select(bundle, cli), select(bundle, python)
        assert a.config == b.config and a.reason == b.reason
        chosen[flags] = a
    assert chosen[()].config == EngineConfig(backend="openvino", precision="fp32")  # the tuned winner
    assert "tuned winner" in chosen[()].reason
    cpu = chosen[("--provider", "cpu")]
    assert cpu.config == EngineConfig(backend="onnxruntime", precision="fp32", options=OnnxRuntimeOptions("cpu"))
    assert cpu.reason == "onnxruntime fp32 (provider given without backend)"
    assert cpu.explain(lambda f: {"provider": "--provider", "backend": "--backend"}[f]) == \
        "onnxruntime fp32 (--provider given without --backend)"
    threads = chosen[("--threads", "2")]  # the winner takes threads: the given value replaces the row's
    assert threads.config == EngineConfig(backend="openvino", precision="fp32", threads=2)
    assert "tuned winner" in threads.reason and "threads as given" in threads.reason
    cuda = chosen[("--device", "cuda:1")]  # the winner does not run on cuda: the first backend that does
    assert cuda.config == EngineConfig(backend="onnxruntime", precision="fp32", device="cuda:1")
    assert cuda.reason == "onnxruntime fp32: the first backend that takes device (the tuned openvino fp32 does not)"
    assert chosen[("--precision", "int8")].config == EngineConfig(backend="onnxruntime", precision="int8")
    assert chosen[("--backend", "torch", "--cuda-graphs")].reason == "torch fp32 (asked for)"
    with pytest.raises(EngineError, match="no backend takes device='tpu'"):
        select(bundle, EngineConfig(device="tpu"))


def test_the_cli_prints_the_reason_the_library_gave(bundle_copy, tmp_path, capsys):
    image = tmp_path / "part.png"
    cv2.imwrite(str(image), textured_part())
    assert main(["infer", "--bundle", str(bundle_copy), "--product", "widget", "--threads", "1", "--out",
                 str(tmp_path / "r"), str(image)]) == EXIT_OK
    err = capsys.readouterr().err
    assert "engine: onnxruntime fp32: the first backend that takes --threads; no tuned engine here" in err


def test_rows_of_tune_records_written_before_the_registry_still_read():
    """Earlier rows carried every backend's fields (provider and performance_hint on each): each backend reads its own."""
    from winclip_edge.engines.auto import config_row, row_config

    old = {"backend": "openvino", "precision": "fp32", "threads": 2, "performance_hint": "throughput", "device": "CPU",
           "provider": "auto"}
    assert row_config(old) == EngineConfig(backend="openvino", precision="fp32", threads=2, device="CPU",
                                           options=OpenVinoOptions(performance_hint="throughput"))
    old = {"backend": "onnxruntime", "precision": "fp16", "threads": 0, "performance_hint": "latency", "device": "auto",
           "provider": "cuda"}
    config = row_config(old)
    assert config == EngineConfig(backend="onnxruntime", precision="fp16", options=OnnxRuntimeOptions(provider="cuda"))
    assert row_config(config_row(config)) == config
    assert config_row(EngineConfig(backend="torch", precision="fp32", device="cpu")) == {
        "backend": "torch", "precision": "fp32", "threads": 0, "device": "cpu", "cuda_graphs": False}


def test_a_config_survives_the_round_trip_of_a_child_process():
    for config in (EngineConfig(), EngineConfig(backend="torch", device="cpu", options=TorchOptions(cuda_graphs=True)),
                   EngineConfig(backend="onnxruntime", precision="int8", threads=2, engine_dir=Path("/tmp/e"),
                                options=OnnxRuntimeOptions(provider="cuda", max_batch=4))):
        assert registry.config_from_dict(json.loads(json.dumps(registry.config_to_dict(config)))) == config


# ---------------------------------------------------------------- one bundle per command
def test_a_command_opens_and_verifies_the_bundle_once(bundle_copy, tmp_path, monkeypatch):
    opened = []
    real = Bundle.__init__

    def counting(self, root, verify=True):
        opened.append((str(root), verify))
        real(self, root, verify=verify)

    monkeypatch.setattr(Bundle, "__init__", counting)
    image = tmp_path / "part.png"
    cv2.imwrite(str(image), textured_part())
    common = ["--bundle", str(bundle_copy), "--product", "widget", "--quiet"]
    assert main(["register", *common, str(image)]) == EXIT_OK
    assert opened == [(str(bundle_copy), True)]
    opened.clear()
    assert main(["infer", *common, "--tile", "off", "--out", str(tmp_path / "r"), str(image)]) == EXIT_OK
    assert opened == [(str(bundle_copy), True)]  # tiling flags, auto and the Inspector all read the one Bundle


def test_tune_candidates_and_preparation_come_from_the_records(monkeypatch):
    from winclip_edge.performance.tuning import REFERENCE, TuneConfig, candidates

    seen = []
    record = registry.backend("onnxruntime")
    fake = type(record)(**{**{f: getattr(record, f) for f in record.__dataclass_fields__},
                           "candidates": lambda tune: (seen.append(tune) or [REFERENCE], [(REFERENCE, "why")])})
    real = registry._load()
    monkeypatch.setattr(registry, "_load", lambda: ({**real[0], "onnxruntime": fake}, real[1]))
    tries, skipped = candidates(TuneConfig(backends=("onnxruntime",)))
    assert len(seen) == 1 and tries == [REFERENCE, REFERENCE] and [s.reason for s in skipped] == ["why"]


def test_quantize_offers_the_backends_whose_records_build_with_it():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    action = next(a for a in sub.choices["quantize"]._actions if a.dest == "backend")
    assert tuple(action.choices) == ("onnxruntime", "openvino")


def test_no_module_outside_the_registry_lists_the_backends():
    """One place names them: the built-in list of registry.py (docs and tests aside)."""
    root = Path(__file__).resolve().parents[1] / "winclip_edge"
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        if '"onnxruntime", "openvino", "tensorrt"' in text or '"onnxruntime", "openvino", "torch"' in text:
            offenders.append(str(path.relative_to(root)))
    assert offenders == ["engines/registry.py"], offenders


def test_the_plugin_test_can_fail(plugin, tiny_bundle):
    """A plugin whose outputs differ is caught by the comparison the infer test makes."""
    bundle, images = Bundle(tiny_bundle), _images(1)
    engine = create_engine(bundle, EngineConfig(backend="wrapped"))
    engine.inner.run = lambda x, real=engine.inner.run: {k: v + 1e-6 for k, v in real(x).items()}
    expected = _reference(bundle, images)
    out = engine.run(images)
    assert not all(np.array_equal(out[k], expected[k]) for k in expected)

