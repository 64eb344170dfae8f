"""bench's compute figures: the graph's FLOPs counted from its shapes, a GEMM peak probe, their ratio in the report."""
import json

import pytest

from winclip_edge.bundle import Bundle
from winclip_edge.cli import EXIT_OK, main
from winclip_edge.performance.roofline import gemm_peak, model_gflop

pytest.importorskip("openvino")


def _transformer_gflop(tokens: int, width: int, layers: int) -> float:
    """Multiply-adds x 2 of `layers` pre-LN blocks on one sequence (QKV, scores, values, out-proj, MLP 4x)."""
    per_layer = tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width + 2 * tokens * width * 4 * width
    return 2.0 * per_layer * layers / 1e9


def test_model_flops_grow_with_the_windows_by_the_transformer_cost(make_bundle):
    full = model_gflop(Bundle(make_bundle()).onnx_path, (240, 240))  # tiny240: width 64, 2 layers, scales (2, 3)
    fewer = model_gflop(Bundle(make_bundle(scales=(2,))).onnx_path, (240, 240))
    assert 0 < fewer < full
    # The k=3 windows add 13 x 13 sequences of 1 + 9 tokens: the first block in full, the last block for the CLS only.
    first_block = _transformer_gflop(10, 64, 1)
    assert 169 * first_block < (full - fewer) < 169 * 2 * first_block


def test_gemm_peak_probes_fp32_and_says_when_a_precision_has_no_probe():
    fp32 = gemm_peak("fp32", n=256)
    assert fp32.gflops > 0 and fp32.gflops == max(v for v in fp32.probes.values() if isinstance(v, float))
    assert gemm_peak("fp16", n=256).gflops is None  # no CPU fp16 GEMM probe: reported as such, not guessed


def test_bench_reports_achieved_gflops_and_fraction_of_peak(tiny_bundle, tmp_path):
    out = tmp_path / "results"
    assert main(["bench", "--bundle", str(tiny_bundle), "--product", "widget", "--batch", "1", "--images", "1",
                 "--warmup", "0", "--iters", "1", "--no-cold-start", "--out", str(out), "--quiet"]) == EXIT_OK
    (js,) = out.glob("*.json")
    roof = json.loads(js.read_text())["roofline"]
    engine_ms = json.loads(js.read_text())["batches"][0]["stages_ms_per_image"]["engine"]
    assert roof["achieved_gflops"]["1"] == pytest.approx(roof["gflop_per_image"] / (engine_ms / 1e3))
    assert roof["fraction_of_peak"]["1"] == pytest.approx(roof["achieved_gflops"]["1"] / roof["peak"]["gflops"])
    assert "GEMM peak" in js.with_suffix(".md").read_text()
