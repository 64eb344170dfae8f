"""Triton: the exported repository's config against the contract, and a real Triton server (PyTriton's bundled
tritonserver, started with `winclip-edge triton serve` as a user starts it) on loopback ports, against local ONNX
Runtime on the same inputs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import free_ports, textured_part, wait_for

pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install 'winclip-edge[triton]')")

from winclip_edge.bundle import Bundle  # noqa: E402
from winclip_edge.cli import main  # noqa: E402
from winclip_edge.contract import ContractError, output_names  # noqa: E402
from winclip_edge.engines import EngineConfig, create_engine  # noqa: E402
from winclip_edge.engines.triton import TritonOptions  # noqa: E402
from winclip_edge.engines.triton_identity import WEIGHTS_ID, model_parameters  # noqa: E402
from winclip_edge.triton.repository import (RepositoryConfig, check_config, read_config,  # noqa: E402
                                            write_repository)

SERVER_PEER = Path(__file__).resolve().parents[1] / ".venv-triton"  # built by .ci/run (.ci/peer_env.py)


def server_python() -> str:
    """The interpreter `triton-serve` runs in: $WINCLIP_TRITON_PYTHON, else the repository's .venv-triton peer, else
    this one. PyTriton requires numpy < 2, so it lives beside the project's environment, not in it (docs/triton.md)."""
    peer = SERVER_PEER / "bin" / "python"
    return os.environ.get("WINCLIP_TRITON_PYTHON") or (str(peer) if peer.exists() else sys.executable)


def _pytriton_missing(python: str) -> str:
    probe = subprocess.run([python, "-c", "import pytriton, winclip_edge.triton.server"], capture_output=True, text=True)
    if not probe.returncode:
        return ""
    # the wheel exists for Linux x86_64/aarch64 with glibc >= 2.35 only
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return (f"nvidia-pytriton cannot be imported by {python} ({last}); the real-server tests need its tritonserver: "
            f"python .ci/peer_env.py .venv-triton --extra triton-server --unpin numpy,opencv-python-headless")


SERVER_PYTHON = server_python()
NO_PYTRITON = _pytriton_missing(SERVER_PYTHON)
needs_server = pytest.mark.skipif(bool(NO_PYTRITON), reason=NO_PYTRITON or "-")


class ServerProcess:
    """`winclip-edge triton serve` in its own process group on free loopback ports, run by SERVER_PYTHON."""

    def __init__(self, bundle: Path, *extra: str):
        self.http, self.grpc, self.metrics = free_ports(3)
        cmd = [SERVER_PYTHON, "-m", "winclip_edge.cli", "triton-serve", "--bundle", str(bundle), "--http-port",
               str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--threads", "1",
               *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("ready:"):
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 120
        while not ready.is_set() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not ready.is_set():
            self.kill()
            raise AssertionError("triton-serve did not become ready:\n" + "".join(self.lines[-20:]))

    def url(self, protocol: str) -> str:
        return f"127.0.0.1:{self.grpc if protocol == 'grpc' else self.http}"

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10).read().decode()
        return sum(float(m) for m in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))

    def kill(self) -> None:
        """SIGKILL the whole group: the CLI process, tritonserver and the Python backend stub."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


@pytest.fixture(scope="module")
def server(tiny_bundle):
    if NO_PYTRITON:
        pytest.skip(NO_PYTRITON)
    s = ServerProcess(tiny_bundle, "--queue-delay-us", "20000")
    yield s
    s.stop()


def triton_config(server: ServerProcess, protocol: str = "grpc") -> EngineConfig:
    return EngineConfig(backend="triton", options=TritonOptions(url=server.url(protocol), protocol=protocol, timeout=20))


def textile_files(n: int, folder: str = "nominal") -> list[str]:
    from winclip_edge.evaluation.datasets import textile_root

    return [str(p) for p in sorted((textile_root() / folder).glob("*"))[:n]]


# ---------------------------------------------------------------- the repository (no server)
def test_repository_config_parses_and_matches_contract(tiny_bundle, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    bundle = Bundle(tiny_bundle)
    cfg = RepositoryConfig(max_batch=16, preferred_batch=(4, 8, 64), queue_delay_us=500, instances=2)
    folder = write_repository(bundle, tmp_path / "repo", cfg)
    config = read_config(folder / "config.pbtxt")  # Triton's own ModelConfig protobuf
    assert isinstance(config, pb.ModelConfig)
    assert config.name == "winclip_visual" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    spec = bundle.spec
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == \
        [("images", "TYPE_UINT8", [*spec.image_size, 3])]
    shapes = spec.output_shapes()
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == \
        [(n, "TYPE_FP32", list(shapes[n][1:])) for n in output_names(spec.scales)]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]  # 64 > max batch: dropped
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, pb.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(2, "KIND_GPU")]
    assert config.version_policy.latest.num_versions == 1
    assert {k: v.string_value for k, v in config.parameters.items()} == model_parameters(bundle)
    from winclip_edge.fileio import sha256_file

    assert sha256_file(folder / "1" / "model.onnx") == bundle.manifest.files["visual.onnx"]

    # a config that does not match the bundle is refused
    text = (folder / "config.pbtxt").read_text().replace(bundle.manifest.weights_id, "0" * 64)
    (folder / "config.pbtxt").write_text(text)
    with pytest.raises(ContractError, match="other weights"):
        check_config(bundle, read_config(folder / "config.pbtxt"), "edited")
    config.output[0].dims[0] += 1
    with pytest.raises(ContractError, match="outputs"):
        check_config(bundle, config, "edited")


def test_export_triton_command(tiny_bundle, tmp_path, capsys):
    from tritonclient.grpc import model_config_pb2 as pb

    repo = tmp_path / "repo"
    assert main(["export-triton", "--bundle", str(tiny_bundle), "--out", str(repo), "--name", "line_a", "--max-batch",
                 "8", "--preferred-batch", "2,4", "--queue-delay-us", "100", "--instances", "3",
                 "--instance-kind", "cpu"]) == 0
    assert "nvcr.io/nvidia/tritonserver" in capsys.readouterr().out
    config = read_config(repo / "line_a" / "config.pbtxt")
    assert (config.name, config.max_batch_size, list(config.dynamic_batching.preferred_batch_size)) == ("line_a", 8, [2, 4])
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.instance_group[0].count == 3 and config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert main(["export-triton", "--bundle", str(tiny_bundle), "--out", str(repo), "--max-batch", "0"]) == 2


def test_fp16_output_graph_matches_fp32(tiny_bundle, tmp_path):
    import onnxruntime as ort

    bundle = Bundle(tiny_bundle)
    folder = write_repository(bundle, tmp_path / "repo", RepositoryConfig(outputs_fp16=True, name="m16"))
    assert "TYPE_FP16" in (folder / "config.pbtxt").read_text()
    images = np.stack([textured_part(seed=i) for i in range(2)])
    ref = dict(zip(output_names(bundle.spec.scales), ort.InferenceSession(str(bundle.onnx_path)).run(
        output_names(bundle.spec.scales), {"images": images})))
    got = ort.InferenceSession(str(folder / "1" / "model.onnx")).run(list(ref), {"images": images})
    for (name, r), g in zip(ref.items(), got):
        assert g.dtype == np.float16, name
        assert np.abs(g.astype(np.float32) - r).max() < 2e-3, name


def test_tensorrt_repository_takes_the_plan_of_this_bundle(bundle_copy, tmp_path):
    from winclip_edge.engines.engine_cache import BatchProfile, DeviceInfo, EngineKey, save_engine
    from winclip_edge.triton.repository import RepositoryError

    bundle = Bundle(bundle_copy)
    device = DeviceInfo(gpu="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), trt_version="10.3.0")
    other = EngineKey(device, "fp16", "0" * 64, BatchProfile(1, 8, 16))  # built from another visual.onnx
    save_engine(bundle.root / "engines", other, b"plan of another graph", build={})
    with pytest.raises(RepositoryError, match="0 fit"):
        write_repository(bundle, tmp_path / "repo", RepositoryConfig(platform="tensorrt"))
    assert not any((tmp_path / "repo").iterdir())  # nothing half-written left behind
    key = EngineKey(device, "fp16", bundle.manifest.files["visual.onnx"], BatchProfile(1, 8, 16))
    plan = save_engine(bundle.root / "engines", key, b"serialized engine bytes", build={})
    folder = write_repository(bundle, tmp_path / "repo", RepositoryConfig(platform="tensorrt", max_batch=32))
    config = read_config(folder / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert config.max_batch_size == 16  # lowered to the plan's profile maximum
    assert (folder / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert config.parameters["winclip_plan_built_for"].string_value == "NVIDIA H100 80GB HBM3 sm90 TensorRT 10.3.0 fp16"
    with pytest.raises(RepositoryError, match="--outputs-fp16"):
        write_repository(bundle, tmp_path / "repo", RepositoryConfig(platform="tensorrt", outputs_fp16=True))


def test_python_library_env_puts_this_libpython_first():
    import sysconfig

    from winclip_edge.triton.server import python_library_env

    env = python_library_env({"LD_LIBRARY_PATH": "/opt/x"})
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert env["LD_LIBRARY_PATH"].split(":") == [sysconfig.get_config_var("LIBDIR"), "/opt/x"]
    else:
        assert env == {"LD_LIBRARY_PATH": "/opt/x"}


def test_retries_with_back_off_then_one_attempt_while_down(monkeypatch):
    from tritonclient.utils import InferenceServerException

    from winclip_edge.engines import EngineError
    from winclip_edge.engines import triton as engine_module

    engine = object.__new__(engine_module.TritonEngine)  # only the call policy, no server
    engine.protocol, engine.timeout, engine.where, engine._down = "http", 1.0, "triton model 'm' at http://x", False
    sleeps, calls = [], []
    monkeypatch.setattr(engine_module.time, "sleep", sleeps.append)

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("refused")
        return "ok"

    assert engine._call("probe", flaky) == "ok" and sleeps == [0.25, 0.5]

    def down():
        calls.append(1)
        raise ConnectionRefusedError("refused")

    calls.clear(), sleeps.clear()
    with pytest.raises(EngineError, match="failed after 4 attempts"):
        engine._call("probe", down)
    assert len(calls) == 4 and sleeps == [0.25, 0.5, 1.0]
    calls.clear()
    with pytest.raises(EngineError):  # still down: one attempt, no waiting
        engine._call("probe", down)
    assert len(calls) == 1 and len(sleeps) == 3
    assert engine._call("probe", lambda: "back") == "back" and not engine._down

    for refused in (InferenceServerException("bad input", status="400"), TimeoutError("timed out")):
        def fails(err=refused):
            calls.append(1)
            raise err

        calls.clear()
        with pytest.raises(EngineError):  # refused or timed out: never retried
            engine._call("probe", fails)
        assert len(calls) == 1


# ---------------------------------------------------------------- a real server
@needs_server
def test_request_timeout_is_one_error(server, tiny_bundle):
    from winclip_edge.engines import EngineError

    engine = create_engine(Bundle(tiny_bundle), triton_config(server))
    engine.timeout = 0.001  # a batch of 16 takes far longer than 1 ms on the server
    with pytest.raises(EngineError, match="timed out after 0.001 s"):
        engine.run(np.zeros((16, 240, 240, 3), np.uint8))
    engine.close()


@needs_server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_equals_local_onnxruntime(server, tiny_bundle, protocol):
    from winclip_edge.inspector import Inspector

    images = [textured_part(seed=i, defect=(40, 60, 30, 30) if i % 2 else None) for i in range(5)]
    remote = Inspector(tiny_bundle, "widget", engine=triton_config(server, protocol))
    local = Inspector(tiny_bundle, "widget")
    assert remote.engine.name == "triton" and "FP32 outputs" in remote.engine.device
    batch = np.stack(images)
    got, ref = remote.embed(batch), local.embed(batch)
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].dtype == np.float32 and got[name].shape == ref[name].shape
        assert np.abs(got[name] - ref[name]).max() <= 1e-5, name
    r_remote, r_local = remote.inspect(images, batch_size=3), local.inspect(images, batch_size=3)
    for a, b in zip(r_remote, r_local):
        assert a.error is None and abs(a.score - b.score) <= 1e-5
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-5
    remote.close()


@needs_server
def test_fp16_outputs_on_the_wire(tiny_bundle):
    from winclip_edge.inspector import Inspector

    fp16 = ServerProcess(tiny_bundle, "--outputs-fp16", "--name", "winclip_fp16")
    try:
        config = EngineConfig(backend="triton", options=TritonOptions(url=fp16.url("http"), protocol="http",
                                                                   model="winclip_fp16"))
        remote, local = Inspector(tiny_bundle, "widget", engine=config), Inspector(tiny_bundle, "widget")
        assert "FP16 outputs" in remote.engine.device
        images = [textured_part(seed=i, defect=(60, 60, 40, 40) if i == 1 else None) for i in range(3)]
        got, ref = remote.embed(np.stack(images)), local.embed(np.stack(images))
        for name in ref:
            assert got[name].dtype == np.float32 and np.abs(got[name] - ref[name]).max() < 2e-3, name
        for a, b in zip(remote.inspect(images), local.inspect(images)):
            assert a.error is None and abs(a.score - b.score) < 1e-3
        remote.close()
    finally:
        fp16.stop()


@needs_server
def test_infer_on_textile_images_equals_local(server, tiny_bundle, tmp_path):
    files = textile_files(3, "nominal") + textile_files(3, "local")
    rows = {}
    for backend, flags in (("onnxruntime", []), ("triton", ["--triton-url", server.url("grpc")])):
        out = tmp_path / backend
        code = main(["infer", "--bundle", str(tiny_bundle), "--product", "widget", "--backend", backend, *flags,
                     "--out", str(out), "--no-overlays", "--quiet", "--batch", "4", *files])
        assert code == 0
        rows[backend] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows["triton"]) == len(files)
    for a, b in zip(rows["triton"], rows["onnxruntime"]):
        assert a["error"] is None and abs(a["score"] - b["score"]) <= 1e-5


@needs_server
def test_serve_line_station_with_triton_equals_local(server, tiny_bundle, tmp_path):
    import cv2

    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (240, 240))
    for i in range(4):
        writer.write(cv2.cvtColor(textured_part(seed=i, defect=(50, 50, 40, 40) if i == 2 else None), cv2.COLOR_RGB2BGR))
    writer.release()
    scores = {}
    for backend, flags in (("onnxruntime", []), ("triton", ["--triton-url", server.url("grpc")])):
        out = tmp_path / backend
        done = subprocess.run([sys.executable, "-m", "winclip_edge.cli", "serve", "--bundle", str(tiny_bundle),
                               "--product", "widget", "--backend", backend, *flags, "--source", str(video),
                               "--out", str(out), "--save", "none"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert [r["frame"] for r in rows] == [0, 1, 2, 3] and all(r["error"] is None for r in rows)
        scores[backend] = [r["score"] for r in rows]
    assert np.abs(np.array(scores["triton"]) - np.array(scores["onnxruntime"])).max() <= 1e-5


@needs_server
def test_register_and_calibrate_through_triton_equal_local(server, bundle_copy, tmp_path):
    import shutil

    from winclip_edge.products import load_memory, load_threshold

    local_copy = tmp_path / "local"
    shutil.copytree(bundle_copy, local_copy)
    references, normals = textile_files(3), textile_files(6)[3:]
    for bundle, flags in ((bundle_copy, ["--backend", "triton", "--triton-url", server.url("grpc")]),
                          (local_copy, ["--backend", "onnxruntime"])):
        common = ["--bundle", str(bundle), "--product", "widget", *flags, "--quiet"]
        assert main(["register", *common, *references]) == 0
        assert main(["calibrate", *common, *normals]) == 0
    remote, local = Bundle(bundle_copy), Bundle(local_copy)
    m_remote, m_local = load_memory(remote, "widget"), load_memory(local, "widget")
    assert np.abs(m_remote.patch_tokens - m_local.patch_tokens).max() <= 1e-5
    assert np.abs(m_remote.image_embeddings - m_local.image_embeddings).max() <= 1e-5
    t_remote, t_local = load_threshold(remote, "widget", m_remote), load_threshold(local, "widget", m_local)
    assert abs(t_remote.value - t_local.value) <= 1e-5


@needs_server
def test_concurrent_clients_are_batched_by_the_server(server, tiny_bundle):
    bundle = Bundle(tiny_bundle)
    clients, rounds = 12, 3
    engines = [create_engine(bundle, triton_config(server)) for _ in range(clients)]
    image = textured_part(seed=3)[None]
    before = server.metric("nv_inference_request_success"), server.metric("nv_inference_exec_count")
    barrier, errors = threading.Barrier(clients), []

    def client(engine) -> None:
        try:
            for _ in range(rounds):
                barrier.wait(timeout=60)
                engine.run(image)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for e in engines:
        e.close()
    assert not errors
    # Triton refreshes its metrics every ~2 s: the counter may lag the answers just received
    wait_for(lambda: server.metric("nv_inference_request_success") - before[0] >= clients * rounds, timeout=15,
             what="the server's request counter")
    requests = server.metric("nv_inference_request_success") - before[0]
    executions = server.metric("nv_inference_exec_count") - before[1]
    assert requests == clients * rounds
    assert executions < requests, f"{executions} executions for {requests} requests: the server batched nothing"


@needs_server
def test_server_model_from_other_weights_is_refused(server, make_bundle, tmp_path, capsys):
    other = make_bundle("tiny240", seed=1)  # same contract, other weights
    assert Bundle(other).manifest.weights_id != model_parameters(Bundle(server_bundle(server)))[WEIGHTS_ID]
    capsys.readouterr()  # the export's log
    code = main(["infer", "--bundle", str(other), "--product", "widget", "--backend", "triton", "--triton-url",
                 server.url("grpc"), "--out", str(tmp_path / "out"), "--quiet", str(Path(textile_files(1)[0]))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "other weights" in err[0] and "Traceback" not in err[0]


@needs_server
def test_triton_serve_reports_a_model_that_fails_to_load(tiny_bundle):
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "WINCLIP_TRITON_THREADS": "not-a-number"}  # model.py's initialize raises
    done = subprocess.run([SERVER_PYTHON, "-m", "winclip_edge.cli", "triton-serve", "--bundle", str(tiny_bundle),
                           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                          capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 2
    ours = [line for line in done.stderr.splitlines() if line.startswith("winclip-edge")]
    assert len(ours) == 1 and "Triton did not start: failed to load 'winclip_visual'" in ours[0]
    assert "not-a-number" in ours[0] and "Traceback" not in done.stderr


def server_bundle(server: ServerProcess) -> Path:
    return Path(server.proc.args[server.proc.args.index("--bundle") + 1])


def test_unreachable_server_is_one_line(tiny_bundle, tmp_path, capsys):
    port = free_ports(1)[0]
    code = main(["infer", "--bundle", str(tiny_bundle), "--product", "widget", "--backend", "triton",
                 "--triton-url", f"127.0.0.1:{port}", "--triton-timeout", "2", "--out", str(tmp_path / "o"),
                 "--quiet", textile_files(1)[0]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not reachable" in err[0], err


@needs_server
def test_server_killed_mid_run_gives_error_rows_and_exit_1(tiny_bundle, tmp_path):
    files = textile_files(150)
    victim = ServerProcess(tiny_bundle)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "winclip_edge.cli", "infer", "--bundle", str(tiny_bundle), "--product", "widget",
           "--backend", "triton", "--triton-url", victim.url("grpc"), "--triton-timeout", "5", "--batch", "1",
           "--out", str(out), "--no-maps", "--no-overlays", "--quiet", *files]
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        results = out / "results.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and client.poll() is None:
            if results.is_file() and results.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        victim.kill()
        stdout, stderr = client.communicate(timeout=120)
    finally:
        victim.stop()
        if client.poll() is None:
            client.kill()
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert client.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    assert [r["file"] for r in rows] == files  # every input has its row, in order
    ok = [r for r in rows if r["error"] is None]
    failed = [r for r in rows if r["error"] is not None]
    assert len(ok) >= 3 and failed, (len(ok), len(failed))
    print(f"killed after {len(ok)} ok rows, {len(failed)} error rows")
    assert all("triton model 'winclip_visual'" in r["error"] for r in failed)
    assert f"{len(ok)}/{len(files)} inspected" in stdout
