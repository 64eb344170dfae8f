#!/usr/bin/env python
# ruff: noqa: E402  (STARTED is taken before the other imports on purpose)
"""Side by side: anomalib 2.7.0's WinCLIP (torch eager, fp32) against winclip-edge (ONNX Runtime CPU, fp32).

Same machine, same architecture, same weights, same input, same run; "faster" only counts for the same
answer, so the harness first shows that both give the same outputs, then times them. Why each step is
needed is in docs/anomalib_comparison.md. In short:

- Weights: random ``--pretrained none --seed S`` weights. We export them to a bundle with
  ``--patch-layer last`` (anomalib's few-shot patch features are the last block + ln_post); anomalib
  loads the same state dict as a local open_clip checkpoint through its own ``WinClipModel``
  constructor (its ``PRETRAINED`` tag is pointed at the file), and the harness checks the weights id.
- Text: anomalib's prompts and prototypes (21 templates, raw mean) are written into the bundle as the
  product's text prototypes, so both sides score against the same two vectors.
- Input: the same uint8 frames at model size; the anomalib tensor is normalised with the bundle's mean/std
  and the graph's arithmetic.
- anomalib 2.7.0 feeds its window pass sequence-first into open_clip >= 2.26's batch-first transformer,
  so every window gets the same embedding (docs/method.md §4.4). The harness measures that as shipped,
  then corrects it in this process only (:func:`apply_window_fix`); anomalib's files are not edited.

Needs anomalib 2.7.0 in a virtual environment that reuses the system torch/open_clip::

    python -m venv --system-site-packages /work/venvs/anomalib
    /work/venvs/anomalib/bin/pip install anomalib==2.7.0
    /work/venvs/anomalib/bin/python benchmarks/anomalib_compare.py   # 5.5-12.5 min on a shared 2-core CPU

Each side runs in its own fresh subprocess (cold start = process start to first result), one after the
other, never concurrently. Results: benchmarks/results/<name>.md and .json.
"""
from __future__ import annotations

import time

STARTED = time.time()  # before any other import: a worker's "interpreter up" mark

import argparse
import contextlib
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from winclip_edge.performance.bench import machine_info, peak_rss_mib, software_versions, write_report
from winclip_edge.products import TextPrototypes

ANOMALIB_VERSION = "2.7.0"  # the release whose conventions this harness maps (see the docs)
DEFAULT_MODEL = "ViT-B-16-plus-240"
DEFAULT_PRODUCT = "textile"  # also anomalib's class name, i.e. the object word of its prompts
DEFAULT_WORK = Path("/tmp/anomalib_compare")
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
MAP_TOLERANCE = 1e-4  # "same answer": max abs difference of any map or score (exact fp32 engines)
# A reduced-precision engine (--engine, e.g. what `winclip-edge engine tune` picked) answers "the same" within tune's gate.
TUNED_TOLERANCE = 1e-2  # maps (scores are held to 2e-3 by tune on the same images)
LATENCY_TARGET = {True: 1.3, False: 3.0}  # anomalib / ours per image: exact fp32 engine, tuned engine
COLD_START_TARGET = 8.0  # anomalib / ours, process start to first result
PHASES = ("zs_b1", "fs_b1", "fs_bN")  # zero-shot batch 1, few-shot batch 1, few-shot batch N
TARGET_CLASS = 1  # anomalib's index of the "anomalous" text prototype


# ================================================================ pure parts (tested on a tiny model)
def unit(x: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis (anomalib returns raw embeddings; its cosine similarity normalises them)."""
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def anomalib_window_index(masks: Any) -> np.ndarray:
    """anomalib's window masks ``[k*k, W]`` (one column per window) -> our layout ``[W, k*k]``.

    Both are row-major over window origins and row-major inside a window (anomalib builds them with
    ``F.unfold``), so the mapping is a transpose; the test proves it equals ``window_token_index``.
    """
    return np.asarray(masks).T.astype(np.int64)


def text_prototypes_from_anomalib(text_embeddings: np.ndarray, class_name: str) -> TextPrototypes:
    """anomalib's ``[2, D]`` raw prototypes (mean of raw prompt embeddings, [normal, anomalous]) -> ours.

    anomalib scores with cosine similarity, i.e. against ``mean / |mean|``: normalising each row gives
    our prototypes exactly (ours are normalise-average-normalise by design, docs/method.md §2).
    """
    from anomalib.models.image.winclip.prompting import create_prompt_ensemble

    if text_embeddings.shape[0] != 2:
        raise ValueError(f"anomalib text embeddings have shape {text_embeddings.shape}, expected [2, D] "
                         "(normal, anomalous); was WinClipModel built with a class name?")
    normal, anomalous = create_prompt_ensemble(class_name)
    t = unit(text_embeddings)
    spec = {"object_name": class_name, "style": f"anomalib-{ANOMALIB_VERSION}"}  # PromptSpec's fields; not a CPE style
    return TextPrototypes(t_normal=t[0], t_anomalous=t[1], normal_prompts=tuple(normal),
                          anomalous_prompts=tuple(anomalous), prompt_spec=spec)


def window_spread(window_embeddings: np.ndarray) -> float:
    """Largest standard deviation across the windows of one scale (over images and dims) of unit embeddings.
    0.0 means every window has the same embedding (anomalib's flat-window bug)."""
    return float(unit(window_embeddings).std(axis=1).max())


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {a.shape} and {b.shape}")
    return float(np.abs(a - b).max())


def compare_records(ours: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference of every output both sides recorded (same keys, same shapes)."""
    common = [k for k in ours if k in theirs]
    return {k: max_abs_diff(ours[k], theirs[k]) for k in common}


# ================================================================ anomalib side (torch, lazily)
def build_anomalib_model(backbone: str, checkpoint: str | os.PathLike, class_name: str):
    """anomalib's own constructor with its backbone/pretrained constants pointed at ``backbone`` and a local
    open_clip checkpoint (open_clip loads a file path given as ``pretrained``): creation, weight loading and
    prompt encoding all run anomalib's code."""
    from anomalib.models.image.winclip import torch_model

    saved = torch_model.BACKBONE, torch_model.PRETRAINED
    torch_model.BACKBONE, torch_model.PRETRAINED = backbone, str(checkpoint)
    try:
        model = torch_model.WinClipModel(class_name=class_name)
    finally:
        torch_model.BACKBONE, torch_model.PRETRAINED = saved
    return model.eval()


@contextlib.contextmanager
def sequence_first(transformer):
    """The correction: anomalib permutes the window batch to ``[L, N, D]`` before the transformer, which
    open_clip < 2.26 expected; telling open_clip >= 2.26 that its input is sequence-first
    (``batch_first = False``) makes it transpose back, so each window attends only to its own tokens."""
    transformer.batch_first = False
    try:
        yield
    finally:
        transformer.batch_first = True


def apply_window_fix(model) -> None:
    """Run anomalib's own ``_get_window_embeddings`` under :func:`sequence_first` (this instance only)."""
    shipped = type(model)._get_window_embeddings

    def corrected(feature_map, masks):
        with sequence_first(model.clip.visual.transformer):
            return shipped(model, feature_map, masks)

    model._get_window_embeddings = corrected


def remove_window_fix(model) -> None:
    """Back to anomalib as shipped."""
    model.__dict__.pop("_get_window_embeddings", None)


def normalised_tensor(images: np.ndarray, mean: Sequence[float], std: Sequence[float]):
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` with the bundle graph's arithmetic ``(x - 255 m) / (255 s)``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()  # [N, 3, H, W]
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return (x - m) / s


class AnomalibRecorder:
    """Keeps the intermediate results of the last WinClipModel forward (embeddings, token-grid maps before
    resizing) by wrapping three methods on the instance; the forward itself runs unchanged."""

    METHODS = ("encode_image", "_compute_zero_shot_scores", "_compute_few_shot_scores")

    def __init__(self, model):
        self.model = model
        self.last: dict[str, Any] = {}
        for name in self.METHODS:
            setattr(model, name, self._recorded(name, getattr(model, name)))

    def _recorded(self, name: str, method: Callable) -> Callable:
        def call(*args, **kwargs):
            out = method(*args, **kwargs)
            self.last[name] = out
            return out

        return call

    def infer(self, images: np.ndarray, mean: Sequence[float], std: Sequence[float]):
        """uint8 ``[N, H, W, 3]`` -> anomalib's InferenceBatch, normalised with the graph's arithmetic."""
        self.last.clear()
        return self.model(normalised_tensor(images, mean, std))

    def record(self, result) -> dict[str, np.ndarray]:
        """The last forward's outputs in our names (unit embeddings, scores, token maps, pixel maps)."""
        from anomalib.models.image.winclip.utils import class_scores

        model = self.model
        image, windows, patches = self.last["encode_image"]
        text, temperature = model.text_embeddings, model.temperature
        out = {"image_embedding": image, "patch_tokens": patches,
               "zero_shot_score": class_scores(image, text, temperature, target_class=TARGET_CLASS),
               "zero_shot_token_map": self.last["_compute_zero_shot_scores"],
               "score": result.pred_score, "map": result.anomaly_map}
        for k, w in zip(model.scales, windows):
            out[f"windows_k{k}"] = w
            out[f"window_scores_k{k}"] = class_scores(w, text, temperature, target_class=TARGET_CLASS)
        zero_shot = self.last["_compute_zero_shot_scores"]
        # WinClipModel.forward: multi_scale_scores = (zero-shot + few-shot) / 2 before the resize
        out["token_map"] = (zero_shot + self.last["_compute_few_shot_scores"]) / 2 if model.k_shot else zero_shot
        arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in out.items()}
        for k in ("image_embedding", "patch_tokens", *(f"windows_k{s}" for s in model.scales)):
            arrays[k] = unit(arrays[k])
        return arrays


# ================================================================ our side (no torch)
class RecordingEngine:
    """Wraps an engine and keeps its last outputs, so the token-grid maps can be re-scored after a timed
    ``Inspector.inspect`` without running the graph twice."""

    def __init__(self, engine):
        self.inner = engine
        self.name, self.device = engine.name, engine.device
        self.last: dict[str, np.ndarray] = {}

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.last = self.inner.run(images)
        return self.last

    def close(self) -> None:
        self.inner.close()


def ours_record(inspector, engine: RecordingEngine, results: Sequence) -> dict[str, np.ndarray]:
    """The last inspect call's outputs in the same names as :meth:`AnomalibRecorder.record`; ``engine`` may be the
    :class:`RecordingEngine` itself or the Inspector's lock around it (``inspector.engine``)."""
    from winclip_edge.engines.serial import SerialEngine
    from winclip_edge.scoring import class_scores

    if isinstance(engine, SerialEngine):
        engine = engine.engine

    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"winclip-edge could not inspect: {errors}")
    outputs = engine.last
    if outputs["image_embedding"].shape[0] != len(results):
        raise ValueError(f"the engine's last call embedded {outputs['image_embedding'].shape[0]} images, the inspect call "
                         f"returned {len(results)}: record one engine call (batch_size >= number of images)")
    scores = inspector.score(outputs)
    zero_shot = inspector.score(outputs, memory=None)
    t, temperature = inspector.text, inspector.options.temperature
    out = {"image_embedding": outputs["image_embedding"], "patch_tokens": outputs["patch_tokens"],
           "zero_shot_score": zero_shot.image_score, "zero_shot_token_map": zero_shot.token_map,
           "token_map": scores.token_map, "score": np.array([r.score for r in results], np.float32),
           "map": np.stack([r.anomaly_map for r in results])}
    for k in inspector.bundle.spec.scales:
        w = outputs[f"window_embeddings_k{k}"]
        out[f"windows_k{k}"] = w
        out[f"window_scores_k{k}"] = class_scores(w, t.t_normal, t.t_anomalous, temperature)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


# ================================================================ measurement helpers
def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def uptime_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"load average {load_average()}"


def median(values: Sequence[float]) -> float:
    return float(np.median(values))


class Timeline:
    """Wall-clock marks from the moment the parent launched this process (``time.time()`` based)."""

    def __init__(self, launched_at: float):
        self.launched_at = launched_at
        self.marks: dict[str, float] = {"interpreter_up": STARTED - launched_at}

    def mark(self, name: str) -> None:
        self.marks[name] = time.time() - self.launched_at


def timed(call: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process, all threads). On a shared CPU the wall time follows
    the load; the CPU time much less so (it still counts the thread pools' spin-waiting)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = call()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _stack(records: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([r[k] for r in records]) for k in records[0]}


def _save_worker(work: Path, side: str, arrays: dict[str, np.ndarray], report: dict) -> None:
    np.savez(work / f"{side}.npz", **arrays)
    (work / f"{side}.json").write_text(json.dumps(report, indent=2))


def _flat(phase: str, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{phase}.{k}": v for k, v in record.items()}


# ================================================================ workers (fresh subprocesses)
def anomalib_worker(spec: dict) -> None:
    """anomalib eager fp32: cold start, the flat-window bug as shipped, then corrected runs."""
    timeline = Timeline(spec["launched_at"])
    import torch

    torch.set_num_threads(spec["threads"])
    from anomalib.models.image.winclip.torch_model import WinClipModel  # noqa: F401  (the package import cost)

    if spec["config"]:
        from winclip_edge.export.models import resolve_model

        resolve_model(spec["model"])  # registers the config JSON with open_clip under the bundle's name
    timeline.mark("imported")
    model = build_anomalib_model(spec["model_name"], spec["checkpoint"], spec["product"])
    timeline.mark("model_and_prompts")
    apply_window_fix(model)
    recorder = AnomalibRecorder(model)
    images = np.load(spec["inputs"])["images"]
    mean, std = spec["mean"], spec["std"]
    recorder.infer(images[:1], mean, std)  # the first result (and the warm-up)
    timeline.mark("first_result")
    arrays: dict[str, np.ndarray] = {}
    report: dict[str, Any] = {"cold_start": timeline.marks, "cold_start_cpu_s": time.process_time(),
                              "threads": torch.get_num_threads(),
                              "temperature": model.temperature, "load_start": load_average()}

    remove_window_fix(model)  # anomalib as shipped, for the record
    result, seconds, _ = timed(lambda: recorder.infer(images[:1], mean, std))
    arrays.update(_flat("shipped", recorder.record(result)))
    report["shipped_latency_s"] = seconds
    apply_window_fix(model)

    def batch1(n: int, phase: str) -> None:
        records, latencies, cpu = [], [], []
        for i in range(n):
            result, seconds, cpu_seconds = timed(lambda: recorder.infer(images[i:i + 1], mean, std))
            records.append(recorder.record(result))
            latencies.append(seconds)
            cpu.append(cpu_seconds)
        arrays.update(_flat(phase, _stack(records)))
        report[f"{phase}_latency_s"], report[f"{phase}_cpu_s"] = latencies, cpu

    batch1(spec["n_images"], "zs_b1")
    references = normalised_tensor(np.load(spec["inputs"])["references"], mean, std)
    # setup() also re-encodes the prompts (anomalib's API does both); timed as anomalib's "register"
    _, report["register_s"], _ = timed(lambda: model.setup(reference_images=references))
    batch1(spec["n_few_shot"], "fs_b1")
    report["peak_rss_b1_mib"] = peak_rss_mib()
    if spec["batch"] > 1:
        result, seconds, cpu_seconds = timed(lambda: recorder.infer(images[:spec["batch"]], mean, std))
        arrays.update(_flat("fs_bN", recorder.record(result)))
        report["fs_bN_latency_s"], report["fs_bN_cpu_s"] = [seconds / spec["batch"]], [cpu_seconds / spec["batch"]]
    report["peak_rss_mib"] = peak_rss_mib()
    report["load_end"] = load_average()
    arrays["text_embeddings"] = model.text_embeddings.detach().numpy().astype(np.float32)
    from winclip_edge.export.models import weights_id

    report["weights_id"] = weights_id(model.clip)
    _save_worker(Path(spec["work"]), "anomalib", arrays, report)


def ours_worker(spec: dict) -> None:
    """winclip-edge, ONNX Runtime CPU fp32 through ``Inspector``: the same phases as :func:`anomalib_worker`."""
    timeline = Timeline(spec["launched_at"])
    from winclip_edge.bundle import Bundle
    from winclip_edge.engines import EngineConfig, create_engine, registry
    from winclip_edge.inspector import Inspector
    from winclip_edge.products import save_memory
    from winclip_edge.scoring import ScoringOptions

    timeline.mark("imported")
    bundle = Bundle(spec["bundle"])  # verifies the graph's sha256
    options = ScoringOptions(temperature=bundle.manifest.temperature)
    backend, precision = spec["engine"]
    takes = registry.backend(backend).takes  # the CPU, and the thread count where the backend takes one
    engine = RecordingEngine(create_engine(bundle, EngineConfig(
        backend=backend, precision=precision, device="cpu" if backend in ("onnxruntime", "torch") else "auto",
        threads=spec["threads"] if "threads" in takes else 0)))
    inspector = Inspector(bundle, spec["product"], options=options, engine=engine)
    timeline.mark("bundle_and_session")
    images = np.load(spec["inputs"])["images"]
    inspector.inspect([images[0]], batch_size=1)  # the first result (and the warm-up)
    timeline.mark("first_result")
    arrays: dict[str, np.ndarray] = {}
    report: dict[str, Any] = {"cold_start": timeline.marks, "cold_start_cpu_s": time.process_time(),
                              "threads": spec["threads"], "device": engine.device,
                              "temperature": options.temperature, "load_start": load_average()}

    def batch1(active, n: int, phase: str) -> None:
        records, latencies, cpu = [], [], []
        for i in range(n):
            results, seconds, cpu_seconds = timed(lambda: active.inspect([images[i]], batch_size=1))
            records.append(ours_record(active, engine, results))
            latencies.append(seconds)
            cpu.append(cpu_seconds)
        arrays.update(_flat(phase, _stack(records)))
        report[f"{phase}_latency_s"], report[f"{phase}_cpu_s"] = latencies, cpu

    batch1(inspector, spec["n_images"], "zs_b1")
    references = list(np.load(spec["inputs"])["references"])

    def register():
        memory, failed = inspector.embed_references(references)
        if memory is None or failed:
            raise RuntimeError(f"winclip-edge could not embed the references: {[r.error for r in failed]}")
        save_memory(bundle, spec["product"], memory)

    _, report["register_s"], _ = timed(register)
    few_shot = Inspector(bundle, spec["product"], options=options, engine=engine)  # loads the memory
    batch1(few_shot, spec["n_few_shot"], "fs_b1")
    report["peak_rss_b1_mib"] = peak_rss_mib()
    if spec["batch"] > 1:
        batch = list(images[:spec["batch"]])
        results, seconds, cpu_seconds = timed(lambda: few_shot.inspect(batch, batch_size=spec["batch"]))
        arrays.update(_flat("fs_bN", ours_record(few_shot, engine, results)))
        report["fs_bN_latency_s"], report["fs_bN_cpu_s"] = [seconds / spec["batch"]], [cpu_seconds / spec["batch"]]
    report["peak_rss_mib"] = peak_rss_mib()
    report["load_end"] = load_average()
    _save_worker(Path(spec["work"]), "ours", arrays, report)


WORKERS = {"anomalib": anomalib_worker, "ours": ours_worker}


# ================================================================ preparation (parent process)
def _log(message: str) -> None:
    print(f"[anomalib-compare] {message}", file=sys.stderr, flush=True)


def prepare_bundle(args: argparse.Namespace, bundle_dir: Path) -> tuple[Path, dict]:
    """Export (or reuse) the bundle and the same weights as an open_clip checkpoint for anomalib."""
    from winclip_edge.bundle import Bundle, BundleError

    reuse = False
    if (bundle_dir / "manifest.json").is_file() and not args.fresh:
        try:
            m = Bundle(bundle_dir).manifest
            reuse = m.weights.get("source") == "none" and m.weights.get("seed") == args.seed and m.patch_layer == "last"
        except BundleError:
            reuse = False
    if not reuse:
        from winclip_edge.export.onnx_export import ExportOptions, export_bundle

        _log(f"exporting the bundle: {export_command(args, bundle_dir)}")
        export_bundle(bundle_dir, ExportOptions(model=args.model, pretrained="none", seed=args.seed,
                                                patch_layer="last", force=True))
    manifest = Bundle(bundle_dir).manifest
    checkpoint = bundle_dir.parent / f"{bundle_dir.name}.open_clip.pt"
    sidecar = checkpoint.with_suffix(".json")
    if not (checkpoint.is_file() and sidecar.is_file()
            and json.loads(sidecar.read_text()).get("weights_id") == manifest.weights_id):
        import torch

        from winclip_edge.export.models import load_model

        _log("writing the same weights as an open_clip checkpoint for anomalib")
        loaded = load_model(args.model, "none", seed=args.seed)
        if loaded.weights["id"] != manifest.weights_id:
            raise RuntimeError(f"re-created weights {loaded.weights['id'][:12]} differ from the bundle's "
                               f"{manifest.weights_id[:12]}; re-run with --fresh")
        torch.save(loaded.model.state_dict(), checkpoint)
        sidecar.write_text(json.dumps({"weights_id": manifest.weights_id}))
    return checkpoint, manifest.to_dict()


def prepare_inputs(path: Path, size: tuple[int, int], n_images: int, shots: int) -> list[str]:
    """Textile images (conformal-clip-data), resized once to the model size with the runtime's resize, so
    both sides see the same bytes. Test images alternate local / global defects and normal images;
    the ``shots`` references are other normal images."""
    from winclip_edge.evaluation.datasets import GOOD, read_folder, textile_root
    from winclip_edge.preprocess import read_image, resize_to_model

    _, samples = read_folder(textile_root())
    by_type: dict[str, list[str]] = {}
    for s in samples:
        by_type.setdefault(s.defect_type, []).append(s.path)
    normal = by_type.pop(GOOD)
    references, normal = normal[:shots], normal[shots:]
    pools = [*by_type.values(), normal]
    test = [pool[i] for i in range(n_images) for pool in pools if i < len(pool)][:n_images]

    def load(paths: list[str]) -> np.ndarray:
        return np.stack([resize_to_model(read_image(p), size) for p in paths])

    np.savez(path, images=load(test), references=load(references))
    return test + references


def run_worker(side: str, spec: dict, work: Path) -> dict:
    """Launch one side in a fresh interpreter; ``launched_at`` is taken right before the process starts."""
    spec_path = work / f"{side}.spec.json"
    spec_path.write_text(json.dumps({**spec, "launched_at": time.time()}))  # microseconds before the start
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", side, str(spec_path)],
                               env=env, cwd=REPO)
    if completed.returncode != 0:
        raise RuntimeError(f"the {side} worker failed with exit code {completed.returncode} (its output is above)")
    return json.loads((work / f"{side}.json").read_text())


def reused_anomalib(spec: dict, work: Path) -> dict | None:
    """The anomalib side of an earlier run in ``work`` with the same settings (only our engine may differ), or None.
    Its report keeps when it ran (``reused_from``): the two sides are then not back to back."""
    saved = work / "anomalib.spec.json"
    if not (saved.is_file() and (work / "anomalib.json").is_file() and (work / "anomalib.npz").is_file()):
        return None
    old = json.loads(saved.read_text())
    if any(old.get(k) != v for k, v in spec.items() if k != "engine"):
        return None
    report = json.loads((work / "anomalib.json").read_text())
    report["reused_from"] = _dt.datetime.fromtimestamp(old["launched_at"], _dt.timezone.utc).isoformat(timespec="seconds")
    _log(f"reusing the anomalib side measured at {report['reused_from']} (--reuse-anomalib)")
    return report


# ================================================================ comparison and tables
ANSWER_KEYS = ("score", "zero_shot_score", "token_map", "zero_shot_token_map", "map")  # the "same answer" outputs
EMBEDDING_KEYS = ("image_embedding", "patch_tokens")  # + windows_k<k>, window_scores_k<k>


def compare(work: Path, exact: bool = True) -> dict:
    """Max abs differences per phase and output, and the flat-window numbers, from the two workers' arrays."""
    with np.load(work / "anomalib.npz") as a, np.load(work / "ours.npz") as o:
        theirs, ours = dict(a), dict(o)
    diffs: dict[str, dict[str, float]] = {}
    for phase in PHASES:
        t = {k.split(".", 1)[1]: v for k, v in theirs.items() if k.startswith(f"{phase}.")}
        u = {k.split(".", 1)[1]: v for k, v in ours.items() if k.startswith(f"{phase}.")}
        if t and u:
            diffs[phase] = compare_records(u, t)
    scales = sorted(int(k.rsplit("k", 1)[1]) for k in theirs if k.startswith("shipped.windows_k"))
    bug = {
        "shipped": {**{f"window_std_k{k}": window_spread(theirs[f"shipped.windows_k{k}"]) for k in scales},
                    "zero_shot_token_map_std": float(theirs["shipped.zero_shot_token_map"].std())},
        "corrected": {**{f"window_std_k{k}": window_spread(theirs[f"zs_b1.windows_k{k}"][:1]) for k in scales},
                      "zero_shot_token_map_std": float(theirs["zs_b1.zero_shot_token_map"][:1].std())},
        "shipped_vs_ours_map_diff": max_abs_diff(theirs["shipped.map"], ours["zs_b1.map"][:1]),
        "shipped_vs_ours_score_diff": max_abs_diff(theirs["shipped.score"], ours["zs_b1.score"][:1]),
    }
    answer = max(d[k] for d in diffs.values() for k in ANSWER_KEYS if k in d)
    tolerance = MAP_TOLERANCE if exact else TUNED_TOLERANCE
    return {"diffs": diffs, "max_answer_diff": answer, "same_answer": answer <= tolerance, "tolerance": tolerance,
            "flat_window_bug": bug}


def speed_rows(theirs: dict, ours: dict, spec: dict) -> list[dict]:
    """(measure, anomalib, ours, unit, target ratio) rows; ratio = anomalib / ours."""
    ca, co = theirs["cold_start"], ours["cold_start"]
    phases = [("zs_b1", f"batch 1, zero-shot (median of {spec['n_images']})"),
              ("fs_b1", f"batch 1, few-shot K={spec['shots']} (median of {spec['n_few_shot']})")]
    if spec["batch"] > 1:
        phases.append(("fs_bN", f"batch {spec['batch']}, few-shot"))
    rows = [(f"per image, {label}", median(theirs[f"{phase}_latency_s"]), median(ours[f"{phase}_latency_s"]), "s",
             LATENCY_TARGET[spec["engine"][1] == "fp32"]) for phase, label in phases]
    rows += [(f"CPU time per image (all threads), {label}", median(theirs[f"{phase}_cpu_s"]),
              median(ours[f"{phase}_cpu_s"]), "s", None) for phase, label in phases]
    rows += [
        ("cold start: process start -> first result", ca["first_result"], co["first_result"], "s", COLD_START_TARGET),
        ("  interpreter start", ca["interpreter_up"], co["interpreter_up"], "s", None),
        ("  imports", ca["imported"] - ca["interpreter_up"], co["imported"] - co["interpreter_up"], "s", None),
        ("  model + prompts (anomalib) / bundle + session (ours)", ca["model_and_prompts"] - ca["imported"],
         co["bundle_and_session"] - co["imported"], "s", None),
        ("  first inference", ca["first_result"] - ca["model_and_prompts"],
         co["first_result"] - co["bundle_and_session"], "s", None),
        ("start-up without the first inference (process start -> ready to infer)", ca["model_and_prompts"],
         co["bundle_and_session"], "s", None),
        ("cold start CPU time (all threads)", theirs["cold_start_cpu_s"], ours["cold_start_cpu_s"], "s", None),
        ("peak RSS, batch-1 phases", theirs["peak_rss_b1_mib"], ours["peak_rss_b1_mib"], "MiB", None),
        ("peak RSS, whole run", theirs["peak_rss_mib"], ours["peak_rss_mib"], "MiB", None),
        ("register K=%d references (anomalib's setup() also re-encodes the prompts)" % spec["shots"],
         theirs["register_s"], ours["register_s"], "s", None),
    ]
    return [{"measure": m, "anomalib": a, "winclip_edge": o, "unit": u, "ratio": a / o, "target_ratio": t,
             "met": None if t is None else a / o >= t} for m, a, o, u, t in rows]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def markdown(result: dict) -> str:
    s, c, bug = result["settings"], result["comparison"], result["comparison"]["flat_window_bug"]
    lines = [
        f"# anomalib {result['versions']['anomalib']} WinCLIP vs winclip-edge, side by side",
        "",
        f"- date: {result['date']}",
        f"- machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['ram_gib']} GiB, {result['machine']['os']}, no GPU used",
        f"- load (`uptime`) before: `{result['load']['uptime_start']}`",
        *([f"- anomalib side reused from the run at {result['workers']['anomalib']['reused_from']} (--reuse-anomalib): "
           "the two sides were not timed back to back"] if "reused_from" in result["workers"]["anomalib"] else []),
        f"- load (`uptime`) after: `{result['load']['uptime_end']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- command: `{result['command']}`",
        f"- model {s['model']}, random weights (seed {s['seed']}, weights id {s['weights_id'][:12]}, "
        f"same id on both sides: {s['weights_id_match']}), input {s['input_size'][0]}x{s['input_size'][1]}, "
        f"{s['threads']} threads each (torch / ONNX Runtime {result['workers']['ours']['device']}), "
        f"anomalib's text prototypes on both sides, patch layer `last`, T = {s['temperature']['anomalib']} (anomalib) / "
        f"{s['temperature']['winclip_edge']} (ours)",
        f"- images: {s['n_test_images']} textile images resized once to the model size, "
        f"K={s['shots']} normal references; each side in its own fresh process, one after the other",
        "",
        "## Same answer (max abs difference, winclip-edge vs anomalib with the window correction)",
        "",
        "| output | " + " | ".join(c["diffs"]) + " |",
        "|---|" + "---|" * len(c["diffs"]),
    ]
    keys = list(dict.fromkeys(k for d in c["diffs"].values() for k in d))
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{d[k]:.2e}" if k in d else "" for d in c["diffs"].values()) + " |")
    lines += [
        "",
        f"Phases: zs_b1 = zero-shot batch 1, fs_b1 = few-shot batch 1, fs_bN = few-shot batch {s['batch']}. "
        f"Largest difference of a score or map: **{c['max_answer_diff']:.2e}** "
        f"({'<=' if c['same_answer'] else '>'} {c.get('tolerance', MAP_TOLERANCE):g}: "
        f"{'same answer' if c['same_answer'] else 'NOT the same answer'}; our engine: {' '.join(s.get('engine', ['onnxruntime', 'fp32']))}).",
        "",
        "## anomalib as shipped: flat windows (image 0)",
        "",
        "| | as shipped | with the harness's correction |",
        "|---|---|---|",
    ]
    for k in bug["shipped"]:
        lines.append(f"| {k} | {bug['shipped'][k]:.3g} | {bug['corrected'][k]:.3g} |")
    lines += [
        "",
        "window_std_k<k>: largest standard deviation across the windows of scale k of the unit window embeddings; "
        "zero_shot_token_map_std: standard deviation over the 15x15 zero-shot map. Values around 1e-7 are float32 "
        "rounding: as shipped, every window has the same embedding and the zero-shot map is flat.",
        "",
        f"As shipped, anomalib's pixel map differs from the corrected one (= ours) by up to "
        f"{bug['shipped_vs_ours_map_diff']:.3g}, its image score by {bug['shipped_vs_ours_score_diff']:.3g} "
        "(the zero-shot image score does not use the windows).",
        "",
        "## Speed (same run, same machine)",
        "",
        f"| measure | anomalib (torch eager fp32) | winclip-edge ({' '.join(s.get('engine', ['onnxruntime', 'fp32']))}, CPU) "
        "| anomalib / ours | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["speed"]:
        target = "" if r["target_ratio"] is None else f">= {r['target_ratio']:g}x"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['measure']} | {_fmt(r['anomalib'])} {r['unit']} | {_fmt(r['winclip_edge'])} {r['unit']} "
                     f"| {r['ratio']:.2f}x | {target} | {met} |")
    shipped = result["workers"]["anomalib"]["shipped_latency_s"]
    lines += [
        "",
        f"anomalib as shipped (flat windows), batch 1: {shipped:.3g} s per image. The two sides ran one after "
        "the other; on a shared CPU the absolute times follow the load, compare the ratios. "
        f"Worker load averages (1/5/15 min) at start/end: anomalib {result['workers']['anomalib']['load_start']} / "
        f"{result['workers']['anomalib']['load_end']}, winclip-edge {result['workers']['ours']['load_start']} / "
        f"{result['workers']['ours']['load_end']}.",
        "",
    ]
    return "\n".join(lines)


def export_command(args: argparse.Namespace, bundle_dir: Path) -> str:
    return shlex.join(["winclip-edge", "export", "--model", args.model, "--pretrained", "none", "--seed",
                       str(args.seed), "--patch-layer", "last", "--out", str(bundle_dir)])


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    uptime_start = uptime_line()
    _log(f"start: {uptime_start}")
    bundle_dir = work / f"bundle-{Path(args.model).stem}-seed{args.seed}-last"
    checkpoint, manifest = prepare_bundle(args, bundle_dir)
    n_test = max(args.images, args.few_shot_images, args.batch)
    sources = prepare_inputs(work / "inputs.npz", tuple(manifest["image_size"]), n_test, args.shots)
    spec = {"work": str(work), "model": args.model, "model_name": manifest["model"],
            "config": manifest["model_config"] is not None, "checkpoint": str(checkpoint), "bundle": str(bundle_dir),
            "product": args.product, "inputs": str(work / "inputs.npz"), "n_images": args.images,
            "n_few_shot": args.few_shot_images, "shots": args.shots, "batch": args.batch, "threads": args.threads,
            "mean": manifest["mean"], "std": manifest["std"], "engine": engine_choice(args.engine)}
    _log("anomalib worker (cold start, flat-window check, batch-1 zero-/few-shot, batch run) ...")
    theirs = reused_anomalib(spec, work) if args.reuse_anomalib else None
    if theirs is None:
        theirs = run_worker("anomalib", spec, work)
    from winclip_edge.bundle import Bundle
    from winclip_edge.products import MEMORY, THRESHOLD, save_text

    bundle = Bundle(bundle_dir)
    with np.load(work / "anomalib.npz") as a:
        save_text(bundle, args.product, text_prototypes_from_anomalib(a["text_embeddings"], args.product))
    for name in (MEMORY, THRESHOLD):  # a previous run's few-shot memory must not make the first phase few-shot
        (bundle.product_dir(args.product) / name).unlink(missing_ok=True)
    if spec["engine"][1] == "int8":  # made before the timed worker, as `tune` or `quantize` would have
        from winclip_edge.engines import EngineConfig
        from winclip_edge.performance.tuning import prepare_engine

        prepare_engine(bundle, EngineConfig(backend=spec["engine"][0], precision="int8"), args.product, _log)
    _log("winclip-edge worker (same phases) ...")
    ours = run_worker("ours", spec, work)
    comparison = compare(work, exact=spec["engine"][1] == "fp32")
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, str(Path(__file__).resolve().relative_to(REPO)), *argv]),
        "bundle_export_command": export_command(args, bundle_dir),
        "machine": machine_info(), "versions": software_versions(),
        "load": {"uptime_start": uptime_start, "uptime_end": uptime_line()},
        "settings": {"model": manifest["model"], "seed": args.seed, "weights_id": manifest["weights"]["id"],
                     "weights_id_match": theirs["weights_id"] == manifest["weights"]["id"],
                     "input_size": manifest["image_size"], "threads": args.threads, "product": args.product,
                     "temperature": {"anomalib": theirs["temperature"], "winclip_edge": ours["temperature"]},
                     "engine": spec["engine"], "n_test_images": n_test, "n_images": args.images, "n_few_shot": args.few_shot_images,
                     "shots": args.shots, "batch": args.batch, "sources": sources},
        "comparison": comparison,
        "speed": speed_rows(theirs, ours, spec),
        "workers": {"anomalib": theirs, "ours": ours},
    }
    out = Path(args.out)
    write_report(out, args.name, result, markdown(result))
    _log(f"results: {out / args.name}.md and .json")
    return result


def engine_choice(text: str) -> list[str]:
    """``BACKEND:PRECISION`` -> [backend, precision]."""
    backend, _, precision = text.partition(":")
    if not backend or not precision:
        raise SystemExit(f"--engine expects BACKEND:PRECISION, e.g. openvino:int8, got {text!r}")
    return [backend, precision]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name or config JSON (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--product", default=DEFAULT_PRODUCT, help="product / anomalib class name (default %(default)s)")
    p.add_argument("--images", type=int, default=4, help="timed batch-1 zero-shot images (default 4, ~12 s each for anomalib)")
    p.add_argument("--few-shot-images", type=int, default=2, help="timed batch-1 few-shot images (default 2)")
    p.add_argument("--shots", type=int, default=2, help="K normal reference images (default 2)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched few-shot run; 1 skips it (default 8)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for torch and ONNX Runtime (default: all cores)")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="bundle, checkpoint and worker files (default %(default)s)")
    p.add_argument("--fresh", action="store_true", help="re-export the bundle even if a matching one is in --work")
    p.add_argument("--out", default=str(DEFAULT_RESULTS), help="folder of the result tables (default benchmarks/results)")
    p.add_argument("--name", default="anomalib_compare", help="file stem of the result tables (default %(default)s)")
    p.add_argument("--engine", default="onnxruntime:fp32",
                   help="our side's engine as BACKEND:PRECISION, e.g. openvino:int8 (what `winclip-edge engine tune` picked); "
                        "an int8 model is made before the timed run; not fp32 = same answer within 1e-2 (default %(default)s)")
    p.add_argument("--reuse-anomalib", action="store_true",
                   help="take the anomalib side from an earlier run in --work with the same settings (e.g. to compare a "
                        "second engine of ours without timing anomalib again); the table says when it ran")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "SPEC"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        side, spec = args.worker
        WORKERS[side](json.loads(Path(spec).read_text()))
        return 0
    for name, value in (("--images", args.images), ("--few-shot-images", args.few_shot_images),
                        ("--shots", args.shots), ("--batch", args.batch), ("--threads", args.threads)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    result = run(args, argv)
    print(markdown(result))
    return 0 if result["comparison"]["same_answer"] else 1


if __name__ == "__main__":
    sys.exit(main())
