"""The kinds of sources and sinks a station can use: the built-ins (sources.py, sinks.py) and those other
packages register as entry points (group ``winclip_edge.sources`` / ``winclip_edge.sinks``; the value is a
:class:`~winclip_edge.line.plugins.SourcePlugin` / ``SinkPlugin`` object).

The entry points are read once per ``sys.path`` (a changed path, e.g. a folder of plugins added, reads them
again); a plugin that cannot load, or that takes a kind or prefix already taken, is one clear error naming it,
not a silent fallback to another kind.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from importlib import metadata
from typing import Iterable

from ..errors import WinclipError
from .genicam import GENICAM_SOURCE
from .modbus import MODBUS_SINK
from .plugins import SinkPlugin, SourcePlugin
from .sinks import BUILTIN_SINKS
from .sources import BUILTIN_SOURCES as _OPENCV_AND_FOLDER

# sources.py's kinds, then the GenICam cameras (genicam.py builds on sources.py, so it cannot be listed there)
BUILTIN_SOURCES = (*_OPENCV_AND_FOLDER, GENICAM_SOURCE)

SOURCE_GROUP = "winclip_edge.sources"
SINK_GROUP = "winclip_edge.sinks"


class PluginError(WinclipError, ValueError):
    """A source or sink kind that is unknown, cannot load, clashes with another, or misses a library."""


def _entry_points(group: str) -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=group)


_CACHE: dict[str, tuple[tuple[str, ...], list]] = {}  # group -> (the sys.path it was read with, its plugins)


def _loaded(group: str, kind_of: type) -> list:
    path = tuple(sys.path)
    cached = _CACHE.get(group)
    if cached is not None and cached[0] == path:
        return cached[1]
    plugins = []
    for ep in _entry_points(group):
        where = f"entry point {ep.name!r} of group {group} ({ep.value})"
        try:
            plugin = ep.load()
        except Exception as err:  # an ImportError inside the plugin, a typo in its entry point
            raise PluginError(f"{where} cannot load: {type(err).__name__}: {err}") from None
        if not isinstance(plugin, kind_of):
            raise PluginError(f"{where} is a {type(plugin).__name__}, not a {kind_of.__name__}")
        dist = getattr(ep, "dist", None)
        plugins.append(replace(plugin, origin=f"{where}" + (f", package {dist.name}" if dist is not None else "")))
    _CACHE[group] = (path, plugins)
    return plugins


def source_plugins() -> dict[str, SourcePlugin]:
    """Every source kind: kind -> plugin (built-ins first, in the order their specs are matched)."""
    found: dict[str, SourcePlugin] = {}
    prefixes: dict[str, SourcePlugin] = {}
    for plugin in [*BUILTIN_SOURCES, *_loaded(SOURCE_GROUP, SourcePlugin)]:
        if plugin.kind in found:
            raise PluginError(f"source kind {plugin.kind!r} of {plugin.origin} is taken by {found[plugin.kind].origin}")
        if plugin.prefix is None and plugin.origin != "built-in":
            raise PluginError(f"source kind {plugin.kind!r} of {plugin.origin} needs a prefix (e.g. {plugin.kind + ':'!r})")
        if plugin.prefix is not None:
            if plugin.prefix in prefixes:
                raise PluginError(f"source prefix {plugin.prefix!r} of {plugin.origin} is taken by "
                                  f"{prefixes[plugin.prefix].origin}")
            prefixes[plugin.prefix] = plugin
        found[plugin.kind] = plugin
    return found


def sink_plugins() -> dict[str, SinkPlugin]:
    """Every sink kind: kind -> plugin."""
    found: dict[str, SinkPlugin] = {}
    for plugin in [*BUILTIN_SINKS, MODBUS_SINK, *_loaded(SINK_GROUP, SinkPlugin)]:
        if plugin.kind in found:
            raise PluginError(f"sink kind {plugin.kind!r} of {plugin.origin} is taken by {found[plugin.kind].origin}")
        found[plugin.kind] = plugin
    return found


def resolve_source(spec: str, plugins: dict[str, SourcePlugin]) -> tuple[SourcePlugin, str]:
    """(plugin, target) of a source spec: the longest matching prefix, else the built-in camera / stream / video."""
    prefixed = sorted((p for p in plugins.values() if p.prefix is not None and spec.startswith(p.prefix)),
                      key=lambda p: -len(p.prefix))
    if prefixed:
        return prefixed[0], spec[len(prefixed[0].prefix):]
    for plugin in plugins.values():
        if plugin.prefix is None and plugin.matches is not None and plugin.matches(spec):
            return plugin, spec
    raise PluginError(f"no source kind takes {spec!r}")  # not reached while the built-in video kind is there


def sink_plugin(kind: str, plugins: dict[str, SinkPlugin]) -> SinkPlugin:
    try:
        return plugins[kind]
    except KeyError:
        raise PluginError(f"unknown sink kind {kind!r}; known: {', '.join(sorted(plugins))}") from None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def check_requirements(what: str, requires: Iterable[str], install: str) -> None:
    """Refuse a plugin whose libraries are missing, before anything starts."""
    missing = [m for m in requires if not _importable(m)]
    if missing:
        raise PluginError(f"{what} needs {', '.join(missing)}" + (f": {install}" if install else ""))
