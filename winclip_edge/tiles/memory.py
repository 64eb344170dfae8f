"""Few-shot memory of tiles (docs/tiling.md): every reference's tile embeddings, keyed by tile position.

``position`` matching compares a tile with the same position of the references (fixtured parts: the
cheap form of a tiled ensemble); ``pooled`` matching compares it with any tile of any reference
(textures, unfixtured parts). One file serves both: rows are tiles, with their reference and position.
Stored as ``tile_memory.npz`` beside ``memory.npz`` (the whole-frame references) and tied to it: the
references must be the same files in the same order.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import numpy as np

from ..bundle import TILE_MEMORY, Bundle, BundleError, load_arrays, save_arrays
from ..contract import IMAGE_EMBEDDING, PATCH_TOKENS, window_output_name
from ..versions import files_dir, write_dir

POOLED = None  # rows(POOLED): every tile of every reference


@dataclass
class TileMemory:
    """Rows = tiles of the references. ``grids[r]`` and ``frame_sizes[r]`` describe reference ``r``'s layout."""

    image_embeddings: np.ndarray  # [T, D]
    windows: dict[int, np.ndarray]  # scale -> [T, W_k, D]
    patch_tokens: np.ndarray  # [T, h*w, C]
    reference: np.ndarray  # [T] int: index of the reference (the order of Memory.sources)
    position: np.ndarray  # [T] int: row-major tile index in that reference's grid
    grids: list[tuple[int, int]]  # per reference: (rows, cols)
    frame_sizes: list[tuple[int, int]]  # per reference: (H, W)
    tile: tuple[int, int]  # tile (height, width) in source pixels
    overlap: float
    source_sha256: list[str]  # per reference: the file's sha256 (ties this file to memory.npz)
    checksum: str = ""
    _rows: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.grids)

    @classmethod
    def from_outputs(cls, outputs: dict[str, np.ndarray], scales, reference, position, grids, frame_sizes, tile,
                     overlap, source_sha256) -> "TileMemory":
        return cls(image_embeddings=outputs[IMAGE_EMBEDDING], windows={k: outputs[window_output_name(k)] for k in scales},
                   patch_tokens=outputs[PATCH_TOKENS], reference=np.asarray(reference, np.int64),
                   position=np.asarray(position, np.int64), grids=[tuple(g) for g in grids],
                   frame_sizes=[tuple(s) for s in frame_sizes], tile=tuple(tile), overlap=float(overlap),
                   source_sha256=list(source_sha256))

    def outputs_of(self, reference: int, positions) -> dict[str, np.ndarray]:
        """Engine outputs of reference ``reference``'s tiles at ``positions`` (in that order)."""
        index = {int(p): i for i, p in enumerate(self.position) if self.reference[i] == reference}
        rows = np.array([index[int(p)] for p in positions], dtype=np.intp)
        out = {IMAGE_EMBEDDING: self.image_embeddings[rows], PATCH_TOKENS: self.patch_tokens[rows]}
        out.update({window_output_name(k): v[rows] for k, v in self.windows.items()})
        return out

    def rows(self, position: int | None) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Flat matching memory (scale -> ``[M_k, D]``, patches ``[M, C]``) of one position, or of all tiles
        (``POOLED``); cached, as every frame asks for the same ones."""
        if position not in self._rows:
            keep = np.ones(len(self.position), bool) if position is POOLED else self.position == position
            if not keep.any():
                raise BundleError(f"the tile memory has no reference tile at position {position}")
            windows = {k: v[keep].reshape(-1, v.shape[-1]) for k, v in self.windows.items()}
            self._rows[position] = (windows, self.patch_tokens[keep].reshape(-1, self.patch_tokens.shape[-1]))
        return self._rows[position]

    def without(self, reference: int) -> "TileMemory":
        """The memory without one reference (leave-one-out calibration)."""
        keep = self.reference != reference
        others = [r for r in range(self.size) if r != reference]
        renumber = np.full(self.size, -1, np.int64)
        renumber[others] = np.arange(len(others))
        return TileMemory(self.image_embeddings[keep], {k: v[keep] for k, v in self.windows.items()},
                          self.patch_tokens[keep], renumber[self.reference[keep]], self.position[keep],
                          [self.grids[r] for r in others], [self.frame_sizes[r] for r in others], self.tile,
                          self.overlap, [self.source_sha256[r] for r in others])

    def merged(self, other: "TileMemory") -> "TileMemory":
        """``other``'s references appended (``register --append``); both must share the tiling."""
        if (self.tile, self.overlap, set(self.windows)) != (other.tile, other.overlap, set(other.windows)):
            raise BundleError(f"cannot append: the stored tile memory has tile {self.tile}, overlap {self.overlap}; "
                              f"this run {other.tile}, {other.overlap}")
        return TileMemory(np.concatenate([self.image_embeddings, other.image_embeddings]),
                          {k: np.concatenate([v, other.windows[k]]) for k, v in self.windows.items()},
                          np.concatenate([self.patch_tokens, other.patch_tokens]),
                          np.concatenate([self.reference, other.reference + self.size]),
                          np.concatenate([self.position, other.position]), self.grids + other.grids,
                          self.frame_sizes + other.frame_sizes, self.tile, self.overlap,
                          self.source_sha256 + other.source_sha256)

    def position_grid(self) -> tuple[int, int] | None:
        """The references' common tile grid, or None when they differ (then only pooled matching applies)."""
        return self.grids[0] if len(set(self.grids)) == 1 else None


def _remedy(bundle: Bundle, product: str) -> str:
    return f"re-create it with `winclip-edge register --bundle {bundle.root} --product {product} --tile ... IMAGES...`"


def save_tile_memory(bundle: Bundle, product: str, memory: TileMemory) -> str:
    arrays = {f"windows_k{k}": v.astype(np.float32) for k, v in memory.windows.items()}
    arrays.update(patch_tokens=memory.patch_tokens.astype(np.float32),
                  image_embeddings=memory.image_embeddings.astype(np.float32),
                  reference=memory.reference.astype(np.int64), position=memory.position.astype(np.int64))
    meta = {"weights_id": bundle.manifest.weights_id, "scales": sorted(memory.windows), "stride": bundle.manifest.stride,
            "patch_layer": bundle.manifest.patch_layer, "grids": [list(g) for g in memory.grids],
            "frame_sizes": [list(s) for s in memory.frame_sizes], "tile": list(memory.tile), "overlap": memory.overlap,
            "source_sha256": memory.source_sha256,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    memory.checksum = save_arrays(write_dir(bundle, product) / TILE_MEMORY, arrays, meta)
    return memory.checksum


def load_tile_memory(bundle: Bundle, product: str, source_sha256: list[str]) -> TileMemory | None:
    """The product's tile memory, or None when there is none. Refused when made for other weights or geometry,
    or for other references than ``source_sha256`` (those of memory.npz)."""
    path = files_dir(bundle, product) / TILE_MEMORY
    if not path.is_file():
        return None
    arrays, meta, checksum = load_arrays(path, _remedy(bundle, product))
    bundle.check_weights(meta, path, _remedy(bundle, product))
    m, shapes = bundle.manifest, bundle.spec.output_shapes()
    if tuple(meta["scales"]) != tuple(sorted(m.scales)) or meta["stride"] != m.stride or meta["patch_layer"] != m.patch_layer:
        raise BundleError(f"{path} was registered for other scales, stride or patch layer; {_remedy(bundle, product)}")
    if meta["source_sha256"] != list(source_sha256):
        raise BundleError(f"{path} belongs to other references than memory.npz (registered separately); "
                          f"{_remedy(bundle, product)}")
    windows = {k: arrays[f"windows_k{k}"] for k in m.scales}
    t = arrays["patch_tokens"].shape[0]
    checks = [(f"windows_k{k}", windows[k], shapes[window_output_name(k)][1:]) for k in m.scales]
    checks += [("patch_tokens", arrays["patch_tokens"], shapes[PATCH_TOKENS][1:]),
               ("image_embeddings", arrays["image_embeddings"], (m.embed_dim,))]
    for name, a, tail in checks:
        if a.shape != (t, *tail):
            raise BundleError(f"{path}: {name} has shape {a.shape}, expected ({t}, *{tail}); {_remedy(bundle, product)}")
    n_refs = len(meta["grids"])
    if arrays["reference"].shape != (t,) or arrays["position"].shape != (t,) or \
            (t and not 0 <= arrays["reference"].min() <= arrays["reference"].max() < n_refs):
        raise BundleError(f"{path}: tile index arrays do not match; {_remedy(bundle, product)}")
    return TileMemory(arrays["image_embeddings"], windows, arrays["patch_tokens"], arrays["reference"],
                      arrays["position"], [tuple(g) for g in meta["grids"]], [tuple(s) for s in meta["frame_sizes"]],
                      tuple(meta["tile"]), float(meta["overlap"]), list(meta["source_sha256"]), checksum)
