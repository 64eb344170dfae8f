"""Bundle I/O: the manifest, self-verifying array/JSON files, and the per-product folders.

Layout (documented in models/README.md)::

    bundle/manifest.json                  model, weights, geometry, files + sha256, format version
    bundle/visual.onnx                    the graph (contract.py)
    bundle/products/<p>/text.npz          t_normal, t_anomalous (+ prompts used)
    bundle/products/<p>/memory.npz        few-shot references (optional)
    bundle/products/<p>/threshold.json    calibrated decision threshold (optional)
    bundle/products/<p>/versions/<n>/     taught versions of the few-shot files; current.json names the live one
                                          (winclip_edge/versions.py)

Every file is written atomically (temp file in the same folder, fsync, rename): a killed process
leaves the previous file or the new one, never half of one. ``visual.onnx`` is checked against the
manifest's sha256 on load; product files carry their own sha256 over their content (they change
after export, so the manifest cannot list them) and are checked on load too.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .contract import PATCH_LAYERS, GraphSpec
from .errors import WinclipError
from .fileio import atomic_write_bytes, sha256_file
from .names import NAME_RULE, InvalidName, check_name, is_valid_name, suggest_name

log = logging.getLogger("winclip_edge.bundle")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VISUAL_ONNX = "visual.onnx"
PRODUCTS = "products"
TEXT = "text.npz"
MEMORY = "memory.npz"
THRESHOLD = "threshold.json"
TILING = "tiling.json"  # the product's tiling setting (docs/tiling.md)
TILE_MEMORY = "tile_memory.npz"  # few-shot references per tile (winclip_edge/tiles/memory.py)
_CHECKSUM_KEY = "__sha256__"
_META_KEY = "__meta__"


class BundleError(WinclipError, ValueError):
    """A bundle or one of its files is missing, damaged or made for something else."""


class MisnamedProduct(BundleError, InvalidName):
    """A product folder of the bundle whose name breaks the name rule (made before the rule, or by hand)."""


def _arrays_digest(arrays: dict[str, np.ndarray], meta_json: str) -> str:
    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"|{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> str:
    """Atomically write a self-verifying ``.npz``: arrays + JSON meta + sha256 over both. Returns the sha256."""
    meta_json = json.dumps(meta, sort_keys=True)
    checksum = _arrays_digest(arrays, meta_json)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{_META_KEY: np.array(meta_json), _CHECKSUM_KEY: np.array(checksum)})
    atomic_write_bytes(path, buffer.getvalue())
    return checksum


def load_arrays(path: str | os.PathLike, remedy: str = "re-create it") -> tuple[dict[str, np.ndarray], dict, str]:
    """Read and verify a file written by :func:`save_arrays` -> (arrays, meta, sha256); ``remedy`` ends the messages."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path} is missing")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:
        raise BundleError(f"{path} is damaged ({type(err).__name__}: {err}); {remedy}") from None
    try:
        meta_json = str(arrays.pop(_META_KEY))
        stored = str(arrays.pop(_CHECKSUM_KEY))
    except KeyError:
        raise BundleError(f"{path} has no checksum: not written by winclip-edge; {remedy}") from None
    actual = _arrays_digest(arrays, meta_json)
    if actual != stored:
        raise BundleError(f"{path} fails its sha256 check (content changed after writing); {remedy}")
    return arrays, json.loads(meta_json), stored


def json_with_checksum(obj: dict) -> dict:
    body = {k: v for k, v in obj.items() if k != "sha256"}
    return {**body, "sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}


def read_checked_json(path: str | os.PathLike, remedy: str = "re-create it") -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path} cannot be read ({err}); {remedy}") from None
    if not isinstance(obj, dict) or json_with_checksum(obj).get("sha256") != obj.get("sha256"):
        raise BundleError(f"{path} fails its sha256 check (edited or damaged); {remedy}")
    return obj


# ---------------------------------------------------------------- manifest
# JSON types of the fields the runtime computes with: a hand-edited or damaged manifest is refused by name.
_SCALAR_FIELDS = {"model": str, "weights": dict, "stride": int, "temperature": (int, float), "patch_layer": str,
                  "embed_dim": int, "width": int, "opset": int, "files": dict, "text_encoder": dict}
_LIST_FIELDS = {"image_size": (int, 2), "patch_size": (int, 2), "grid": (int, 2), "scales": (int, None),
                "mean": ((int, float), 3), "std": ((int, float), 3)}  # field -> (item type, length or None)


def _malformed_fields(d: dict) -> list[str]:
    bad = [f"{k} ({d[k]!r}, expected {getattr(kind, '__name__', 'a number')})" for k, kind in _SCALAR_FIELDS.items()
           if k in d and not isinstance(d[k], kind)]
    bad += [f"{k} ({d[k]!r}, expected a list of {f'{n} ' if n else ''}{'integers' if kind is int else 'numbers'})"
            for k, (kind, n) in _LIST_FIELDS.items()
            if k in d and not (isinstance(d[k], list) and all(isinstance(v, kind) for v in d[k])
                               and len(d[k]) == (n or len(d[k])))]
    if isinstance(d.get("weights"), dict) and not isinstance(d["weights"].get("id"), str):
        bad.append("weights.id (missing)")
    return bad


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``. Unknown fields: tolerated (kept in ``extra``) within the same format version;
    a newer format version is refused (see models/README.md)."""

    model: str  # open_clip model name (or the config file's stem)
    model_config: dict | None  # the full open_clip config when exported from a JSON file
    weights: dict  # source: pretrained (tag) | checkpoint (path, sha256) | none (seed); id: sha256 of parameters
    image_size: tuple[int, int]  # (H, W) model input
    patch_size: tuple[int, int]  # (ph, pw) pixels
    grid: tuple[int, int]  # (h, w) tokens
    scales: tuple[int, ...]  # window scales in tokens
    stride: int  # window stride in tokens
    temperature: float  # T of the two-class softmax
    patch_layer: str  # penultimate | last
    embed_dim: int  # D
    width: int  # C
    mean: tuple[float, float, float]  # RGB, applied inside the graph
    std: tuple[float, float, float]
    opset: int
    files: dict  # relative path -> sha256 (the static files: visual.onnx)
    format_version: int = FORMAT_VERSION
    created: str = ""
    versions: dict = field(default_factory=dict)  # torch, open_clip, onnx, onnxruntime used for the export
    verification: dict = field(default_factory=dict)  # max abs difference ONNX vs torch per output
    text_encoder: dict = field(default_factory=dict)  # text.onnx + tokenizer.json, their sha256 (winclip_edge/text_encoder.py)
    extra: dict = field(default_factory=dict)  # unknown fields of a same-version manifest

    @property
    def weights_id(self) -> str:
        return self.weights["id"]

    @property
    def spec(self) -> GraphSpec:
        return GraphSpec(
            image_size=self.image_size, grid=self.grid, scales=self.scales, stride=self.stride,
            embed_dim=self.embed_dim, width=self.width,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return {**d, **extra}

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object, got {type(d).__name__}; re-export the bundle")
        version = d.get("format_version")
        if not isinstance(version, int):
            raise BundleError(f"{where}: no format_version; not a winclip-edge bundle")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{where}: bundle format {version} is newer than this winclip-edge reads ({FORMAT_VERSION}); "
                "upgrade winclip-edge or re-export the bundle with this version"
            )
        if version < FORMAT_VERSION:
            raise BundleError(f"{where}: bundle format {version} is older than {FORMAT_VERSION}; re-export the bundle")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = sorted(n for n in names if n not in d and cls.__dataclass_fields__[n].default is dataclasses.MISSING
                         and cls.__dataclass_fields__[n].default_factory is dataclasses.MISSING)
        if missing:
            raise BundleError(f"{where}: fields {missing} missing; re-export the bundle")
        malformed = _malformed_fields(d)
        if malformed:
            raise BundleError(f"{where}: malformed fields {', '.join(malformed)}; re-export the bundle")
        known = {k: v for k, v in d.items() if k in names}
        for key in ("image_size", "patch_size", "grid", "scales", "mean", "std"):
            known[key] = tuple(known[key])
        if known["patch_layer"] not in PATCH_LAYERS:
            raise BundleError(f"{where}: patch_layer {known['patch_layer']!r} unknown (expected one of {PATCH_LAYERS})")
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


# ---------------------------------------------------------------- the bundle
class Bundle:
    """A verified bundle on disk. Loading checks the manifest and the sha256 of every listed file."""

    def __init__(self, root: str | os.PathLike, verify: bool = True):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{self.root} is not a bundle (no {MANIFEST}); create one with `winclip-edge export`")
        try:
            data = json.loads(manifest_path.read_text())
        except ValueError as err:
            raise BundleError(f"{manifest_path} is not valid JSON ({err}); re-export the bundle") from None
        self.manifest = Manifest.from_dict(data, where=str(manifest_path))
        # product -> the folder its few-shot files (memory, tile memory, tiling, threshold) are read from and written
        # to, instead of the live one: a version being built or a version pinned for one load (winclip_edge/versions.py)
        self.product_folders: dict[str, Path] = {}
        if verify:
            self.verify_files()
        misnamed = self.misnamed_products()
        if misnamed:  # served by no command until renamed: say so, never silently (one line for all of them)
            log.warning("%s", misnamed_message(self, misnamed))

    def verify_files(self) -> None:
        for rel, expected in self.manifest.files.items():
            path = self.root / rel
            if not path.is_file():
                raise BundleError(f"{path} is missing; copy the whole bundle folder again or re-export it")
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(
                    f"{path} fails its sha256 check (expected {expected[:12]}..., got {actual[:12]}...): "
                    "damaged or partly copied; copy the bundle again or re-export it"
                )

    @property
    def spec(self) -> GraphSpec:
        return self.manifest.spec

    @property
    def onnx_path(self) -> Path:
        return self.root / VISUAL_ONNX

    def product_dir(self, product: str) -> Path:
        """``products/<product>``; the name is checked first (names.py: the one rule, the one message). A folder on
        disk whose name breaks the rule is refused with the rename command that makes it usable."""
        if not is_valid_name(product):
            if product in self.misnamed_products():
                raise MisnamedProduct(misnamed_message(self, product))
            check_name(product)
        return self.root / PRODUCTS / product

    def with_product_folder(self, product: str, folder: Path) -> "Bundle":
        """The same bundle (nothing re-read) with ``product``'s few-shot files in ``folder`` (see versions.py)."""
        view = copy.copy(self)
        view.product_folders = {**self.product_folders, product: Path(folder)}
        return view

    def _product_folders(self) -> list[str]:
        folder = self.root / PRODUCTS
        return sorted(p.name for p in folder.iterdir() if (p / TEXT).is_file()) if folder.is_dir() else []

    def products(self) -> list[str]:
        """The products: folders with a text.npz whose name follows the rule (see :meth:`misnamed_products`)."""
        return [p for p in self._product_folders() if is_valid_name(p)]

    def misnamed_products(self) -> list[str]:
        """Product folders whose name breaks the rule: no command serves them until `winclip-edge product rename`."""
        return [p for p in self._product_folders() if not is_valid_name(p) and not p.startswith(".")]

    def check_product(self, product: str) -> None:
        if not (self.product_dir(product) / TEXT).is_file():
            known = ", ".join(self.products()) or "none"
            raise BundleError(
                f"product {product!r} is not in bundle {self.root} (products: {known}); "
                f"add it with `winclip-edge product add --bundle {self.root} {product}`"
            )

    def check_weights(self, meta: dict, path: Path, remedy: str = "re-create it for this bundle") -> None:
        if meta.get("weights_id") != self.manifest.weights_id:
            raise BundleError(
                f"{path} was made with other model weights (id {str(meta.get('weights_id'))[:12]}, "
                f"bundle {self.manifest.weights_id[:12]}); {remedy}"
            )


def rename_command(bundle: "Bundle", old: str, new: str | None = None) -> str:
    """The command that renames product folder ``old`` (to ``new``, default a valid name made from it)."""
    if new is None:
        taken = {p.casefold() for p in bundle.products()}
        new = base = suggest_name(old)
        n = 1
        while new.casefold() in taken:
            n += 1
            new = f"{base[:60]}-{n}"
    return f"winclip-edge product rename --bundle {shlex.quote(str(bundle.root))} {shlex.quote(old)} {new}"


def misnamed_message(bundle: "Bundle", names: "str | list[str]") -> str:
    """What to do about product folders whose names break the rule: the rename command of the first one."""
    names = [names] if isinstance(names, str) else list(names)
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    folders = "product folder" if len(names) == 1 else f"{len(names)} product folders"
    verb = "breaks the name rule and is not served" if len(names) == 1 else "break the name rule and are not served"
    return (f"{folders} {shown} in {bundle.root / PRODUCTS} {verb} (product names: "
            f"{NAME_RULE}); rename {'it' if len(names) == 1 else 'each'} with `{rename_command(bundle, names[0])}`")
