"""Per-product files of a bundle: text prototypes, few-shot memory, decision threshold; renaming a product."""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .bundle import (
    MEMORY,
    PRODUCTS,
    TEXT,
    THRESHOLD,
    TILING,
    Bundle,
    BundleError,
    json_with_checksum,
    load_arrays,
    read_checked_json,
    save_arrays,
)
from .contract import PATCH_TOKENS, window_output_name
from .fileio import atomic_write_json, fsync_dir
from .names import check_new_name, is_valid_name
from .tiles.tiling import TilingConfig
from .versions import LOCK_FILE, files_dir, records_naming, rename_records, write_dir


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- text prototypes
@dataclass(frozen=True)
class TextPrototypes:
    t_normal: np.ndarray  # [D] float32, L2-normalised
    t_anomalous: np.ndarray  # [D] float32, L2-normalised
    normal_prompts: tuple[str, ...]
    anomalous_prompts: tuple[str, ...]
    prompt_spec: dict  # PromptSpec as a dict: object_name, style, extra states/templates
    encoder: dict = field(default_factory=dict)  # what encoded the prompts: source (torch | text.onnx), precision


def save_text(bundle: Bundle, product: str, text: TextPrototypes) -> None:
    arrays = {
        "t_normal": text.t_normal.astype(np.float32),
        "t_anomalous": text.t_anomalous.astype(np.float32),
        "normal_prompts": np.array(text.normal_prompts, dtype=np.str_),
        "anomalous_prompts": np.array(text.anomalous_prompts, dtype=np.str_),
    }
    meta = {"weights_id": bundle.manifest.weights_id, "prompt_spec": text.prompt_spec, "encoder": text.encoder,
            "created": _now()}
    save_arrays(bundle.product_dir(product) / TEXT, arrays, meta)


def load_text(bundle: Bundle, product: str) -> TextPrototypes:
    bundle.check_product(product)
    path = bundle.product_dir(product) / TEXT
    remedy = f"re-create it with `winclip-edge product add --bundle {bundle.root} --force {product}`"
    arrays, meta, _ = load_arrays(path, remedy)
    bundle.check_weights(meta, path, remedy)
    d = bundle.manifest.embed_dim
    for key in ("t_normal", "t_anomalous"):
        if arrays[key].shape != (d,):
            raise BundleError(f"{path}: {key} has shape {arrays[key].shape}, the bundle's embedding is ({d},); "
                              "re-create it with `winclip-edge product add`")
    return TextPrototypes(
        t_normal=arrays["t_normal"], t_anomalous=arrays["t_anomalous"],
        normal_prompts=tuple(arrays["normal_prompts"].tolist()),
        anomalous_prompts=tuple(arrays["anomalous_prompts"].tolist()),
        prompt_spec=meta["prompt_spec"],
        encoder=meta.get("encoder", {}),  # absent in files written before it was recorded
    )


# ---------------------------------------------------------------- few-shot memory
def window_key(k: int) -> str:
    return f"windows_k{k}"


@dataclass
class Memory:
    """Embeddings of K normal reference images (docs/method.md §7.1), kept per reference so that
    calibration can leave one out and ``--append`` can add."""

    image_embeddings: np.ndarray  # [R, D] float32 (lets calibration score references leave-one-out)
    windows: dict[int, np.ndarray]  # scale -> [R, W_k, D] float32
    patch_tokens: np.ndarray  # [R, h*w, C] float32
    sources: list[str]  # where each reference came from (path)
    source_sha256: list[str]  # sha256 of each reference file ("" for in-memory arrays)
    checksum: str = ""  # the file's sha256 once saved/loaded (thresholds record it)
    tiles: Any = None  # TileMemory of the same references when registered with tiling (winclip_edge/tiles/memory.py)

    @property
    def size(self) -> int:
        return int(self.patch_tokens.shape[0])

    def without(self, index: int) -> "Memory":
        keep = [i for i in range(self.size) if i != index]
        return Memory(
            image_embeddings=self.image_embeddings[keep],
            windows={k: v[keep] for k, v in self.windows.items()}, patch_tokens=self.patch_tokens[keep],
            sources=[self.sources[i] for i in keep], source_sha256=[self.source_sha256[i] for i in keep],
        )

    def merged(self, other: "Memory") -> "Memory":
        if set(self.windows) != set(other.windows):
            raise BundleError(f"cannot append: scales {sorted(other.windows)} differ from {sorted(self.windows)}")
        return Memory(
            image_embeddings=np.concatenate([self.image_embeddings, other.image_embeddings]),
            windows={k: np.concatenate([v, other.windows[k]]) for k, v in self.windows.items()},
            patch_tokens=np.concatenate([self.patch_tokens, other.patch_tokens]),
            sources=self.sources + other.sources, source_sha256=self.source_sha256 + other.source_sha256,
        )


def save_memory(bundle: Bundle, product: str, memory: Memory) -> str:
    arrays = {window_key(k): v.astype(np.float32) for k, v in memory.windows.items()}
    arrays["patch_tokens"] = memory.patch_tokens.astype(np.float32)
    arrays["image_embeddings"] = memory.image_embeddings.astype(np.float32)
    meta = {
        "weights_id": bundle.manifest.weights_id, "scales": sorted(memory.windows), "stride": bundle.manifest.stride,
        "patch_layer": bundle.manifest.patch_layer, "sources": memory.sources,
        "source_sha256": memory.source_sha256, "created": _now(),
    }
    memory.checksum = save_arrays(write_dir(bundle, product) / MEMORY, arrays, meta)
    return memory.checksum


def load_memory(bundle: Bundle, product: str) -> Memory | None:
    """The product's memory, or None when it has not been registered."""
    bundle.check_product(product)
    path = files_dir(bundle, product) / MEMORY
    if not path.is_file():
        return None
    remedy = f"re-create it with `winclip-edge register --bundle {bundle.root} --product {product} IMAGES...`"
    arrays, meta, checksum = load_arrays(path, remedy)
    bundle.check_weights(meta, path, remedy)
    m, spec = bundle.manifest, bundle.spec
    if tuple(meta["scales"]) != tuple(sorted(m.scales)) or meta["stride"] != m.stride or meta["patch_layer"] != m.patch_layer:
        raise BundleError(f"{path} was registered for scales {meta['scales']}, stride {meta['stride']}, "
                          f"patch layer {meta['patch_layer']}; re-run `winclip-edge register`")
    shapes = spec.output_shapes()
    windows = {}
    for k in m.scales:
        a = arrays[window_key(k)]
        if a.ndim != 3 or a.shape[1:] != shapes[window_output_name(k)][1:]:
            raise BundleError(f"{path}: {window_key(k)} has shape {a.shape}, expected [R, *{shapes[window_output_name(k)][1:]}]; "
                              "re-run `winclip-edge register`")
        windows[k] = a
    patches = arrays["patch_tokens"]
    if patches.ndim != 3 or patches.shape[1:] != shapes[PATCH_TOKENS][1:]:
        raise BundleError(f"{path}: patch_tokens has shape {patches.shape}, expected [R, *{shapes['patch_tokens'][1:]}]; "
                          "re-run `winclip-edge register`")
    images = arrays["image_embeddings"]
    if images.shape != (patches.shape[0], m.embed_dim):
        raise BundleError(f"{path}: image_embeddings has shape {images.shape}, expected ({patches.shape[0]}, {m.embed_dim}); "
                          "re-run `winclip-edge register`")
    return Memory(image_embeddings=images, windows=windows, patch_tokens=patches, sources=list(meta["sources"]),
                  source_sha256=list(meta["source_sha256"]), checksum=checksum)


# ---------------------------------------------------------------- threshold
@dataclass(frozen=True)
class Threshold:
    """An image is anomalous when its score (in [0, 1]) is strictly above ``value``."""

    value: float
    false_alarm_rate: float  # fraction of the calibration images above the threshold
    target_false_alarm_rate: float  # what was asked for
    n_images: int
    mode: str  # "few-shot" (with memory) or "zero-shot"
    memory_sha256: str  # the memory it was calibrated with ("" for zero-shot)
    scoring: dict  # ScoringOptions.decision_record() of the calibration: T, scales, image scale, mean
    scores: list[float] = field(default_factory=list)  # the calibration scores
    sources: list[str] = field(default_factory=list)
    leave_one_out: bool = False
    # Of the file it was read from (empty before it is saved): its sha256 field and when calibrate wrote it. They tell
    # which threshold decided without reading the file again (a versioned product's file is not beside text.npz).
    checksum: str = field(default="", compare=False)
    created: str = field(default="", compare=False)


_RECORDED = tuple(f for f in Threshold.__dataclass_fields__ if f not in ("checksum", "created"))  # the file's fields


def save_threshold(bundle: Bundle, product: str, threshold: Threshold) -> None:
    body = {**{k: v for k, v in asdict(threshold).items() if k in _RECORDED}, "weights_id": bundle.manifest.weights_id,
            "created": _now()}
    atomic_write_json(write_dir(bundle, product) / THRESHOLD, json_with_checksum(body))


def load_threshold(bundle: Bundle, product: str, memory: Memory | None, scoring: dict | None = None) -> Threshold | None:
    """The calibrated threshold, or None. Refused when it was calibrated in the other mode (zero-/few-shot), with
    another memory, or (when ``scoring`` is given) with other scoring options: its decisions would not hold."""
    path = files_dir(bundle, product) / THRESHOLD
    if not path.is_file():
        return None
    calibrate = f"`winclip-edge calibrate --bundle {bundle.root} --product {product}`"
    obj = read_checked_json(path, f"re-create it with {calibrate}")
    bundle.check_weights(obj, path, f"re-create it with {calibrate}")
    missing = sorted(set(_RECORDED) - set(obj))
    if missing:
        raise BundleError(f"{path} lacks {missing} (written by an older winclip-edge); re-run {calibrate}")
    mode = "few-shot" if memory is not None else "zero-shot"
    if obj["mode"] != mode:
        raise BundleError(f"{path} was calibrated {obj['mode']}, this run is {mode}; re-run {calibrate} "
                          f"{'with' if mode == 'zero-shot' else 'without'} --zero-shot")
    if mode == "few-shot" and obj["memory_sha256"] != memory.checksum:
        raise BundleError(f"{path} was calibrated with another few-shot memory (the references changed since); "
                          f"re-run {calibrate}")
    if scoring is not None and obj["scoring"] != scoring:
        differ = {k: (obj["scoring"].get(k), scoring.get(k)) for k in {**obj["scoring"], **scoring}
                  if obj["scoring"].get(k) != scoring.get(k)}
        raise BundleError(f"{path} was calibrated with other scoring options (calibrated, now: {differ}); "
                          f"use the same options or re-run {calibrate} with these")
    return Threshold(**{k: obj[k] for k in _RECORDED}, checksum=obj["sha256"], created=obj.get("created", ""))


# ---------------------------------------------------------------- tiling setting
def save_tiling(bundle: Bundle, product: str, tiling: TilingConfig) -> None:
    """Record the tiling the product's tile memory / threshold were made with; runs use it unless flags override."""
    body = {**tiling.to_dict(), "weights_id": bundle.manifest.weights_id, "created": _now()}
    atomic_write_json(write_dir(bundle, product) / TILING, json_with_checksum(body))


def load_tiling(bundle: Bundle, product: str) -> TilingConfig | None:
    """The product's tiling setting, or None (whole-frame inspection)."""
    bundle.check_product(product)
    path = files_dir(bundle, product) / TILING
    if not path.is_file():
        return None
    obj = read_checked_json(path, f"record it again with `winclip-edge register --bundle {bundle.root} --product "
                                  f"{product} --tile ...`")
    return TilingConfig.from_dict(obj)


# ---------------------------------------------------------------- renaming
class RenameError(BundleError):
    """A product that cannot be renamed as asked (nothing was changed)."""


@dataclass(frozen=True)
class Renamed:
    old: str
    new: str
    records: int  # version records rewritten with the new name (0 for an unversioned product)
    resumed: bool  # an earlier rename killed half-way was finished


def rename_product(bundle: Bundle, old: str, new: str) -> Renamed:
    """Rename product folder ``old`` (any name, e.g. one made before the name rule) to ``new`` (the rule; not an
    existing product, not one but for case): one atomic rename of the folder, under the product's versions lock
    (so no teach or rollback runs meanwhile), then the version records, which name their product, are written
    again with the new name (versions.rename_records). The memory, threshold, tiling and ROI files do not name
    their product and stay as they are. Running it again after a kill finishes the records."""
    if not (isinstance(old, str) and old and "/" not in old and "\x00" not in old and old not in (".", "..")):
        raise RenameError(f"{old!r} is not a product folder name")
    root = bundle.root / PRODUCTS
    src, dst = root / old, root / new
    if not (src / TEXT).is_file():
        if is_valid_name(new) and dst.is_dir() and records_naming(bundle, new, old):  # killed between the rename and the records
            return Renamed(old, new, _rewrite_records(bundle, dst, new, old), True)
        known = ", ".join(bundle.products() + bundle.misnamed_products()) or "none"
        raise RenameError(f"product {old!r} is not in bundle {bundle.root} (products: {known})")
    check_new_name(new, [p for p in bundle.products() if p != old])
    if os.path.lexists(dst):
        raise RenameError(f"{dst} exists already: choose another name (or remove that folder first)")
    import fcntl

    fd = os.open(src / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RenameError(f"product {old!r} is being taught or rolled back right now; rename it afterwards") from None
        os.rename(src, dst)  # the lock file moves with the folder; the lock stays held
        fsync_dir(root)
        records = rename_records(bundle, new, old)
    finally:
        os.close(fd)
    return Renamed(old, new, records, False)


def _rewrite_records(bundle: Bundle, folder, new: str, old: str) -> int:
    import fcntl

    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return rename_records(bundle, new, old)
    finally:
        os.close(fd)
