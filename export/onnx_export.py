"""ONNX export of the windowed visual module, verification against torch, and bundle writing.

The graph contract (names, shapes, dynamic batch axis) comes from winclip_edge/contract.py. The export
is verified: the ONNX graph in ONNX Runtime (CPU) and the torch module see the same random batch,
and a bundle whose outputs differ by more than the tolerance is refused and not left behind.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from winclip_edge.bundle import FORMAT_VERSION, MANIFEST, VISUAL_ONNX, Bundle, Manifest
from winclip_edge.contract import INPUT_NAME, output_names
from winclip_edge.errors import WinclipError
from winclip_edge.fileio import DIR_MODE, atomic_write_json, sha256_file
from winclip_edge.preprocess import resize_to_model
from winclip_edge.names import check_new_name
from winclip_edge.products import save_text
from winclip_edge.prompts import PromptSpec, object_name_for
from winclip_edge.scoring import DEFAULT_TEMPERATURE

from .models import DEFAULT_MODEL, DEFAULT_PRETRAINED, LoadedModel, load_model
from .text import text_prototypes
from .text_encoder import write_text_encoder
from .windowed_clip import WindowedVisual

DEFAULT_OPSET = 17
FP32_TOLERANCE = 1e-4  # max abs difference ONNX Runtime vs torch, per output (unit vectors)
EXPORT_BATCH = 2  # dummy batch for tracing (the batch axis is dynamic)
VERIFY_BATCH = 3  # a different batch size than the trace, so the dynamic axis is exercised


class ExportVerificationError(WinclipError, RuntimeError):
    """The exported graph does not agree with the torch module."""


class BundleExistsError(WinclipError, FileExistsError):
    """The output folder exists and --force was not given."""


@dataclass
class ExportOptions:
    model: str = DEFAULT_MODEL  # open_clip name or config JSON path
    pretrained: str = DEFAULT_PRETRAINED  # tag | checkpoint path | none
    seed: int = 0  # random init seed when pretrained == none
    products: Sequence[str] = ()  # products whose text prototypes go into the bundle
    scales: Sequence[int] = (2, 3)  # window scales (tokens)
    stride: int = 1  # window stride (tokens)
    patch_layer: str = "penultimate"  # penultimate | last
    temperature: float = DEFAULT_TEMPERATURE
    opset: int = DEFAULT_OPSET
    tolerance: float = FP32_TOLERANCE
    cls_only_last_block: bool = True  # exact speed-up (see windowed_clip.CLSOnlyLastBlock)
    force: bool = False  # replace an existing bundle
    object_names: dict = field(default_factory=dict)  # product -> object name override
    with_text_encoder: bool = False  # also text.onnx + tokenizer.json: add-product without torch (text_encoder.py)

    def __post_init__(self) -> None:
        """Product names follow the one rule (winclip_edge/names.py), refused before anything is loaded."""
        for i, product in enumerate(self.products):
            check_new_name(product, self.products[:i])


def _log(message: str) -> None:
    print(f"[export] {message}", file=sys.stderr, flush=True)


def build_module(loaded: LoadedModel, options: ExportOptions) -> WindowedVisual:
    return WindowedVisual(
        loaded.model.visual, mean=loaded.mean, std=loaded.std, scales=options.scales, stride=options.stride,
        patch_layer=options.patch_layer, cls_only_last_block=options.cls_only_last_block,
    ).eval()


def export_onnx(module: WindowedVisual, path: Path, opset: int = DEFAULT_OPSET) -> None:
    spec = module.spec
    dummy = torch.randint(0, 256, (EXPORT_BATCH, *spec.image_size, 3), dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            module, (dummy,), str(path), dynamo=False, input_names=[INPUT_NAME],
            output_names=output_names(spec.scales), dynamic_axes=spec.dynamic_axes(), opset_version=opset,
            do_constant_folding=True,
        )


def verify_onnx(module: WindowedVisual, path: Path, images: np.ndarray | None = None, seed: int = 0) -> dict[str, float]:
    """Max abs difference per output between ONNX Runtime (CPU) and torch on the same batch."""
    import onnxruntime as ort

    spec = module.spec
    if images is None:  # random frames of another size, through the runtime's own pre-processing
        h, w = spec.image_size
        frames = np.random.default_rng(seed).integers(0, 256, (VERIFY_BATCH, h * 3 // 2, w * 3 // 2, 3), dtype=np.uint8)
        images = np.stack([resize_to_model(f, spec.image_size) for f in frames])
    with torch.no_grad():
        expected = {k: v.numpy() for k, v in module(torch.from_numpy(images)).items()}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = output_names(spec.scales)
    actual = dict(zip(names, session.run(names, {INPUT_NAME: images})))
    return {name: float(np.abs(actual[name] - expected[name]).max()) for name in names}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import open_clip

    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}


_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # <linux/fs.h>: renameat2 swaps the two paths atomically


def _exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux >= 3.15, glibc >= 2.28); False where the OS or the
    file system cannot, so the caller falls back."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _replace_dir(new: Path, out: Path) -> None:
    """Move the finished bundle into place. An existing bundle is swapped with the new one atomically where Linux
    allows (``out`` always holds a complete bundle), else by two renames: a kill between them leaves ``out``
    missing and the old bundle in ``.<out>.old-*`` (docs/reliability.md)."""
    if out.exists() and _exchange_paths(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now the old bundle
    elif out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


def export_bundle(out: str | Path, options: ExportOptions, show_progress: bool = True) -> Bundle:
    """Export, verify and write a bundle to ``out`` (atomically: a failure leaves nothing behind)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not options.force:
        raise BundleExistsError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    t0 = time.perf_counter()
    _log(f"loading {options.model} (weights: {options.pretrained})")
    loaded = load_model(options.model, options.pretrained, options.seed)
    module = build_module(loaded, options)
    spec = module.spec
    _log(f"grid {spec.grid[0]}x{spec.grid[1]}, scales {list(spec.scales)} stride {spec.stride}, "
         f"windows {[v[1] for k, v in spec.output_shapes().items() if k.startswith('window')]}, "
         f"D={spec.embed_dim}, C={spec.width}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(DIR_MODE)  # mkdtemp makes it private; the bundle is read by other users
    try:
        onnx_path = tmp / VISUAL_ONNX
        _log("exporting ONNX graph ...")
        t_export = time.perf_counter()
        export_onnx(module, onnx_path, options.opset)
        _log(f"exported in {time.perf_counter() - t_export:.1f} s ({onnx_path.stat().st_size / 2**20:.0f} MiB); verifying ...")
        diffs = verify_onnx(module, onnx_path)
        worst = max(diffs.values())
        _log("max abs difference ONNX Runtime vs torch: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
        if not worst <= options.tolerance:
            raise ExportVerificationError(
                f"ONNX output differs from torch by {worst:.3e} > tolerance {options.tolerance:.1e} ({diffs}); "
                "no bundle was written"
            )
        manifest = Manifest(
            model=loaded.model_name, model_config=loaded.model_config, weights=loaded.weights,
            image_size=spec.image_size, patch_size=tuple(int(p) for p in np.broadcast_to(loaded.model.visual.patch_size, 2)),
            grid=spec.grid, scales=spec.scales, stride=spec.stride, temperature=options.temperature,
            patch_layer=options.patch_layer, embed_dim=spec.embed_dim, width=spec.width, mean=loaded.mean,
            std=loaded.std, opset=options.opset, files={VISUAL_ONNX: sha256_file(onnx_path)},
            format_version=FORMAT_VERSION, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            versions=_versions(),
            verification={"max_abs_diff": diffs, "tolerance": options.tolerance, "batch": VERIFY_BATCH},
            text_encoder=write_text_encoder(tmp, loaded, options.opset) if options.with_text_encoder else {},
        )
        atomic_write_json(tmp / MANIFEST, manifest.to_dict())
        bundle = Bundle(tmp, verify=False)
        for product in options.products:
            add_product(bundle, product, loaded, options.object_names.get(product), show_progress=show_progress)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"bundle written to {out} in {time.perf_counter() - t0:.1f} s")
    return Bundle(out)


def add_product(bundle: Bundle, product: str, loaded: LoadedModel, object_name: str | None = None,
                spec: PromptSpec | None = None, show_progress: bool = True) -> None:
    """Encode the product's prompts with the bundle's text tower and write ``products/<p>/text.npz``."""
    if loaded.weights["id"] != bundle.manifest.weights_id:
        raise ValueError("the loaded model's weights differ from the bundle's; cannot add a product")
    check_new_name(product, bundle.products())
    spec = spec or PromptSpec(object_name=object_name or object_name_for(product))
    save_text(bundle, product, text_prototypes(loaded.model, loaded.tokenizer, spec, show_progress))
