"""Several products over one engine, reloadable while inspections run.

A station inspects more than one product with the same model: the engine (the expensive part: the
graph in memory, a device context) is made once and every product's Inspector shares it; engine
calls are serialised by one lock, whichever Inspector makes them. ``register`` and ``calibrate``
write a product's files atomically beside a running station, ``teach`` and ``rollback`` move a versioned
product's pointer (versions.py); :meth:`Catalog.reload` reads the files into a complete new Inspector first
(pinned to one version) and swaps it in with one assignment, so a caller gets the old product or the new one,
never half of each, and a damaged or inconsistent file leaves the old one in place.
"""
from __future__ import annotations

import datetime as _dt
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .bundle import Bundle
from .engines import Engine, EngineConfig, Selection, select
from .engines.serial import serialised
from .errors import WinclipError
from .inspector import Inspector
from .scoring import ScoringOptions


class UnknownProduct(WinclipError, KeyError):
    """A product that this catalog does not serve."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ProductServed(WinclipError, ValueError):
    """The product is in this catalog already."""


@dataclass(frozen=True)
class ProductInfo:
    """What a product is loaded with (answers "which memory and threshold decided this?")."""

    product: str
    mode: str  # "zero-shot" or "few-shot (K=n)"
    memory_size: int  # 0 for zero-shot
    memory_sha256: str
    threshold: float | None
    calibrated_at: str | None  # when calibrate wrote the threshold (UTC ISO 8601)
    loaded_at: str  # when this process read the product's files
    generation: int  # 1 at start, +1 per reload
    version: int | None = None  # the product version served (versions.py); None: its unversioned files


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Catalog:
    """One engine, one Inspector per product (see the module docstring)."""

    def __init__(self, bundle: str | os.PathLike | Bundle, products: Sequence[str],
                 engine: EngineConfig | Engine = EngineConfig(), options: ScoringOptions = ScoringOptions(),
                 sigma: float = 0.0, settings: Callable[[str], tuple[Any, Any]] | None = None):
        """``settings(product) -> (tiling, roi)`` for the Inspector (docs/tiling.md); default: the product's own,
        re-read on every reload."""
        if not products:
            raise ValueError("a catalog needs at least one product")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.options, self.sigma = options, sigma
        self.settings = settings or (lambda product: ("product", "product"))
        for product in products:
            self.bundle.check_product(product)  # every name first: a typo fails before the engine is made
        self.selection: Selection | None = select(self.bundle, engine) if isinstance(engine, EngineConfig) else None
        made = self.selection.create(self.bundle) if self.selection is not None else engine
        self.engine = serialised(made)  # the one lock; the Inspectors below take this engine as it is
        self._lock = threading.Lock()  # serialises reloads; readers never take it
        self._entries: dict[str, tuple[Inspector, ProductInfo]] = {}
        try:
            for product in dict.fromkeys(products):
                self._entries[product] = self._load(product, generation=1)
        except BaseException:
            self.engine.close()
            raise

    @property
    def products(self) -> list[str]:
        return list(self._entries)

    def _entry(self, product: str) -> tuple[Inspector, ProductInfo]:
        try:
            return self._entries[product]
        except KeyError:
            raise UnknownProduct(f"unknown product {product!r}; this station serves {self.products}") from None

    def get(self, product: str) -> Inspector:
        return self._entry(product)[0]

    def info(self, product: str) -> ProductInfo:
        return self._entry(product)[1]

    def _load(self, product: str, generation: int) -> tuple[Inspector, ProductInfo]:
        tiling, roi = self.settings(product)
        inspector = Inspector(self.bundle, product, engine=self.engine, options=self.options, sigma=self.sigma,
                              tiling=tiling, roi=roi)
        memory, threshold = inspector.memory, inspector.threshold
        return inspector, ProductInfo(
            product=product, mode=inspector.mode, memory_size=0 if memory is None else memory.size,
            memory_sha256="" if memory is None else memory.checksum,
            threshold=None if threshold is None else threshold.value,
            calibrated_at=None if threshold is None else threshold.created or None, loaded_at=_utc_now(),
            generation=generation, version=inspector.version)

    def reload(self, product: str) -> Inspector:
        """Read ``product``'s files again and swap the new Inspector in; raises (keeping the old one) on any
        error. Returns the new Inspector."""
        with self._lock:
            _, old = self._entry(product)
            entry = self._load(product, old.generation + 1)  # raises before anything is swapped
            self._entries = {**self._entries, product: entry}  # one assignment: readers see old or new
            return entry[0]

    def add(self, product: str) -> Inspector:
        """Serve a product that is new to this catalog (its files written since the start, e.g. by add-product);
        raises on any error, leaving the catalog as it was. Returns its Inspector."""
        with self._lock:
            if product in self._entries:
                raise ProductServed(f"product {product!r} is served already; reload it instead")
            entry = self._load(product, generation=1)
            self._entries = {**self._entries, product: entry}  # one assignment: readers see the old or the new list
            return entry[0]

    def warm_up(self, batch_size: int = 1) -> None:
        """One engine call on ``batch_size`` blank images before real traffic: first-call allocations and lazy
        kernels. Give the largest batch the station will run, so memory is at its working level from then on
        (an engine's arena grows at the first batch of a new size)."""
        h, w = self.bundle.spec.image_size
        self.engine.run(np.zeros((batch_size, h, w, 3), np.uint8))

    def close(self) -> None:
        self.engine.close()
