"""A ``genicam:`` source in the station without a camera: its kind is registered, its station-file keys (the
camera's features as a ``[sources.features]`` table) are read strictly and printed back by ``--print-config``,
the live-source flags reach it, and a machine without Aravis is told what to install. The runs against the
simulated camera are in tests/test_genicam.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from winclip_edge.cli import main
from winclip_edge.line.genicam import GENICAM_SOURCE, GenicamOptions, GenicamSource
from winclip_edge.line.registry import resolve_source, source_plugins
from winclip_edge.line.spec import SourceSpec, StationSpec, dump_spec, load_spec
from winclip_edge.line.sources import VideoOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HEAD = 'bundle = "b"\nproducts = ["widget"]\n\n[outputs]\nout = "out"\n\n'
CAMERA = HEAD + '''[[sources]]
name = "cam1"
spec = "genicam:GV01"
packet_socket = false
fps_limit = 5.0
drop = "none"

[sources.features]
PixelFormat = "BayerRG8"
Width = 1920
Height = 1200
OffsetX = 0
OffsetY = 0
ExposureTime = 5000.0
Gain = 6.0
AcquisitionFrameRate = 30.0
AcquisitionFrameRateEnable = true
TriggerMode = "Off"
'''
ORDER = ["PixelFormat", "Width", "Height", "OffsetX", "OffsetY", "ExposureTime", "Gain", "AcquisitionFrameRate",
         "AcquisitionFrameRateEnable", "TriggerMode"]


def test_genicam_is_a_registered_kind_with_its_options():
    plugin, target = resolve_source("genicam:192.168.3.7", source_plugins())
    assert plugin is GENICAM_SOURCE and plugin.kind == "genicam" and plugin.options is GenicamOptions
    assert target == "192.168.3.7"
    source = plugin.create("cam", target, GenicamOptions(buffer=3, drop="none"))
    assert isinstance(source, GenicamSource) and source.target == "192.168.3.7" and source.kind == "genicam"
    assert source.buffer.capacity == 3 and not source.buffer.drop_oldest
    named = StationSpec(sources=(SourceSpec("genicam:"), SourceSpec("genicam:192.168.3.7"), SourceSpec("genicam:")))
    assert [s.name for s in named.sources] == ["genicam", "192.168.3.7", "genicam-2"]
    # the live-source policy is the one of the other live sources, with their defaults
    assert GenicamOptions().live == VideoOptions()
    assert GenicamOptions(fps_limit=2.0, every_nth=3, reconnect_max_s=4.0).live == \
        VideoOptions(fps_limit=2.0, every_nth=3, reconnect_max_s=4.0)
    with pytest.raises(ValueError, match="--drop must be one of"):
        GenicamOptions(drop="newest")


def test_a_station_file_sets_the_cameras_features_in_order_and_print_config_writes_them_back(tmp_path, capsys):
    path = tmp_path / "station.toml"
    path.write_text(CAMERA)
    [source] = load_spec(path).sources
    assert source.kind == "genicam" and source.name == "cam1"
    options = source.options
    assert [name for name, _ in options.features] == ORDER  # the file's order: the order they are written in
    assert dict(options.features) == {"PixelFormat": "BayerRG8", "Width": 1920, "Height": 1200, "OffsetX": 0,
                                      "OffsetY": 0, "ExposureTime": 5000.0, "Gain": 6.0, "AcquisitionFrameRate": 30.0,
                                      "AcquisitionFrameRateEnable": True, "TriggerMode": "Off"}
    assert [type(v) for _, v in options.features][:2] == [str, int] and options.features[8][1] is True
    assert (options.packet_socket, options.fps_limit, options.drop) == (False, 5.0, "none")

    assert main(["serve", "--config", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "\n[sources.features]\nPixelFormat = \"BayerRG8\"\nWidth = 1920\n" in printed  # a section, in order
    again = tmp_path / "again.toml"
    again.write_text(printed)
    assert load_spec(again) == load_spec(path)
    # an inline table is the same table
    inline = HEAD + '[[sources]]\nname = "cam1"\nspec = "genicam:GV01"\npacket_socket = false\nfps_limit = 5.0\n' \
        'drop = "none"\nfeatures = {' + ", ".join(CAMERA.split("[sources.features]\n")[1].splitlines()) + "}\n"
    (tmp_path / "inline.toml").write_text(inline)
    assert load_spec(tmp_path / "inline.toml") == load_spec(path)


@pytest.mark.parametrize("features,message", [
    ("Width = [1920]", "sources[0].features.Width: expected a string, a number or a boolean, got an array [1920]"),
    ("Width = {value = 1}", "sources[0].features.Width: expected a string, a number or a boolean, got a table"),
    ("Start = 2026-01-31", "sources[0].features.Start: expected a string, a number or a boolean, got date"),
    ('TriggerMode = "On"', "TriggerMode=On needs a TriggerSource"),
])
def test_a_feature_value_of_the_wrong_type_is_refused_naming_its_key(tmp_path, capsys, features, message):
    path = tmp_path / "station.toml"
    path.write_text(HEAD + f'[[sources]]\nspec = "genicam:GV01"\n\n[sources.features]\n{features}\n')
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert str(path) in err


def test_features_must_be_a_table_and_a_camera_has_only_its_own_keys(tmp_path, capsys):
    for body, message in (('features = "Width=64"', "sources[0].features: expected a table, got a string"),
                          ("loop = true", "sources[0].loop: unknown key for a genicam source (known here: features, "
                                          "packet_socket")):
        path = tmp_path / "station.toml"
        path.write_text(HEAD + f'[[sources]]\nspec = "genicam:GV01"\n{body}\n')
        assert main(["serve", "--config", str(path)]) == 2
        assert message in capsys.readouterr().err


def test_the_live_source_flags_reach_a_genicam_source(tmp_path, capsys):
    path = tmp_path / "station.toml"
    path.write_text(CAMERA)
    assert main(["serve", "--config", str(path), "--fps-limit", "2", "--buffer", "3", "--drop", "oldest",
                 "--every-nth", "2", "--reconnect-max-s", "8", "--print-config"]) == 0
    [source] = tomllib.loads(capsys.readouterr().out)["sources"]
    assert {k: source[k] for k in ("fps_limit", "buffer", "drop", "every_nth", "reconnect_max_s")} == \
        {"fps_limit": 2.0, "buffer": 3, "drop": "oldest", "every_nth": 2, "reconnect_max_s": 8.0}
    assert list(source["features"]) == ORDER  # the file's features stay
    assert main(["serve", "--bundle", "b", "--product", "widget", "--out", "o", "--source", "line=genicam:GV01",
                 "--fps-limit", "4", "--print-config"]) == 0
    [source] = tomllib.loads(capsys.readouterr().out)["sources"]
    assert (source["name"], source["spec"], source["fps_limit"], source["features"]) == ("line", "genicam:GV01", 4.0, {})


def test_without_aravis_cameras_and_serve_say_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gi", None)  # `import gi` now fails as on a machine without PyGObject
    assert main(["cameras"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gir1.2-aravis-0.8" in err and "winclip-edge[genicam]" in err, err
    path = tmp_path / "station.toml"
    path.write_text(CAMERA)
    assert main(["serve", "--config", str(path)]) == 2  # refused before the (missing) bundle is opened
    err = capsys.readouterr().err.strip()
    assert "a genicam source (cam1) needs gi" in err and "gir1.2-aravis-0.8" in err and len(err.splitlines()) == 1
    assert "winclip-edge[genicam]" in err and "libgirepository1.0-dev" in err


def test_the_docs_station_example_with_a_camera_is_a_station():
    text = (Path(__file__).resolve().parents[1] / "docs" / "cameras.md").read_text()
    example = text[text.index("A station with a camera:"):]
    example = example[example.index("```toml\n") + len("```toml\n"):example.index("\n```\n")]
    spec = load_spec_text(example)
    assert [(s.name, s.kind) for s in spec.sources] == [("cam1", "genicam")]
    assert [name for name, _ in spec.sources[0].options.features][:3] == ["PixelFormat", "Width", "Height"]
    spec.check()


def load_spec_text(text: str) -> StationSpec:
    from winclip_edge.line.spec import spec_from_table

    spec = spec_from_table(tomllib.loads(text), "docs/cameras.md")
    assert spec_from_table(tomllib.loads(dump_spec(spec))) == spec
    return spec
