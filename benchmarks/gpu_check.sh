#!/usr/bin/env bash
# One prepared GPU check (a few minutes): the GPU tests (`pytest -m "cuda or tensorrt"`); TensorRT when it is
# importable: build-engine fp32 + fp16 (layer precisions read back) and a TensorRT bench, else it says plainly that
# they did not run; the torch backend on CUDA at fp32 / fp16 / fp16 + CUDA graphs, batch 1 and 8, on
# ViT-B-16-plus-240 with random weights; ONNX Runtime CPU for context; the exact speed-ups on the GPU;
# anomalib's eager WinCLIP on the GPU when anomalib is importable.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine (results under $OUT, else benchmarks/results)
#   bash benchmarks/gpu_check.sh --dry-run    # any machine: a tiny model on the CPU, CUDA-only steps skipped
#
# Needs: python with torch (CUDA build), open_clip, onnx, onnxruntime (CPU is enough), numpy, OpenCV, tqdm.
# Nothing is downloaded (random weights). Env: PYTHON (default python), BUNDLE (default models/b16p, reused
# when valid), OUT (result folder; the device runner sets it), STEP_TIMEOUT (seconds per step, default 240),
# BUILD_TIMEOUT (seconds per TensorRT engine build, default 600). TensorRT: pip install 'winclip-edge[trt]'
# (desktop) or JetPack's python3-libnvinfer; pytest for the test step.
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python}"
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-600}"
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
STAMP="$(date -u +%Y%m%dT%H%M%S)"
RESULTS="${OUT:-$REPO/benchmarks/results}/gpu_check_$STAMP"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
FAILED=0
T0=$SECONDS

log() { echo "[gpu_check $((SECONDS - T0))s] $*" | tee -a "$LOG" >&2; }
step() {  # step NAME COMMAND...: bounded by STEP_TIMEOUT; a failure is logged and the check goes on
    local name="$1"; shift
    log "$name: $*"
    timeout "$STEP_TIMEOUT" "$@" >>"$LOG" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        FAILED=1
        log "$name FAILED (exit $rc$([ $rc -eq 124 ] && echo ", timed out after ${STEP_TIMEOUT}s")); see $LOG"
    fi
    return $rc
}
WE=("$PYTHON" -m winclip_edge.cli)  # an array, not a function: `timeout` runs programs only

log "repo $REPO, results $RESULTS, python $($PYTHON -c 'import sys; print(sys.version.split()[0])'), $(uptime)"
if ! "$PYTHON" -c "import torch, open_clip, onnx, onnxruntime, numpy, cv2, tqdm" 2>>"$LOG"; then
    log "missing packages (see $LOG): this check needs torch, open_clip_torch, onnx, onnxruntime, numpy, opencv, tqdm"
    exit 2
fi
"$PYTHON" -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), '| onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi | tee "$RESULTS/nvidia-smi.txt" >>"$LOG"

if [ $DRY_RUN -eq 1 ]; then
    DEVICE=cpu; ITERS=2; WARMUP=1; IMAGES=3; SIZE=480x480
    TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
    MODEL="$TMP/gpu-check-tiny.json"
    cat >"$MODEL" <<'JSON'
{"embed_dim": 32, "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
JSON
    BUNDLE="$TMP/bundle"
else
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        log "torch sees no CUDA GPU: run with --dry-run on a CPU machine"; exit 2
    fi
    DEVICE=cuda; ITERS=10; WARMUP=3; IMAGES=8; SIZE=1024x1024
    MODEL=ViT-B-16-plus-240
    BUNDLE="${BUNDLE:-$REPO/models/b16p}"
fi

# 1. the bundle (random weights): reused when it verifies, exported otherwise (~1 min on 16 cores)
if "${WE[@]}" info --bundle "$BUNDLE" >>"$LOG" 2>&1 && [ -f "$BUNDLE/products/bottle/text.npz" ]; then
    log "reusing bundle $BUNDLE"
else
    step export "${WE[@]}" export --model "$MODEL" --pretrained none --products bottle --out "$BUNDLE" --force --quiet || exit 2
fi

BENCH=(bench --bundle "$BUNDLE" --product bottle --images "$IMAGES" --synthetic-size "$SIZE" --warmup "$WARMUP"
       --iters "$ITERS" --out "$RESULTS" --quiet)

# 1b. the GPU tests: the real TensorRT engine test (build fp32/fp16 on a tiny bundle, layer precisions from the
#     engine inspector, fp16 scores within 5e-3 of ONNX Runtime) and the torch CUDA tests; they skip without a GPU
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    step gpu-tests "$PYTHON" -m pytest -q -p no:cacheprovider -rs -m "cuda or tensorrt" tests
else
    log "pytest is not importable with $PYTHON: the GPU tests (pytest -m 'cuda or tensorrt') were NOT run"
    FAILED=1
fi

# 1c. TensorRT: the engines of the bundle and a bench of them, when TensorRT and a CUDA device are there
if TRT_VERSION="$("$PYTHON" -c "import tensorrt; print(tensorrt.__version__)" 2>>"$LOG")"; then
    log "TensorRT $TRT_VERSION"
    for precision in fp32 fp16; do
        STEP_TIMEOUT="$BUILD_TIMEOUT" step "build-engine-$precision" "${WE[@]}" build-engine --bundle "$BUNDLE" \
            --precision "$precision" --max-batch 8
    done
    grep -h "engine layers by output precision" "$LOG" | tail -n 2 | tee "$RESULTS/tensorrt_layer_precisions.txt" >&2
    step tensorrt-fp16 "${WE[@]}" "${BENCH[@]}" --backend tensorrt --precision fp16 --batch 1,8
    step tensorrt-fp32 "${WE[@]}" "${BENCH[@]}" --backend tensorrt --precision fp32 --batch 8 --no-cold-start
else
    log "TensorRT is NOT importable with $PYTHON: build-engine and the TensorRT bench did not run (pip install" \
        "'winclip-edge[trt]' on a desktop; JetPack's python3-libnvinfer on a Jetson)"
fi
if "$PYTHON" -c "import onnxruntime as o, sys; sys.exit('TensorrtExecutionProvider' not in o.get_available_providers())" \
        2>/dev/null; then
    STEP_TIMEOUT="$BUILD_TIMEOUT" step ort-tensorrt-fp16 "${WE[@]}" "${BENCH[@]}" --backend onnxruntime \
        --provider tensorrt --precision fp16 --batch 8 --no-cold-start
else
    log "ONNX Runtime has no TensorrtExecutionProvider here (onnxruntime-gpu with TensorRT libraries): its bench did not run"
fi

# 2. the torch backend: fp32, fp16 (fidelity vs fp32 reported), fp16 + CUDA graphs; batch 1 and 8
step torch-fp32 "${WE[@]}" "${BENCH[@]}" --backend torch --device "$DEVICE" --precision fp32 --batch 1,8
step torch-fp16 "${WE[@]}" "${BENCH[@]}" --backend torch --device "$DEVICE" --precision fp16 --batch 1,8 --no-cold-start
if [ "$DEVICE" = cuda ]; then
    step torch-fp16-graphs "${WE[@]}" "${BENCH[@]}" --backend torch --device cuda --precision fp16 --cuda-graphs --batch 1,8
    step torch-fp32-graphs "${WE[@]}" "${BENCH[@]}" --backend torch --device cuda --precision fp32 --cuda-graphs --batch 8 --no-cold-start
else
    log "CUDA graphs skipped (no GPU in a dry run)"
fi

# 3. ONNX Runtime (CPU build here) for context: the same pipeline without a GPU
step ort-cpu-fp32 "${WE[@]}" "${BENCH[@]}" --backend onnxruntime --provider cpu --batch 1 --iters 3 --warmup 1 --no-cold-start

# 4. the exact speed-ups of the graph, timed in torch on this device
step exact-speedups "$PYTHON" benchmarks/exact_speedups.py --model "$MODEL" --device "$DEVICE" --no-onnx \
    --iters "$ITERS" --out "$RESULTS"

# 5. anomalib's own WinCLIP, torch eager, same architecture and random weights (skipped without anomalib)
if "$PYTHON" -c "import anomalib" 2>/dev/null && [ -f benchmarks/anomalib_compare.py ]; then
    step anomalib-eager "$PYTHON" - "$MODEL" "$DEVICE" "$WARMUP" "$ITERS" "$RESULTS" <<'PY'
"""anomalib 2.7 WinClipModel, zero-shot forward, as shipped and with the harness's window correction."""
import importlib.util, json, sys, tempfile
from pathlib import Path
import torch
from winclip_edge.export.models import load_model
from winclip_edge.bench import latency_stats, machine_info, markdown_table, software_versions, time_calls, write_report

model_name, device, warmup, iters, out = sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
spec = importlib.util.spec_from_file_location("anomalib_compare", "benchmarks/anomalib_compare.py")
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)
loaded = load_model(model_name, "none", seed=0)
with tempfile.TemporaryDirectory() as tmp:
    checkpoint = Path(tmp) / "clip.pt"
    torch.save(loaded.model.state_dict(), checkpoint)
    model = harness.build_anomalib_model(loaded.model_name, checkpoint, "bottle").to(device)
size = loaded.model.visual.image_size
size = (size, size) if isinstance(size, int) else tuple(size)
x = torch.randn(8, 3, *size, device=device)
rows, report = [], {"machine": machine_info(), "versions": software_versions(), "device": str(device), "runs": []}
for fixed in (False, True):
    if fixed:
        harness.apply_window_fix(model)
    for batch in (1, 8):
        def call(b=batch):
            with torch.inference_mode():
                model(x[:b])
            if device.type == "cuda":
                torch.cuda.synchronize()
        s = latency_stats(time_calls(call, warmup, iters))
        variant = "window fix (correct windows)" if fixed else "as shipped (flat windows)"
        report["runs"].append({"variant": variant, "batch": batch, "p50_ms": s.p50_ms, "mean_ms": s.mean_ms})
        rows.append([variant, batch, f"{s.p50_ms:.1f}", f"{s.p50_ms / batch:.2f}", f"{1e3 * batch / s.mean_ms:.1f}"])
md = "\n".join([f"# anomalib WinClipModel (torch eager fp32, zero-shot forward) on {device}: {loaded.model_name}", "",
                markdown_table(["variant", "batch", "p50 ms per call", "ms per image", "images/s"], rows)])
write_report(out, "anomalib_eager", report, md)
print(md)
PY
else
    log "anomalib not importable with $PYTHON (or benchmarks/anomalib_compare.py missing): anomalib step skipped"
fi

# 6. one table of every bench run
shopt -s nullglob
JSONS=("$RESULTS"/*_torch_*.json "$RESULTS"/*_onnxruntime_*.json "$RESULTS"/*_tensorrt_*.json)
if [ ${#JSONS[@]} -gt 0 ]; then
    "${WE[@]}" bench-table "${JSONS[@]}" --out "$RESULTS/summary.md" >>"$LOG" 2>&1 || FAILED=1
    cat "$RESULTS/summary.md"
fi
for f in "$RESULTS"/exact_speedups_*.md "$RESULTS"/anomalib_eager.md; do
    [ -f "$f" ] && tail -n +3 "$f"
done
log "done in $((SECONDS - T0)) s, $(uptime); results in $RESULTS$([ $FAILED -ne 0 ] && echo ' (SOME STEPS FAILED)')"
exit $FAILED
