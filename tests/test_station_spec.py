"""The station as a file (winclip_edge/line/spec.py): ``serve <flags> --print-config > s.toml`` then ``serve --config
s.toml`` runs the same station; flags given override the file and only those; an unknown key or a wrong type is
refused naming the key and the file; the written TOML reads back to the same spec for any values (hypothesis)."""
from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import pytest
from hypothesis import assume, given, settings, strategies as st

from conftest import textured_part
from winclip_edge.cli import main
from winclip_edge.cli.serve import spec_of
from winclip_edge.line.genicam import GenicamOptions
from winclip_edge.names import NAME_PATTERN, is_valid_name
from winclip_edge.line.plugins import SinkContext
from winclip_edge.line.sinks import MqttOptions, WebhookOptions
from winclip_edge.line.sources import FolderOptions, VideoOptions
from winclip_edge.line.spec import (
    BatchingSpec,
    DriftSpec,
    EngineSpec,
    HttpSpec,
    OutputsSpec,
    SinkSpec,
    SourceSpec,
    StationSpec,
    dump_spec,
    dumps_toml,
    load_spec,
    spec_from_table,
)
from winclip_edge.line.typed import SpecError
from winclip_edge.scoring import ScoringOptions
from winclip_edge.tiles.overrides import TilingOverrides

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def write_video(path: Path, n: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(n):
        writer.write(cv2.cvtColor(textured_part((48, 64), seed=i), cv2.COLOR_RGB2BGR))
    writer.release()


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


MOVING = ("id", "captured_at", "decided_at", "latency_ms", "timings_ms")  # what differs between two runs of one station


def test_print_config_then_config_runs_the_same_station(tiny_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_video(tmp_path / "line.avi", 5)
    flags = ["--bundle", str(tiny_bundle), "--product", "widget", "--station", "st1", "--source", "cam=line.avi",
             "--every-nth", "2", "--max-batch", "2", "--max-wait-ms", "5", "--save", "all", "--out", "out",
             "--status-every", "0", "--tile", "off", "--temperature", "0.05"]
    assert main(["serve", *flags, "--print-config"]) == 0
    printed = capsys.readouterr()
    assert not (tmp_path / "out").exists(), "--print-config starts nothing"
    (tmp_path / "s.toml").write_text(printed.out)
    assert load_spec(tmp_path / "s.toml") == spec_of(_given(flags))  # parse(print(spec)) == spec
    assert main(["serve", "--config", "s.toml", "--print-config"]) == 0
    assert capsys.readouterr().out == printed.out

    assert main(["serve", *flags]) == 0  # the video ends: the run ends
    by_flags = rows(tmp_path / "out")
    shutil.move(tmp_path / "out", tmp_path / "by-flags")
    assert main(["serve", "--config", "s.toml"]) == 0
    by_file = rows(tmp_path / "out")
    assert [r["frame"] for r in by_file] == [0, 2, 4]
    # the same rows but for what two runs of one station never share (ids, times; pictures are named by start time)
    same = lambda r: {k: v for k, v in r.items() if k not in MOVING + ("map", "overlay")}  # noqa: E731
    assert [same(r) for r in by_file] == [same(r) for r in by_flags]
    assert all(r["station"] == "st1" and r["source"] == "cam" and Path(r["overlay"]).is_file() for r in by_file)


def _given(flags: list[str]) -> dict:
    from winclip_edge.cli import build_parser

    args = build_parser().parse_args(["serve", *flags])
    return {k: v for k, v in vars(args).items() if k not in ("run", "command")}


@pytest.fixture
def station_file(tmp_path) -> Path:
    path = tmp_path / "station.toml"
    path.write_text(f"""
station = "line2"
bundle = "b"
products = ["widget", "gadget"]

[batching]
max_batch = 3
queue_size = 5

[outputs]
out = "{tmp_path / 'out'}"

[[sources]]
spec = "0"
fps_limit = 4.0

[[sources]]
name = "inbox"
spec = "folder:{tmp_path}"
settle_s = 0.5

[[sinks]]
kind = "mqtt"
host = "broker.local"
topic = "line2/results"

[http]
listen = "127.0.0.1:8081"
keep_results = 7
""")
    return path


def test_a_station_file_reads_into_its_spec(station_file, tmp_path):
    spec = load_spec(station_file)
    assert spec.station == "line2" and spec.products == ("widget", "gadget")
    assert spec.batching == BatchingSpec(max_batch=3, max_wait_ms=10.0, queue_size=5)
    assert [(s.name, s.kind) for s in spec.sources] == [("camera0", "camera"), ("inbox", "folder")]
    assert spec.sources[0].options == VideoOptions(fps_limit=4.0)
    assert spec.sources[1].options == FolderOptions(settle_s=0.5)
    assert spec.sinks == (SinkSpec("mqtt", "mqtt", MqttOptions(host="broker.local", topic="line2/results")),)
    assert spec.http == HttpSpec(listen="127.0.0.1:8081", keep_results=7)
    assert spec.engine == EngineSpec() and spec.scoring == ScoringOptions() and spec.tiling == TilingOverrides()
    assert load_spec(_written(tmp_path, dump_spec(spec))) == spec


def _written(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "again.toml"
    path.write_text(text)
    return path


def test_only_the_flags_given_override_the_file(station_file):
    base = load_spec(station_file)
    spec = spec_of({"max_batch": 2, "fps_limit": 1.5, "settle_s": 0.1, "mqtt_topic": "other", "keep_results": 9}, base)
    assert spec.batching == BatchingSpec(max_batch=2, queue_size=5)  # queue_size stays the file's
    assert spec.sources[0].options == VideoOptions(fps_limit=1.5) and spec.sources[1].options == FolderOptions(settle_s=0.1)
    assert spec.sinks[0].options == MqttOptions(host="broker.local", topic="other")
    assert spec.http == HttpSpec(listen="127.0.0.1:8081", keep_results=9)
    assert spec_of({}, base) == base  # no flag, no change
    replaced = spec_of({"source": ["cam=rtsp://cam/1"], "product": ["gadget"], "webhook": "http://mes/hook"}, base)
    assert [(s.name, s.spec) for s in replaced.sources] == [("cam", "rtsp://cam/1")] and replaced.products == ("gadget",)
    assert [s.kind for s in replaced.sinks] == ["mqtt", "webhook"]
    assert spec_of({"mqtt": "other:1884"}, base).sinks[0].options == MqttOptions(host="other", port=1884,
                                                                              topic="line2/results")  # topic kept
    assert spec_of({"mqtt": "other", "mqtt_tls": True}, base).sinks[0].options.port == 8883


@pytest.mark.parametrize("text, where", [
    ("[batching]\nmax_bacth = 2\n", "batching.max_bacth: unknown key"),
    ("[batching]\nmax_batch = \"2\"\n", "batching.max_batch: expected an integer, got a string '2'"),
    ("products = \"widget\"\n", "products: expected an array"),
    ("[[sources]]\nspec = \"0\"\nfps = 3\n", "sources[0].fps: unknown key"),
    ("[[sources]]\nspec = \"0\"\nloop = 1\n", "sources[0].loop: expected true or false"),
    ("[[sources]]\nname = \"x\"\n", "sources[0].spec: missing"),
    ("[[sinks]]\nkind = \"opcua\"\n", "sinks[0].kind: unknown sink kind 'opcua'"),
    ("[[sinks]]\nkind = \"mqtt\"\nport = 1883\n", "sinks[0].host: missing"),
    ("[http]\nlisten = \"nowhere\"\n", "http.listen: expected HOST:PORT"),
    ("[engine]\nbackend = \"tpu\"\n", "engine.backend: must be one of"),
    ("[engine]\nbackend = \"onnxruntime\"\ncuda_graphs = true\n", "engine.cuda_graphs: unknown key for the onnxruntime"),
    ("[engine]\nprovidr = \"cpu\"\n", "engine.providr: unknown key: no backend has"),
    ("[scoring]\ntemperature = -1\n", "scoring: temperature must be > 0"),
    ("statoin = \"x\"\n", "statoin: unknown key"),
    ("[batching\n", "not TOML"),
])
def test_a_bad_file_is_refused_naming_the_key_and_the_file(tmp_path, capsys, text, where):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError, match="^" + str(path).replace(".", r"\.") + ": "):
        load_spec(path)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert where in err and str(path) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_the_engine_section_holds_the_engine_flags(tmp_path, capsys):
    """--provider without --backend names onnxruntime as every command does; the file keeps it as the backend's own
    option; flags laid over a file keep the file's other engine values; a flag the backend does not take is refused."""
    from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
    from winclip_edge.engines.openvino import OpenVinoOptions
    from winclip_edge.line.spec import engine_config

    base = ["serve", "--bundle", "b", "--product", "w", "--out", str(tmp_path / "o"), "--source", "0"]
    assert main(base + ["--provider", "cpu", "--threads", "2", "--print-config"]) == 0
    text = capsys.readouterr().out
    spec = load_spec(_written(tmp_path, text))
    assert spec.engine == EngineSpec(threads=2, options=OnnxRuntimeOptions(provider="cpu"))
    assert engine_config(spec.engine).options == OnnxRuntimeOptions(provider="cpu")
    file = _written(tmp_path, text.replace('provider = "cpu"', 'provider = "cpu"\nengine_dir = "/e"'))
    again = spec_of({"threads": 1}, load_spec(file)).engine
    assert again == EngineSpec(threads=1, engine_dir="/e", options=OnnxRuntimeOptions(provider="cpu"))
    hinted = spec_of({"backend": "openvino", "performance_hint": "throughput"}, StationSpec())
    assert hinted.engine == EngineSpec(backend="openvino", options=OpenVinoOptions(performance_hint="throughput"))
    assert main(base + ["--backend", "torch", "--threads", "2", "--print-config"]) == 2
    assert "--threads is not an option of the torch backend" in capsys.readouterr().err
    assert main(["serve", "--config", str(file), "--backend", "openvino", "--print-config"]) == 2
    assert "options are the onnxruntime backend's" in capsys.readouterr().err


def test_flag_errors_name_the_flag(tmp_path, capsys):
    base = ["serve", "--bundle", "b", "--product", "w", "--out", str(tmp_path / "o"), "--source", "0", "--print-config"]
    for extra, message in ((["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
                           (["--rotate-mb", "0"], "--rotate-mb must be > 0"),
                           (["--http", "host"], "--http 'host': expected HOST:PORT"),
                           (["--source", "a=0", "--source", "a=1"], None)):
        code = main(base + extra)
        err = capsys.readouterr().err
        if message is None:  # two --source NAME= of one name: as before, the second is a-2
            assert code == 0
            continue
        assert code == 2 and message in err, err
    assert main(["serve", "--product", "w", "--out", "o", "--source", "0"]) == 2
    assert "bundle: missing: give --bundle" in capsys.readouterr().err


# ---------------------------------------------------------------- round trip for any values
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
hosts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)
names = st.from_regex(NAME_PATTERN, fullmatch=True)  # station, product, source names: the one rule (names.py)
topics = text.filter(lambda t: t and not set(t) & set("+#\x00") and not t.startswith("$"))  # publish topics
finite = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
# A camera's features: any name (the camera decides which exist), a string, an integer, a float or a boolean.
features = st.dictionaries(
    st.one_of(st.sampled_from(["PixelFormat", "Width", "ExposureTime", "Gain", "TriggerSource"]), names),
    st.one_of(text, st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False), st.booleans()),
    max_size=6)


@st.composite
def specs(draw) -> StationSpec:
    sources = draw(st.lists(st.one_of(
        st.builds(lambda n, fps, nth, loop: SourceSpec(str(n), None, VideoOptions(fps_limit=fps, every_nth=nth, loop=loop)),
                  st.integers(0, 9), finite, st.integers(1, 100), st.booleans()),
        st.builds(lambda folder, name, settle: SourceSpec("folder:" + folder, name, FolderOptions(settle_s=settle)),
                  text, st.one_of(st.none(), names), finite),
        st.builds(lambda url: SourceSpec("rtsp://" + url), text),
        st.builds(lambda camera, f, socket, fps: SourceSpec("genicam:" + camera, None, GenicamOptions(
            features=f, packet_socket=socket, fps_limit=fps)), text, features, st.booleans(), finite)), max_size=3))
    explicit = [s.name for s in sources if s.name]
    assume(len(set(explicit)) == len(explicit))  # two of one name are refused (test_spec_refuses_...)
    sinks = draw(st.lists(st.one_of(
        st.builds(lambda host, topic, tls: SinkSpec("mqtt", None, MqttOptions(host=host, topic=topic, tls=tls)),
                  hosts, st.one_of(st.none(), topics), st.booleans()),
        st.builds(lambda url: SinkSpec("webhook", None, WebhookOptions("https://" + url)), text)), max_size=2))
    return StationSpec(
        station=draw(st.one_of(st.none(), names)), bundle=draw(text), products=tuple(draw(st.lists(names, max_size=3))),
        sigma=draw(finite), engine=EngineSpec(threads=draw(st.integers(0, 64)), engine_dir=draw(st.one_of(st.none(), text))),
        scoring=ScoringOptions(temperature=draw(st.one_of(st.none(), st.floats(1e-6, 10))),
                               scales=draw(st.one_of(st.none(), st.lists(st.integers(1, 5), min_size=1).map(tuple)))),
        tiling=TilingOverrides(roi=draw(st.one_of(st.none(), text)), no_roi=draw(st.booleans())),
        batching=BatchingSpec(max_batch=draw(st.integers(1, 64)), max_wait_ms=draw(finite)),
        outputs=OutputsSpec(out=draw(text), rotate_mb=draw(st.floats(1e-3, 1e6)), status_every=draw(finite)),
        sources=tuple(sources), sinks=tuple(sinks),
        http=draw(st.one_of(st.none(), st.builds(lambda token, mb, tokens: HttpSpec(token=token, max_upload_mb=mb,
                                                                                    token_file=tokens),
                                                 st.one_of(st.none(), text), finite, st.one_of(st.none(), text)))),
        drift=draw(st.builds(lambda window, watch, on, share: DriftSpec(window=window, watch=tuple(watch), ks=on,
                                                                       ks_clear=on * share),
                             st.integers(1, 10**6), st.lists(st.sampled_from(("false_alarm_rate", "ks", "share_above")),
                                                             unique=True),
                             st.floats(0, 1), st.floats(0, 1))))


@settings(max_examples=60, deadline=None)
@given(specs())
def test_the_written_file_reads_back_to_the_same_spec(spec):
    assert spec_from_table(tomllib.loads(dump_spec(spec))) == spec


# ---------------------------------------------------------------- any table: a spec or a SpecError naming the key
KEYS = ("station", "bundle", "products", "sigma", "engine", "scoring", "tiling", "batching", "outputs", "sources",
        "sinks", "http", "backend", "precision", "threads", "device", "options", "spec", "name", "kind", "host",
        "topic", "port", "tls", "url", "max_batch", "queue_size", "out", "save", "listen", "token", "fps_limit",
        "temperature", "scales", "tile", "roi", "x")
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=5))
scalars = st.one_of(st.text(max_size=10), st.sampled_from(["0", "folder:/x", "rtsp://h/s", "mqtt", "webhook",
                                                           "widget", "line1", "a+b", "127.0.0.1:0", "winclip/#"]),
                    st.integers(-2**63, 2**63 - 1), st.floats(), st.booleans())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=6))
def test_any_station_table_is_a_spec_or_a_spec_error_naming_its_key(table):
    """A station file's parser never fails with anything but a SpecError that names the key (and the file)."""
    try:
        spec = spec_from_table(table, "fuzz.toml")
    except SpecError as err:
        assert err.file == "fuzz.toml" and err.key, (err.key, err.problem)
        assert str(err).startswith(f"fuzz.toml: {err.key}: ")
        return
    assert isinstance(spec, StationSpec)
    assert spec.station is None or is_valid_name(spec.station)
    assert all(is_valid_name(p) for p in spec.products)
    assert all(is_valid_name(s.name) for s in (*spec.sources, *spec.sinks))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6).filter(lambda k: k != ""), st.one_of(
    text, st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False), st.booleans(), st.lists(text, max_size=3)),
    max_size=5))
def test_the_toml_writer_round_trips_any_keys_and_values(table):
    table = {**table, "section": dict(table), "entries": [dict(table), {"x": 1}]}
    back = tomllib.loads(dumps_toml(table))
    assert back == table or _nan_safe(back) == _nan_safe(table)


def _nan_safe(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"
    if isinstance(obj, dict):
        return {k: _nan_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_safe(v) for v in obj]
    return obj


def test_spec_refuses_what_a_station_cannot_be():
    with pytest.raises(SpecError, match="two sources are named 'cam'"):
        StationSpec(sources=(SourceSpec("0", "cam"), SourceSpec("1", "cam")))
    with pytest.raises(SpecError, match="spool"):
        StationSpec(sinks=(SinkSpec("webhook", "out", WebhookOptions("http://a")),
                           SinkSpec("webhook", "out", WebhookOptions("http://b"))))
    with pytest.raises(SpecError, match="takes FolderOptions"):
        SourceSpec("folder:/in", "in", VideoOptions())
    with pytest.raises(SpecError, match="nothing to serve"):
        StationSpec(bundle="b", products=("w",), outputs=OutputsSpec(out="o")).check()
    named = StationSpec(sources=(SourceSpec("0"), SourceSpec("0"), SourceSpec("rtsp://user:pw@cam/1")))
    assert [s.name for s in named.sources] == ["camera0", "camera0-2", "stream2"]  # never the URL's password
    assert replace(named, station="x").sources == named.sources


def test_the_example_of_the_docs_is_a_station(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "docs" / "line.md").read_text()
    example = text[text.index("A complete example:"):]
    example = example[example.index("```toml\n") + len("```toml\n"):example.index("\n```\n")]
    spec = spec_from_table(tomllib.loads(example), "docs/line.md")
    assert [(s.name, s.kind) for s in spec.sources] == [("cam1", "stream"), ("inbox", "folder")]
    assert [(s.name, s.kind) for s in spec.sinks] == [("mqtt", "mqtt"), ("mes", "webhook")]
    assert spec.sinks[0].options.config(SinkContext("line1", spec.products)).port == 8883  # tls: its default port
    spec.check()
    assert spec_from_table(tomllib.loads(dump_spec(spec))) == spec
