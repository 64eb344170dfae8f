"""What a source and a sink of the station are, and how a kind of them registers (docs/architecture.md, "Where new
things go").

A *source* captures frames (or picks up files) in its own thread into a bounded :class:`FrameBuffer`; the
station reads them from there. A source whose frames are files (the hot folder) also has the
:class:`FileSource` methods: the station then writes the file's destination into its row and lets the source
move it only after the row is durable (exactly one row per file across crashes). A *sink* delivers one
message and confirms it; the station puts every sink behind its own on-disk spool.

A kind of source or sink is one :class:`SourcePlugin` / :class:`SinkPlugin` object: the built-ins are listed in
``sources.py`` and ``sinks.py``; another package adds one with an entry point (group ``winclip_edge.sources``
or ``winclip_edge.sinks``, the name its kind, the value the plugin object) and ``registry.py`` finds it.
The plugin's ``options`` dataclass is what a station file's ``[[sources]]`` / ``[[sinks]]`` table holds for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from .frames import Frame, FrameBuffer


@runtime_checkable
class Source(Protocol):
    """A running source as the station sees it. ``emitted``: frames put into ``buffer`` so far; the buffer counts
    the frames it dropped; ``reconnects``: how often the source had to reopen its device or stream. A source that
    may receive broken frames (a GenICam camera) also has ``incomplete``: those it dropped unscored (status line,
    /metrics). A frame's ``row_fields()`` go into its decision row."""

    name: str
    kind: str
    buffer: "FrameBuffer"
    emitted: int
    reconnects: int

    def check(self) -> None:
        """Refuse (SourceError) what cannot work, before the engine loads: a missing file, a missing library."""

    def start(self) -> None:
        """Start capturing in the source's own thread(s); frames go to ``buffer``, which it closes when it ends."""

    def stop(self) -> None:
        """Stop capturing soon (frames already buffered are still inspected)."""


@runtime_checkable
class FileSource(Source, Protocol):
    """A source whose frames are files (``Frame.path``), moved away once their row is on disk."""

    def recover(self, already: Callable[[str, str], list[str]]) -> None:
        """Before ``start``: move files an earlier run wrote a row for but did not move (``already(path, sha256)``
        lists the ``moved_to`` of those rows), without a second row."""

    def destination(self, frame: "Frame", failed: bool) -> str:
        """Where ``frame``'s file goes once its row is written (the row names it)."""

    def finish(self, frame: "Frame", destination: str) -> None:
        """Move the file to ``destination`` (called after its row is durable)."""


class Sink(Protocol):
    """Sends one message; raises on failure. ``key`` is the same for every retry of one message. ``open`` is
    called once, from the delivery thread, before the first message (connections start there, not at
    construction, so a station that cannot start never touches the broker)."""

    name: str

    def open(self) -> None: ...

    def deliver(self, key: int, message: bytes, timeout: float) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SourcePlugin:
    """A kind of source. ``create(name, target, options)`` makes one (not started); ``target`` is the spec without
    ``prefix``. ``options`` is a frozen dataclass with a default for every field: the settings of one source (a
    station file's ``[[sources]]`` keys beside ``name`` and ``spec``). A plugin's spec starts with its ``prefix``
    (``"genicam:"``); the built-in camera / stream / video kinds have none and are told apart by ``matches``."""

    kind: str
    prefix: Optional[str]
    options: type
    create: Callable[[str, str, Any], Source]
    default_name: Optional[Callable[[str, int], str]] = None  # (target, position) -> name; default <kind><position>
    matches: Optional[Callable[[str], bool]] = None  # the built-ins without a prefix
    requires: Sequence[str] = ()  # modules it imports when it runs (checked before the engine loads)
    install: str = ""  # how to get them, e.g. 'pip install "winclip-edge[line]"'
    origin: str = "built-in"  # set by the registry: where it came from (for error messages)


@dataclass(frozen=True)
class SinkContext:
    """What a sink may need to know about its station (e.g. MQTT's default topic and client id)."""

    station: str
    products: tuple[str, ...]
    out: Optional[str] = None  # the station's output folder (a sink may keep its state beside its spool)


@dataclass(frozen=True)
class SinkPlugin:
    """A kind of sink. ``create(name, options, context)`` makes one (not connected: ``open`` does that); ``options``
    as for sources: the keys of a station file's ``[[sinks]]`` table beside ``kind`` and ``name``."""

    kind: str
    options: type
    create: Callable[[str, Any, SinkContext], Sink]
    requires: Sequence[str] = ()
    install: str = ""
    origin: str = "built-in"
