"""A Triton Inference Server model repository made from a bundle (``winclip-edge triton export``).

::

    REPO/<name>/config.pbtxt      Triton's ModelConfig (text protobuf), built with tritonclient's own protobuf
    REPO/<name>/1/model.onnx      the bundle's visual.onnx (platform onnxruntime_onnx), or
    REPO/<name>/1/model.plan      a TensorRT plan from `engine build` (platform tensorrt_plan), or
    REPO/<name>/1/model.py        + model.onnx: Triton's Python backend running ONNX Runtime (``triton serve``)

Inputs and outputs are the graph contract (contract.py) with the batch axis as Triton's ``max_batch_size``;
the bundle's ids go into ``parameters`` (identity.py) so that a client refuses a model from other weights.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ..bundle import VISUAL_ONNX, Bundle
from ..contract import INPUT_NAME, ContractError, output_names
from ..errors import WinclipError
from ..fileio import atomic_write_bytes, sha256_file
from ..engines.triton_identity import check_parameters, model_parameters

PLATFORMS = ("onnxruntime", "tensorrt", "python")
CONFIG = "config.pbtxt"
VERSION = "1"
MODEL_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py"}
PYTHON_MODEL = Path(__file__).with_name("python_model.py")  # copied as model.py for the Python backend


class RepositoryError(WinclipError, ValueError):
    """A repository cannot be written or does not match its bundle."""


@dataclass(frozen=True)
class RepositoryConfig:
    name: str = "winclip_visual"
    platform: str = "onnxruntime"  # onnxruntime | tensorrt | python (the CPU trial server of triton-serve)
    max_batch: int = 32  # Triton's max_batch_size: the largest batch the dynamic batcher forms
    preferred_batch: tuple[int, ...] = (8, 16)  # batch sizes the batcher waits for (those above max_batch dropped)
    queue_delay_us: int = 2000  # how long a request may wait for others to join its batch
    instances: int = 1  # model instances (per GPU for KIND_GPU)
    device: str = "auto"  # gpu | cpu | auto (gpu for onnxruntime/tensorrt, cpu for python)
    outputs_fp16: bool = False  # outputs sent as fp16: half the bytes on the wire
    plan: Path | None = None  # tensorrt: the plan (default: the one build-engine cached for this bundle)

    def check(self) -> None:
        if self.platform not in PLATFORMS:
            raise RepositoryError(f"platform {self.platform!r} unknown; choose one of {PLATFORMS}")
        if not self.name or not all(c.isalnum() or c in "_-." for c in self.name):
            raise RepositoryError(f"model name {self.name!r}: use letters, digits, '_', '-' or '.'")
        if self.max_batch < 1 or self.instances < 1 or self.queue_delay_us < 0:
            raise RepositoryError("--max-batch and --instances must be >= 1, --queue-delay-us >= 0")
        if any(b < 1 for b in self.preferred_batch):
            raise RepositoryError(f"preferred batch sizes must be >= 1, got {list(self.preferred_batch)}")
        if self.device not in ("auto", "gpu", "cpu"):
            raise RepositoryError(f"device {self.device!r} unknown; choose auto, gpu or cpu")
        if self.outputs_fp16 and self.platform == "tensorrt":
            raise RepositoryError("--outputs-fp16 needs an ONNX graph (platform onnxruntime): a TensorRT plan keeps "
                                  "the float32 outputs it was built with")

    @property
    def instance_kind(self) -> str:
        device = self.device if self.device != "auto" else ("cpu" if self.platform == "python" else "gpu")
        return f"KIND_{device.upper()}"


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:
        raise RepositoryError(f"tritonclient is not installed ({err}); pip install 'winclip-edge[triton]'") from None
    return model_config_pb2, text_format


def model_config(bundle: Bundle, cfg: RepositoryConfig, extra_parameters: dict[str, str] | None = None):
    """The ``ModelConfig`` protobuf of ``bundle`` under ``cfg``."""
    pb, _ = _pb()
    spec = bundle.spec
    out_type = pb.TYPE_FP16 if cfg.outputs_fp16 else pb.TYPE_FP32
    config = pb.ModelConfig(name=cfg.name, max_batch_size=cfg.max_batch,
                            default_model_filename=MODEL_FILES[cfg.platform])
    if cfg.platform == "python":
        config.backend = "python"
    else:
        config.platform = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[cfg.platform]
    config.version_policy.latest.num_versions = 1
    config.input.add(name=INPUT_NAME, data_type=pb.TYPE_UINT8, dims=list(spec.input_shape[1:]))
    shapes = spec.output_shapes()
    for name in output_names(spec.scales):
        config.output.add(name=name, data_type=out_type, dims=list(shapes[name][1:]))
    preferred = sorted({b for b in cfg.preferred_batch if b <= cfg.max_batch})
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = cfg.queue_delay_us
    config.instance_group.add(count=cfg.instances, kind=pb.ModelInstanceGroup.Kind.Value(cfg.instance_kind))
    for key, value in {**model_parameters(bundle), **(extra_parameters or {})}.items():
        config.parameters[key].string_value = value
    return config


def config_text(config) -> str:
    _, text_format = _pb()
    return text_format.MessageToString(config)


def read_config(path: str | os.PathLike):
    """Parse a ``config.pbtxt`` with Triton's ModelConfig protobuf (raises RepositoryError, one line)."""
    pb, text_format = _pb()
    try:
        return text_format.Parse(Path(path).read_text(), pb.ModelConfig())
    except (OSError, text_format.ParseError) as err:
        raise RepositoryError(f"{path} is not a Triton model config ({err})") from None


def check_config(bundle: Bundle, config, where: str) -> None:
    """The config's inputs/outputs are exactly the contract of ``bundle`` (names, dtypes, dims) and it carries the
    bundle's ids."""
    pb, _ = _pb()
    spec = bundle.spec
    expected = {INPUT_NAME: ("TYPE_UINT8", list(spec.input_shape[1:]))}
    outs = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in config.output}
    ins = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in config.input}
    if ins != expected:
        raise ContractError(f"{where}: inputs {ins}, the bundle's contract is {expected}")
    want_outs = {n: list(s[1:]) for n, s in spec.output_shapes().items()}
    if {n: d for n, (_, d) in outs.items()} != want_outs or any(t not in ("TYPE_FP32", "TYPE_FP16") for t, _ in outs.values()):
        raise ContractError(f"{where}: outputs {outs}, the bundle's contract is {want_outs} (FP32 or FP16)")
    if config.max_batch_size < 1:
        raise ContractError(f"{where}: max_batch_size {config.max_batch_size}: the batch axis must be Triton's")
    check_parameters(bundle, {k: v.string_value for k, v in config.parameters.items()}, where)


def fp16_output_graph(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy of an ONNX graph whose outputs are cast to float16 inside the graph (same names)."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as err:
        raise RepositoryError(f"--outputs-fp16 needs the onnx package ({err}); pip install 'winclip-edge[triton]'") from None
    model = onnx.load(str(src))
    for out in model.graph.output:
        name, internal = out.name, f"{out.name}__fp32"
        for node in model.graph.node:
            node.output[:] = [internal if o == name else o for o in node.output]
            node.input[:] = [internal if i == name else i for i in node.input]
        model.graph.node.append(helper.make_node("Cast", [internal], [name], to=TensorProto.FLOAT16,
                                                 name=f"{name}__to_fp16"))
        out.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model)
    atomic_write_bytes(dst, model.SerializeToString())


def _find_plan(bundle: Bundle, cfg: RepositoryConfig) -> tuple[Path, dict]:
    """The plan and its build-engine sidecar; it must have been built from this bundle's visual.onnx."""
    from ..engines.cache_dir import engine_dir
    from ..engines.engine_cache import SIDECAR_SUFFIX

    onnx_sha = bundle.manifest.files[VISUAL_ONNX]
    if cfg.plan is not None:
        plans = [Path(cfg.plan)]
    else:
        folder = engine_dir(bundle)  # the bundle's, or $WINCLIP_ENGINE_DIR (where engine build wrote it)
        plans = sorted(folder.glob("*.plan")) if folder.is_dir() else []
    fitting = []
    for plan in plans:
        try:
            sidecar = json.loads(plan.with_suffix(SIDECAR_SUFFIX).read_text())
        except (OSError, ValueError):
            continue
        if sidecar.get("key", {}).get("onnx_sha256") == onnx_sha and sha256_file(plan) == sidecar.get("plan_sha256"):
            fitting.append((plan, sidecar))
    if len(fitting) != 1:
        found = ", ".join(p.name for p in plans) or "none"
        raise RepositoryError(
            f"platform tensorrt needs exactly one plan built by `winclip-edge engine build` from this bundle's "
            f"visual.onnx with its sidecar JSON ({len(fitting)} fit; plans seen: {found}); pass --plan")
    return fitting[0]


def _built_for(key: dict) -> str:
    """'NVIDIA H100 80GB HBM3 sm90 TensorRT 10.3.0 fp16': where a plan runs (its build-engine key)."""
    device = key["device"]
    cc = "".join(map(str, device["compute_capability"]))
    return f"{device['gpu']} sm{cc} TensorRT {device['trt_version']} {key['precision']}"


def write_repository(bundle: Bundle, out: str | os.PathLike, cfg: RepositoryConfig = RepositoryConfig(),
                     link_model: bool = False) -> Path:
    """Write ``out/<name>/`` (replacing an earlier one only once the new one is complete) and check it by parsing
    it back. ``link_model``: symlink visual.onnx instead of copying it (a throwaway repository of triton-serve)."""
    cfg.check()
    out = Path(out)
    final = out / cfg.name
    partial = out / f".{cfg.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / VERSION).mkdir(parents=True)
    try:
        extra: dict[str, str] = {}
        cfg_used = cfg
        if cfg.platform == "tensorrt":
            plan, sidecar = _find_plan(bundle, cfg)
            key = sidecar["key"]
            profile_max = int(key["profile"]["max"])
            if cfg.max_batch > profile_max:  # Triton refuses a max_batch_size above the plan's profile
                cfg_used = replace(cfg, max_batch=profile_max)
            extra = {"winclip_plan_built_for": _built_for(key)}
            shutil.copyfile(plan, partial / VERSION / "model.plan")
        else:
            onnx_dst = partial / VERSION / "model.onnx"
            if cfg.outputs_fp16:
                fp16_output_graph(bundle.onnx_path, onnx_dst)
            elif link_model:
                onnx_dst.symlink_to(bundle.onnx_path.resolve())
            else:
                shutil.copyfile(bundle.onnx_path, onnx_dst)
                if sha256_file(onnx_dst) != bundle.manifest.files[VISUAL_ONNX]:
                    raise RepositoryError(f"{onnx_dst}: the copy of {bundle.onnx_path} fails its sha256 check (disk full?)")
            if cfg.platform == "python":
                shutil.copyfile(PYTHON_MODEL, partial / VERSION / "model.py")
        config = model_config(bundle, cfg_used, extra)
        atomic_write_bytes(partial / CONFIG, config_text(config).encode())
        check_config(bundle, read_config(partial / CONFIG), str(partial / CONFIG))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # no half-written repository is left behind
        raise
    if final.exists():
        old = out / f".{cfg.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(final)
    return final
