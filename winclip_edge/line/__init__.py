"""The line runtime: live sources -> batcher -> Inspector -> sinks, run by ``winclip-edge serve`` (docs/line.md).

A station is data first (``spec.StationSpec``, a TOML station file: ``load_spec``) and is wired by
``build_station(spec)``; sources and sinks are kinds of a registry (``plugins.py``, ``registry.py``). The two
functions here import the station's modules only when called, so importing one part (the batcher, the spool)
stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .build import LineStation
    from .spec import StationSpec


def build_station(spec: "StationSpec") -> "LineStation":
    """See :func:`winclip_edge.line.build.build_station`."""
    from .build import build_station as build

    return build(spec)


def load_spec(path: Any) -> "StationSpec":
    """See :func:`winclip_edge.line.spec.load_spec`."""
    from .spec import load_spec as load

    return load(path)


__all__ = ["build_station", "load_spec"]
