"""The triggered-part bookkeeping without a station (winclip_edge/line/parts.py, journal.py, mqtt_trigger.py): part
ids, which frame fills which view, deadlines and capture timeouts on an injected monotonic clock, the bound, the
decided ids; the journal across a cut line; MQTT trigger payloads."""
from __future__ import annotations

import json

import pytest

from winclip_edge.line.journal import JOURNAL, PartJournal, Triggered
from winclip_edge.line.mqtt_trigger import parse_trigger, trigger_topic
from winclip_edge.control import PartRefused, check_part_id
from winclip_edge.line.parts import PartsConfig, PartTracker, part_id_of_file
from winclip_edge.line.sources import Frame
from winclip_edge.names import InvalidName


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def tracker(clock: Clock, **config) -> PartTracker:
    return PartTracker(PartsConfig(**config), {"cam": True, "top": False}, clock=clock, wall=lambda: 1e9 + clock.now)


def frame(source: str, mono: float, path: str | None = None) -> Frame:
    return Frame(source, 0, 0.0, mono, path=path)


def test_part_ids_and_file_names():
    assert check_part_id(4711) == "4711" and check_part_id("A-17/b") == "A-17/b"
    for bad in ("", " 1", "x" * 129, "a\nb", True, 1.5, None):
        with pytest.raises(PartRefused):
            check_part_id(bad)
    assert part_id_of_file("/in/4711.png") == "4711" and part_id_of_file("/in/4711@top.jpg") == "4711"
    assert part_id_of_file("/in/@top.png") is None  # no part before the @


def test_a_live_view_takes_the_next_frame_after_its_trigger_and_a_file_view_its_named_file():
    clock = Clock()
    parts = tracker(clock)
    a = parts.new_part("a", "widget", "opcua")
    assert parts.admit(a) and list(a.views) == ["cam", "top"]
    assert parts.claim("cam", frame("cam", 99.0)) is None  # captured before the trigger: not this part's
    clock.now = 101.0
    b = parts.new_part("b", "widget", "mqtt")
    parts.admit(b)
    assert parts.claim("cam", frame("cam", 101.5)) is a  # the oldest part waiting for that view
    assert parts.claim("cam", frame("cam", 101.6)) is b
    assert parts.claim("cam", frame("cam", 101.7)) is None  # one frame per part and view
    assert parts.claim("top", frame("top", 101.8, path="/in/c.png")) is None  # a file named for no open part
    assert parts.claim("top", frame("top", 101.8, path="/in/b@top.png")) is b
    assert parts.claim("top", frame("top", 101.9, path="/in/b.png")) is None  # its view is taken already
    assert not parts.done(a, "cam", "outcome") and parts.done(a, "top", "outcome")  # complete with its last view
    assert parts.in_flight() == 2


def test_deadlines_capture_timeouts_the_bound_and_the_decided_ids():
    clock = Clock()
    parts = tracker(clock, deadline_ms=500, max_pending=2, remember=3)
    a = parts.new_part("a", "widget", "opcua")
    assert parts.admit(a) and a.deadline_mono == pytest.approx(100.5) and a.capture_by_mono == pytest.approx(101.0)
    assert a.deadline_at == pytest.approx(1e9 + 100.5)
    assert parts.next_wake() == pytest.approx(100.5)
    with pytest.raises(PartRefused, match="in flight already"):
        parts.admit(parts.new_part("a", "widget", "opcua"))
    assert parts.admit(parts.new_part("b", "widget", "opcua"))
    assert not parts.admit(parts.new_part("c", "widget", "opcua"))  # the bound: its fail-safe is the caller's
    assert parts.counts["overflow"] == 1 and len(parts.open_parts()) == 2
    clock.now = 100.49
    assert parts.expire().timed_out == []
    clock.now = 100.5
    expired = parts.expire()
    assert [p.part_id for p in expired.timed_out] == ["a", "b"] and a.missing == ["cam", "top"]  # fail-safe due
    assert expired.completed == []  # a view may still come: the late result
    for part in expired.timed_out:
        part.timeout_row = f"fail-safe-{part.part_id}"  # what the station does: it publishes their fail-safe rows
    clock.now = 101.0
    expired = parts.expire()
    assert expired.timed_out == [] and [p.part_id for p in expired.completed] == ["a", "b"]
    assert "within 1000 ms" in a.views["cam"].error
    parts.decided("a", "row-a")
    parts.close(a)
    with pytest.raises(PartRefused, match=r"verdict already \(row row-a\)"):
        parts.admit(parts.new_part("a", "widget", "opcua"))
    for p in "wxyz":
        parts.decided(p, f"row-{p}")
    assert parts.decided_row("a") is None and [p for p, _ in parts.remembered()] == ["x", "y", "z"]  # the newest 3
    assert PartsConfig().capture_ms == 10000.0 and PartsConfig(deadline_ms=250).capture_ms == 500
    with pytest.raises(ValueError, match="--on-timeout"):
        PartsConfig(on_timeout="maybe")


def test_the_journal_reads_back_across_a_cut_line_and_rewrites_atomically(tmp_path):
    journal = PartJournal(tmp_path, keep=2)
    for part in ("1", "2", "3", "4"):
        journal.triggered(Triggered(part, "widget", "opcua", f"j{part}", "", 10.0, 11.0, ("cam",)))
    for part in ("1", "2", "3"):
        journal.decided(part, f"r{part}")
    journal.close()
    with open(tmp_path / JOURNAL, "a") as f:
        f.write('{"event": "decided", "part_id": "4", "ro')  # cut by a crash: part 4 is still open
    recovered = PartJournal(tmp_path).recover()
    assert recovered.decided == [("1", "r1"), ("2", "r2"), ("3", "r3")]
    assert [t.part_id for t in recovered.open] == ["4"] and recovered.open[0].views == ("cam",)
    journal.rewrite(recovered.decided, recovered.open)
    again = PartJournal(tmp_path).recover()
    assert again.decided == [("2", "r2"), ("3", "r3")] and [t.job_id for t in again.open] == ["j4"]
    assert all(json.loads(line) for line in (tmp_path / JOURNAL).read_text().splitlines())


def test_mqtt_trigger_payloads():
    trigger = parse_trigger(b'{"part_id": 4711, "product": "widget", "meas_id": "m1"}')
    assert (trigger.part_id, trigger.product, trigger.meas_id, trigger.source) == ("4711", "widget", "m1", "mqtt")
    assert len(trigger.job_id) == 32
    for payload, why in ((b"{", "not JSON"), (b"[1]", "not a JSON object"), (b"{}", "no part_id"),
                         (b'{"part_id": null}', "a string or an integer"), (b'{"part_id": "1", "product": 3}',
                                                                              "product must be a string"),
                         (b"\xff", "not JSON")):
        with pytest.raises(ValueError, match=why):
            parse_trigger(payload)
    assert trigger_topic("line1") == "winclip/line1/trigger"
    with pytest.raises(InvalidName):
        trigger_topic("line/1")
