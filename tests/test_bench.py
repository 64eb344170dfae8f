"""Benchmark helpers and the bench command on the tiny bundle (no speed is asserted), and the proof that
`Inspector.iter_inspect` decodes the next batch while the engine runs the current one."""
import json
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest

from conftest import textured_part
from winclip_edge import Inspector
from winclip_edge.performance.bench import RESULT_MARKER, cold_start, interleaved, latency_stats, machine_info, markdown_table, \
    software_versions, synthetic_images, time_calls
from winclip_edge.bundle import Bundle
from winclip_edge.cli import EXIT_OK, main
from winclip_edge.builders.variants import make_variant

GATE_TIMEOUT_S = 20.0  # only reached when decoding does NOT overlap the engine (the test then fails)


# ---------------------------------------------------------------- helpers
def test_latency_stats_are_numpy_percentiles():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0, 100.0]
    s = latency_stats(samples)
    assert s.n == 6 and s.min_ms == 1.0 and s.max_ms == 100.0 and s.mean_ms == pytest.approx(115 / 6)
    assert (s.p50_ms, s.p90_ms, s.p99_ms) == tuple(np.percentile(samples, [50, 90, 99]))
    with pytest.raises(ValueError, match="no timing samples"):
        latency_stats([])


def test_time_calls_runs_warmup_untimed():
    calls = []
    samples = time_calls(lambda: calls.append(1), warmup=2, iters=3)
    assert len(calls) == 5 and len(samples) == 3 and all(s >= 0 for s in samples)


def test_interleaved_calls_every_entry_once_per_round():
    calls = []
    samples = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, iters=2)
    assert calls == ["a", "b"] * 3 and {k: len(v) for k, v in samples.items()} == {"a": 2, "b": 2}


def test_peak_rss_sees_an_allocation():
    """In a fresh interpreter, whose peak is far below the block (this process's peak may already be above it):
    a touched 256 MiB block raises the peak by that much, and freeing it does not lower the peak."""
    code = ("import numpy as np; from winclip_edge.performance.bench import peak_rss_mib; before = peak_rss_mib(); "
            "block = np.ones(256 * 2**20 // 8); during = peak_rss_mib(); del block; print(before, during, peak_rss_mib())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    before, during, after = map(float, run.stdout.split())
    # after: the peak within /proc's rounding (a current-RSS reading would drop by ~256 MiB once the block is freed)
    assert before < 200 and during - before >= 240 and after >= during - 1, (before, during, after)


def test_cold_start_reads_the_marker_line_and_the_child_report():
    code = (f"import json, sys; print('loading', flush=True); "
            f"print({RESULT_MARKER!r} + json.dumps({{'load_s': 0.5}}), flush=True); print('after')")
    result = cold_start([sys.executable, "-c", code])
    assert result.seconds > 0 and result.report == {"load_s": 0.5} and result.returncode == 0


def test_cold_start_reports_a_child_without_result():
    with pytest.raises(RuntimeError, match="exit code 3.*went wrong"):
        cold_start([sys.executable, "-c", "import sys; print('went wrong', file=sys.stderr); sys.exit(3)"])
    with pytest.raises(RuntimeError, match="within 1 s"):
        cold_start([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=1.0)


def test_machine_and_versions():
    m = machine_info()
    assert m["cores"] >= 1 and m["cpu"] and len(m["load_average"]) == 3 and isinstance(m["gpus"], list)
    versions = software_versions()
    assert versions["numpy"] == np.__version__
    assert "onnxruntime" in versions or "onnxruntime-gpu" in versions


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"], [2, "y"]]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |"


def test_synthetic_images(tmp_path):
    paths = synthetic_images(2, (90, 120), tmp_path)
    images = [cv2.imread(p) for p in paths]
    assert [i.shape for i in images] == [(90, 120, 3)] * 2 and not np.array_equal(images[0], images[1])


# ---------------------------------------------------------------- the bench command
def test_bench_command_writes_markdown_and_json(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["bench", "--bundle", str(tiny_bundle), "--product", "widget", "--batch", "1,2", "--images", "3",
                 "--synthetic-size", "300x200", "--warmup", "0", "--iters", "2", "--out", str(out), "--quiet"])
    assert code == EXIT_OK
    (js,) = out.glob("*_onnxruntime_fp32_cpu_*.json")
    report = json.loads(js.read_text())
    assert [b["batch"] for b in report["batches"]] == [1, 2]
    for b in report["batches"]:
        assert b["iterations"] == 2 and set(b["stages_ms_per_image"]) == {"decode", "engine", "scoring", "resize_overlay"}
        assert b["latency_ms"]["p50_ms"] <= b["latency_ms"]["p99_ms"] and b["images_per_s"] > 0
    assert report["cold_start"]["seconds_to_first_result"] > report["cold_start"]["load_s"] > 0
    assert report["machine"]["cores"] >= 1 and "numpy" in report["versions"] and "bench" in report["command"]
    assert report["images"] == "3 synthetic 300x200 PNG frames" and "fidelity" not in report
    markdown = js.with_suffix(".md").read_text()
    assert "| batch | latency p50 / p90 / p99" in markdown and "load average" in markdown
    assert markdown.strip() in capsys.readouterr().out

    table = tmp_path / "table.md"
    assert main(["bench-table", str(js), "--out", str(table)]) == EXIT_OK
    rows = table.read_text().strip().splitlines()
    assert len(rows) == 2 + 2 and "(reference)" in rows[-1]


def test_bench_reports_fidelity_of_a_variant(bundle_copy, tmp_path):
    make_variant(Bundle(bundle_copy), "int8")
    folder = tmp_path / "parts"
    folder.mkdir()
    for s in range(2):
        cv2.imwrite(str(folder / f"p{s}.png"), textured_part(seed=s))
    assert main(["bench", "--bundle", str(bundle_copy), "--product", "widget", "--precision", "int8", "--batch", "2",
                 "--images", str(folder), "--warmup", "0", "--iters", "1", "--no-cold-start",
                 "--out", str(tmp_path / "r"), "--quiet"]) == EXIT_OK
    (js,) = (tmp_path / "r").glob("*_int8_*.json")
    report = json.loads(js.read_text())
    f = report["fidelity"]
    assert f["images"] == 2 and f["reference"].startswith("onnxruntime fp32")
    assert 0 < f["score_max_abs"] < 0.05 and f["map_mean_abs"] <= f["map_max_abs"]
    assert set(f["embedding_max_abs"]) == set(Bundle(bundle_copy).spec.output_shapes())
    assert report["variant"]["method"].startswith("onnxruntime.quantization.quantize_dynamic")
    markdown = js.with_suffix(".md").read_text()
    assert "cold_start" not in report and "Fidelity against onnxruntime fp32" in markdown and "quantize_dynamic" in markdown


# ---------------------------------------------------------------- pipelining in infer
class GatedEngine:
    """Fake engine: its first call waits until the decoder has started on the *next* batch; it records events."""

    name = "gated"
    device = "test"

    def __init__(self, spec, events: list, gate: threading.Event):
        self.spec, self.events, self.gate, self.calls = spec, events, gate, 0

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        self.events.append(("engine_start", self.calls))
        if self.calls == 1:
            self.events.append(("overlapped", self.gate.wait(GATE_TIMEOUT_S)))
        self.events.append(("engine_end", self.calls))
        rng = np.random.default_rng(self.calls)
        out = {}
        for name, shape in self.spec.output_shapes().items():
            v = rng.normal(size=(len(images), *shape[1:])).astype(np.float32)
            out[name] = v / np.linalg.norm(v, axis=-1, keepdims=True)
        return out

    def close(self) -> None:
        pass


def test_infer_decodes_the_next_batch_while_the_engine_runs(tiny_bundle, monkeypatch):
    import winclip_edge.samples as samples_module  # the decoder (iter_decoded) the Inspector reads with

    events: list = []
    gate = threading.Event()
    images = [textured_part(seed=s) for s in range(6)]
    real_decode = samples_module.decode

    def recording_decode(item, size, name):
        events.append(("decode", name, threading.current_thread().name))
        if name == "array[2]":  # first image of the second batch
            gate.set()
        return real_decode(item, size, name)

    monkeypatch.setattr(samples_module, "decode", recording_decode)
    engine = GatedEngine(Bundle(tiny_bundle).spec, events, gate)
    inspector = Inspector(tiny_bundle, "widget", engine=engine)
    results = inspector.inspect(images, batch_size=2)

    assert [r.path for r in results] == [f"array[{i}]" for i in range(6)] and all(r.error is None for r in results)
    assert ("overlapped", True) in events, "the engine's first call never saw the next batch being decoded"
    order = {e[:2]: i for i, e in enumerate(events)}
    assert order[("decode", "array[2]")] < order[("engine_end", 1)]
    assert all(e[2].startswith("winclip-decode") for e in events if e[0] == "decode")
    assert engine.calls == 3


def test_bench_needs_valid_sizes(tiny_bundle, tmp_path):
    assert main(["bench", "--bundle", str(tiny_bundle), "--product", "widget", "--batch", "0",
                 "--out", str(tmp_path), "--quiet"]) != EXIT_OK


def test_unreadable_benchmark_image_is_a_clear_error(tiny_bundle, tmp_path, capsys):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    assert main(["bench", "--bundle", str(tiny_bundle), "--product", "widget", "--batch", "1", "--images", str(folder),
                 "--iters", "1", "--out", str(tmp_path / "r"), "--quiet"]) != EXIT_OK
    assert "benchmark input unreadable" in capsys.readouterr().err
