"""A new kind of source and of sink is one module: both are defined here and registered as an installed package
registers them, with a real importlib.metadata entry point (a ``*.dist-info/entry_points.txt`` on sys.path), then
used by ``serve --config`` like the built-ins (docs/architecture.md, "Where new things go")."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import textured_part
from winclip_edge.cli import main
from winclip_edge.inspector import Inspector
from winclip_edge.line.frames import Frame, FrameBuffer, SourceError
from winclip_edge.line.plugins import FileSource, SinkContext, SinkPlugin, Source, SourcePlugin
from winclip_edge.line.registry import PluginError, sink_plugins, source_plugins
from winclip_edge.line.spec import load_spec


# ---------------------------------------------------------------- the plugins (what a plugin package's module holds)
@dataclass(frozen=True)
class CounterOptions:
    frames: int = 3  # how many parts the "camera" shows
    size: int = 64


class CounterSource:
    """``counter:<seed>``: a camera stand-in that shows ``frames`` synthetic parts, then ends (a GenICam camera would
    grab from its device here)."""

    kind = "counter"

    def __init__(self, name: str, target: str, options: CounterOptions):
        self.name, self.target, self.options = name, target, options
        self.buffer = FrameBuffer(2, drop_oldest=False)
        self.emitted = self.reconnects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def check(self) -> None:
        if not self.target.isdigit():
            raise SourceError(f"counter:{self.target}: the target is a seed (digits)")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            for i in range(self.options.frames):
                if self._stop.is_set():
                    return
                image = textured_part((self.options.size, self.options.size), seed=int(self.target) + i)
                if not self.buffer.put(Frame(self.name, i, time.time(), time.monotonic(), image=image)):
                    return
                self.emitted += 1
        finally:
            self.buffer.close()


@dataclass(frozen=True)
class ListOptions:
    label: str = "list"


class ListSink:
    """Keeps what it is sent (a PLC output or an OPC UA face would write it to its device)."""

    received: list = []

    def __init__(self, name: str, options: ListOptions, context: SinkContext):
        self.name, self.options, self.context = name, options, context

    def open(self) -> None:
        pass

    def deliver(self, key: int, message: bytes, timeout: float) -> None:
        type(self).received.append((self.options.label, self.context.station, json.loads(message)))

    def close(self) -> None:
        pass


COUNTER = SourcePlugin("counter", "counter:", CounterOptions, CounterSource)
LISTED = SinkPlugin("listed", ListOptions, ListSink)


# ---------------------------------------------------------------- registering them as a package would
def install(folder: Path, monkeypatch, entry_points: str, name: str = "winclip_edge_test_plugins") -> None:
    """A dist-info folder with ``entry_points`` on sys.path: what `pip install` of a plugin package leaves."""
    info = folder / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    monkeypatch.syspath_prepend(str(folder))


PLUGINS = f"""[winclip_edge.sources]
counter = {__name__}:COUNTER

[winclip_edge.sinks]
listed = {__name__}:LISTED
"""


def station_file(tmp_path: Path, bundle: Path) -> Path:
    path = tmp_path / "station.toml"
    path.write_text(f"""
station = "plugged"
bundle = "{bundle}"
products = ["widget"]

[batching]
max_batch = 1

[outputs]
out = "{tmp_path / 'out'}"
save = "none"
status_every = 0.0

[[sources]]
spec = "counter:5"
frames = 4
size = 72

[[sinks]]
kind = "listed"
label = "plc"
""")
    return path


def test_a_source_and_a_sink_from_entry_points_run_in_a_station(tiny_bundle, tmp_path, monkeypatch, capsys):
    path = station_file(tmp_path, tiny_bundle)
    assert main(["serve", "--config", str(path)]) == 2  # not installed: the file's keys mean nothing yet
    assert ("sources[0].frames: unknown key for a video source (known here: fps_limit, "
            in (err := capsys.readouterr().err)) and "no installed source kind has the prefix 'counter:'" in err

    install(tmp_path / "site", monkeypatch, PLUGINS)
    assert source_plugins()["counter"].origin.startswith("entry point 'counter' of group winclip_edge.sources")
    assert "listed" in sink_plugins()
    spec = load_spec(path)
    assert spec.sources[0].kind == "counter" and spec.sources[0].options == CounterOptions(frames=4, size=72)
    ListSink.received = []
    assert main(["serve", "--config", str(path)]) == 0  # the counter ends after 4 frames: the run ends
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in rows] == [0, 1, 2, 3] and {r["source"] for r in rows} == {"counter0"}
    inspector = Inspector(tiny_bundle, "widget")
    expected = inspector.inspect([textured_part((72, 72), seed=5 + i) for i in range(4)], batch_size=1)
    assert [r["score"] for r in rows] == [e.score for e in expected]  # scored like Inspector.inspect at batch 1
    assert [(label, station, m["id"]) for label, station, m in ListSink.received] == \
        [("plc", "plugged", r["id"]) for r in rows]  # through the spool, in order, the same rows
    assert not list((tmp_path / "out" / "spool").rglob("*.json"))
    assert load_spec(_again(tmp_path, main, path, capsys)) == spec  # --print-config writes the plugin's keys


def _again(tmp_path: Path, main, path: Path, capsys) -> Path:
    assert main(["serve", "--config", str(path), "--print-config"]) == 0
    again = tmp_path / "again.toml"
    again.write_text(capsys.readouterr().out)
    assert "spec = \"counter:5\"" in again.read_text() and "label = \"plc\"" in again.read_text()
    return again


def test_before_the_entry_point_the_prefix_is_no_kind(tmp_path, monkeypatch):
    from winclip_edge.line.registry import resolve_source

    assert resolve_source("counter:5", source_plugins())[0].kind == "video"  # a file named so
    install(tmp_path / "site", monkeypatch, PLUGINS)
    plugin, target = resolve_source("counter:5", source_plugins())
    assert (plugin.kind, target) == ("counter", "5")
    source = plugin.create("c", target, CounterOptions())
    assert isinstance(source, Source) and not isinstance(source, FileSource)  # the protocols, not classes, decide


@pytest.mark.parametrize("entry_points, message", [
    ("[winclip_edge.sources]\nfolder = {m}:COUNTER_AS_FOLDER\n", "source kind 'folder' of entry point 'folder'"),
    ("[winclip_edge.sources]\nagain = {m}:COUNTER_PREFIX_CLASH\n", "source prefix 'folder:' of entry point 'again'"),
    ("[winclip_edge.sources]\nnoprefix = {m}:COUNTER_WITHOUT_PREFIX\n", "needs a prefix"),
    ("[winclip_edge.sinks]\nbroken = no_such_plugin_module:SINK\n", "entry point 'broken' of group winclip_edge.sinks"),
    ("[winclip_edge.sinks]\nwrong = {m}:CounterOptions\n", "is a type, not a SinkPlugin"),
])
def test_a_plugin_that_cannot_be_used_is_refused_by_name(tmp_path, monkeypatch, entry_points, message):
    install(tmp_path / "site", monkeypatch, entry_points.format(m=__name__))
    with pytest.raises(PluginError, match=message):
        source_plugins()
        sink_plugins()


COUNTER_AS_FOLDER = SourcePlugin("folder", "count:", CounterOptions, CounterSource)
COUNTER_PREFIX_CLASH = SourcePlugin("again", "folder:", CounterOptions, CounterSource)
COUNTER_WITHOUT_PREFIX = SourcePlugin("noprefix", None, CounterOptions, CounterSource, matches=lambda s: True)


def test_the_built_in_kinds_are_plugins_too():
    assert list(source_plugins()) == ["folder", "gstreamer", "camera", "stream", "video", "genicam"]
    assert list(sink_plugins()) == ["mqtt", "webhook", "modbus"]  # modbus: the PLC sink (line/modbus.py)
    assert all(p.origin == "built-in" for p in [*source_plugins().values(), *sink_plugins().values()])
