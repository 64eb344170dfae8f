"""The one name rule (winclip_edge/names.py) at every face: every command refuses a bad product or station name with
the one message before it does anything; a bundle folder that breaks the rule is named with its rename command;
`product rename` keeps versions and thresholds working; topics and output file names are built from checked parts;
a product with a valid name (dots, dashes, capitals) is inspected, stored and published."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import textured_part, wait_for
from winclip_edge.bundle import Bundle, MisnamedProduct
from winclip_edge.cli import main
from winclip_edge.inspector import Inspector
from winclip_edge.names import NAME_RULE, InvalidName, check_topic, is_valid_name, topic
from winclip_edge.products import RenameError, rename_product

BAD = ["a+b", "a#b", "metal nut", "x;rm", "ünï", "../evil", ".hidden", "name."]


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and all(e in err for e in expected), err
    return err


def write_png(path: Path, seed: int, defect=None) -> Path:
    ok, data = cv2.imencode(".png", cv2.cvtColor(textured_part(seed=seed, defect=defect), cv2.COLOR_RGB2BGR))
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())
    return path


# ---------------------------------------------------------------- the one message, every command
@pytest.mark.parametrize("name", BAD)
def test_every_command_refuses_a_bad_product_name_with_the_one_message(tiny_bundle, tmp_path, capsys, name):
    image = str(write_png(tmp_path / "p.png", 1))
    b = str(tiny_bundle)
    before = sorted(p.name for p in (tiny_bundle / "products").iterdir())
    for argv in (["product", "add", "--bundle", b, name],
                 ["register", "--bundle", b, "--product", name, image],
                 ["calibrate", "--bundle", b, "--product", name, image],
                 ["infer", "--bundle", b, "--product", name, "--out", str(tmp_path / "o"), image],
                 ["teach", "--bundle", b, "--product", name, image],
                 ["roi", "--bundle", b, "--product", name, "--rect", "0,0,10,10"],
                 ["product", "versions", "--bundle", b, "--product", name],
                 ["product", "rollback", "--bundle", b, "--product", name, "--version", "1"],
                 ["serve", "--bundle", b, "--product", name, "--out", str(tmp_path / "s"), "--source", image]):
        one_line_error(capsys, argv, f"product name {name!r} is not valid: use {NAME_RULE}")
    assert sorted(p.name for p in (tiny_bundle / "products").iterdir()) == before  # nothing was written


def test_names_differing_only_in_case_are_refused_where_names_are_made(tiny_bundle, capsys):
    one_line_error(capsys, ["product", "add", "--bundle", str(tiny_bundle), "Widget"], "only in case", "'widget'")
    from winclip_edge.export.onnx_export import ExportOptions

    with pytest.raises(InvalidName, match="only in case"):
        ExportOptions(products=("bottle", "Bottle"))
    with pytest.raises(InvalidName, match=NAME_RULE.replace("(", r"\(").replace(")", r"\)")):
        ExportOptions(products=("metal nut",))


def test_station_names_and_topics_are_checked(tiny_bundle, tmp_path, capsys):
    from winclip_edge.line.plugins import SinkContext
    from winclip_edge.line.sinks import MqttOptions
    from winclip_edge.line.spec import StationSpec, default_station_name, load_spec
    from winclip_edge.line.typed import SpecError

    base = ["serve", "--bundle", str(tiny_bundle), "--product", "widget", "--out", str(tmp_path / "o"),
            "--source", str(tmp_path / "none.avi")]
    one_line_error(capsys, base + ["--station", "line 1"], "station name 'line 1' is not valid", NAME_RULE)
    for bad, why in (("winclip/+/result", "wildcard"), ("winclip/#", "wildcard"), ("$SYS/x", "'$'")):
        one_line_error(capsys, base + ["--mqtt", "127.0.0.1:1", "--mqtt-topic", bad], why)
    one_line_error(capsys, base + ["--source", "ünï=0"], "source name 'ünï' is not valid")
    station_file = tmp_path / "s.toml"
    station_file.write_text('station = "a#b"\nbundle = "b"\nproducts = ["widget"]\n')
    with pytest.raises(SpecError, match=r"s\.toml: station: station name 'a#b' is not valid"):
        load_spec(station_file)
    station_file.write_text('products = ["widget", "x;rm"]\n')
    with pytest.raises(SpecError, match=r"products\[1\]: product name 'x;rm'"):
        load_spec(station_file)
    station_file.write_text('[[sinks]]\nkind = "webhook"\nname = "../up"\nurl = "http://h"\n')
    with pytest.raises(SpecError, match=r"sinks\[0\]\.name: sink name '../up' is not valid"):  # its spool folder
        load_spec(station_file)
    # the default: the host name's first label, made valid; the default topic is built from checked levels
    assert default_station_name("line-pc.plant.local") == "line-pc"
    assert default_station_name("Linie Süd.local") == "Linie_Sud" and is_valid_name(default_station_name())
    assert StationSpec().station_name == default_station_name()
    config = MqttOptions(host="h").config(SinkContext(station="line-pc", products=("Bottle-2.b",)))
    assert config.topic == "winclip/line-pc/Bottle-2.b/result" == topic("winclip", "line-pc", "Bottle-2.b", "result")
    assert check_topic(config.topic) == config.topic


# ---------------------------------------------------------------- a folder that breaks the rule, and rename
def test_a_misnamed_folder_is_named_with_its_rename_command_and_rename_makes_it_work(bundle_copy, tmp_path, capsys,
                                                                                     caplog):
    images = [write_png(tmp_path / f"img{i}.png", i, defect=(30, 30, 40, 40) if i == 3 else None) for i in range(4)]
    before = {r.path: r.score for r in Inspector(bundle_copy, "widget").inspect(images)}
    os.rename(bundle_copy / "products" / "widget", bundle_copy / "products" / "metal nut")  # as made before the rule
    with caplog.at_level(logging.WARNING, logger="winclip_edge.bundle"):
        bundle = Bundle(bundle_copy)
    command = f"winclip-edge product rename --bundle {bundle_copy} 'metal nut' metal_nut"
    assert command in caplog.text and "is not served" in caplog.text  # loads, and says so: never silently
    assert bundle.products() == [] and bundle.misnamed_products() == ["metal nut"]
    with pytest.raises(MisnamedProduct, match="product rename"):
        bundle.product_dir("metal nut")
    one_line_error(capsys, ["infer", "--bundle", str(bundle_copy), "--product", "metal nut", "--out",
                            str(tmp_path / "o"), str(images[0])], command)
    one_line_error(capsys, ["serve", "--bundle", str(bundle_copy), "--product", "metal nut", "--out",
                            str(tmp_path / "s"), "--source", str(images[0])], command)
    assert main(["product", "rename", "--bundle", str(bundle_copy), "metal nut", "metal_nut"]) == 0
    assert "renamed to 'metal_nut'" in capsys.readouterr().out
    after = {r.path: r.score for r in Inspector(bundle_copy, "metal_nut").inspect(images)}
    assert after == before  # the same files, bit for bit
    assert Bundle(bundle_copy).misnamed_products() == []


def test_rename_keeps_versions_and_thresholds_and_refuses_what_it_cannot_do(make_bundle, tmp_path, capsys):
    from winclip_edge.teaching import product_versions, teach

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(make_bundle(products=("widget", "gadget")), bundle_dir)
    refs = [write_png(tmp_path / "refs" / f"r{i}.png", 10 + i) for i in range(3)]
    more = [write_png(tmp_path / "more" / f"m{i}.png", 20 + i) for i in range(2)]
    probe = [write_png(tmp_path / "probe.png", 7, defect=(60, 60, 40, 40))]
    assert main(["register", "--bundle", str(bundle_dir), "--product", "widget", *map(str, refs)]) == 0
    assert main(["calibrate", "--bundle", str(bundle_dir), "--product", "widget"]) == 0
    teach(bundle_dir, "widget", more, "tester")  # version 1 (import) and 2 (teach): records that name the product
    capsys.readouterr()
    bundle = Bundle(bundle_dir)
    versions = [(s.number, s.live) for s in product_versions(bundle_dir, "widget")]
    threshold = Inspector(bundle_dir, "widget").threshold.value
    score = Inspector(bundle_dir, "widget").inspect(probe)[0].score

    for new, why in (("gadget", "exists already"), ("Gadget", "only in case"), ("a+b", NAME_RULE)):
        with pytest.raises((RenameError, InvalidName), match=why.replace("(", r"\(").replace(")", r"\)")):
            rename_product(bundle, "widget", new)
    with pytest.raises(RenameError, match="not in bundle"):
        rename_product(bundle, "bolt", "bolt2")
    assert (bundle_dir / "products" / "widget").is_dir()  # nothing changed

    done = rename_product(bundle, "widget", "Widget-2.1")
    assert done.records == 3 and not done.resumed  # version.json of 1 and 2, current.json
    assert [(s.number, s.live) for s in product_versions(bundle_dir, "Widget-2.1")] == versions
    renamed = Inspector(bundle_dir, "Widget-2.1")
    assert renamed.threshold.value == threshold and renamed.inspect(probe)[0].score == score
    assert main(["product", "versions", "--bundle", str(bundle_dir), "--product", "Widget-2.1"]) == 0
    assert "DAMAGED" not in capsys.readouterr().out

    # killed between the folder rename and the records: the load names the command, running it again finishes
    os.rename(bundle_dir / "products" / "Widget-2.1", bundle_dir / "products" / "w3")
    command = f"winclip-edge product rename --bundle {bundle_dir} Widget-2.1 w3"
    with pytest.raises(Exception, match=command):
        Inspector(bundle_dir, "w3")
    assert main(["product", "rename", "--bundle", str(bundle_dir), "Widget-2.1", "w3"]) == 0
    assert "finished renaming" in capsys.readouterr().out
    assert Inspector(bundle_dir, "w3").inspect(probe)[0].score == score


# ---------------------------------------------------------------- output file names
def test_output_files_are_safe_and_distinct_for_any_input_name(tiny_bundle, tmp_path):
    names = ["métal nut.png", "metal nut.png", "Part.png", "sub/part.png", "x" * 230 + ".png", ".hidden.png",
             "a;rm -rf.png"]
    paths = [write_png(tmp_path / "in" / n, i) for i, n in enumerate(names)]
    out = tmp_path / "out"
    assert main(["infer", "--bundle", str(tiny_bundle), "--product", "widget", "--out", str(out), "--quiet",
                 *map(str, paths)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    overlays = [Path(r["overlay"]) for r in rows]
    assert len({o.name.casefold() for o in overlays}) == len(names)  # distinct, also on a case-insensitive disk
    for o in overlays:
        assert o.parent == out / "overlays" and o.is_file() and not o.name.startswith(".")
        assert is_valid_name(o.stem[:64]) and len(o.name) <= 110 and o.name.isascii()
    assert {r["file"] for r in rows} == {str(p) for p in paths}  # the row still names the input as given


# ---------------------------------------------------------------- a valid name travels: inspected, stored, published
def test_a_product_with_a_valid_name_is_stored_and_published(tiny_bundle, tmp_path):
    from test_serve import MOSQUITTO, Broker, Serve, Subscriber, rows, write_video

    if not Path(MOSQUITTO).is_file():
        pytest.skip("Debian mosquitto not installed (.ci/run installs it)")
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle_dir)
    rename_product(Bundle(bundle_dir), "widget", "Bottle-2.b")
    video = tmp_path / "line.avi"
    write_video(video, 4)
    broker = Broker(tmp_path).start()
    subscriber = Subscriber(broker.port, "winclip/line-1/Bottle-2.b/result")
    try:
        serve = Serve(tmp_path, "--bundle", str(bundle_dir), "--product", "Bottle-2.b", "--source", f"cam={video}",
                      "--out", "out", "--max-batch", "1", "--save", "all", "--station", "line-1",
                      "--mqtt", f"127.0.0.1:{broker.port}")
        assert serve.wait() == 0, serve.text()
        wait_for(lambda: len(subscriber.messages) == 4, 20, "MQTT messages")
    finally:
        subscriber.close()
        broker.stop()
    got = rows(tmp_path / "out")
    assert [m["id"] for m in subscriber.messages] == [r["id"] for r in got]
    assert {r["product"] for r in got} == {"Bottle-2.b"} and {r["station"] for r in got} == {"line-1"}
    assert all(Path(r["overlay"]).is_file() for r in got) and np.isfinite([r["score"] for r in got]).all()
