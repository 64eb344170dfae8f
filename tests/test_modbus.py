"""The Modbus TCP sink against pymodbus' own server as the PLC (docs/line.md): the register map, the write
order, a PLC that goes down and comes back mid-run (nothing lost, order kept, no duplicate live write), exactly
one live write across a station restart, and verdicts past their deadline never written as live ones."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("pymodbus")

from pymodbus.server import ModbusTcpServer  # noqa: E402
from pymodbus.simulator import DataType, SimData, SimDevice  # noqa: E402

from conftest import free_port, wait_for  # noqa: E402
from winclip_edge.line.modbus import (  # noqa: E402
    NO_SCORE, RESULT_ERROR, RESULT_FAIL, RESULT_PASS, RESULT_TIMEOUT, ModbusConfig, ModbusError, ModbusMap,
    ModbusSink, deadline_of, milli, part_id_number, runs, verdict_values)
from winclip_edge.line.sinks import SpooledSink  # noqa: E402
from winclip_edge.line.spool import Spool  # noqa: E402

FC_WRITE_COIL, FC_WRITE_REGISTER, FC_WRITE_COILS, FC_WRITE_REGISTERS = 5, 6, 15, 16
MAP = ModbusMap()  # the default map: coils 0-2, registers 0-1 part id, 2 score, 3 result, 4 sequence


class Plc:
    """A PLC as pymodbus users start one: its async TCP server in a thread, a SimDevice datastore. Every write
    that reaches the datastore is recorded in order (function code, address, values), across restarts."""

    def __init__(self, port: int):
        self.port = port
        self.writes: list[tuple[int, int, list]] = []
        self._thread: threading.Thread | None = None

    async def _record(self, function_code, start_address, address, count, registers, set_values):
        if set_values is not None:
            self.writes.append((function_code, address, list(set_values)))
        return None

    def start(self) -> "Plc":
        device = SimDevice(MAP.unit, simdata=(
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)]), action=self._record)
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                self.server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
                self.loop = asyncio.get_running_loop()
                ready.set()
                await self.server.serve_forever()

            asyncio.run(main())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)
        time.sleep(0.2)  # serve_forever binds right after
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(10)
        self._thread.join(10)
        assert not self._thread.is_alive()

    def verdicts(self) -> list[dict]:
        """What the PLC saw, replaying its memory: the data registers and coils at each change of the sequence
        register (the moment the PLC acts)."""
        registers, coils, seen, sequence = {}, {}, [], 0
        for function_code, address, values in self.writes:
            target = coils if function_code in (FC_WRITE_COIL, FC_WRITE_COILS) else registers
            for offset, value in enumerate(values):
                target[address + offset] = value
            if target is registers and address <= MAP.sequence_register < address + len(values):
                if registers[MAP.sequence_register] != sequence:
                    sequence = registers[MAP.sequence_register]
                    seen.append({"sequence": sequence, "part": (registers[0] << 16) | registers[1],
                                 "score": registers[2], "result": registers[3],
                                 "coils": (coils.get(0), coils.get(1), coils.get(2))})
        return seen


@pytest.fixture
def plc():
    plc = Plc(free_port()).start()
    yield plc
    try:
        plc.stop()
    except Exception:
        pass


def row(part: int, decision: str = "fail", score: float = 0.8, **extra) -> dict:
    return {"id": f"r{part}", "part_id": str(part), "decision": decision, "score": score, "threshold": 0.5,
            "product": "widget", **extra}


def expected(part: int, decision: str, score: float) -> dict:
    code = {"pass": RESULT_PASS, "fail": RESULT_FAIL, "timeout": RESULT_TIMEOUT}.get(decision, RESULT_ERROR)
    return {"part": part, "score": milli(score), "result": code,
            "coils": (code == RESULT_PASS, code != RESULT_PASS, code == RESULT_TIMEOUT)}


def test_register_values_and_write_runs():
    values, coils = verdict_values(row(70000, "pass", 0.1234), MAP.registers(), MAP.coils())
    assert values == {0: 1, 1: 70000 - 65536, 2: 123, 3: RESULT_PASS}  # part id high word first; score x 1000
    assert coils == {0: True, 1: False, 2: False}
    values, coils = verdict_values({"part_id": "A-17", "decision": "timeout", "score": None}, MAP.registers(),
                                   MAP.coils())
    assert values == {0: 0, 1: 0, 2: NO_SCORE, 3: RESULT_TIMEOUT} and coils == {0: False, 1: True, 2: True}
    _, coils = verdict_values({"decision": None, "error": "unreadable"}, MAP.registers(), MAP.coils())
    assert coils == {0: False, 1: True, 2: False}  # an error is rejected (fail-safe)
    assert runs({4: 9, 0: 1, 1: 2, 7: 3}) == [(0, [1, 2]), (4, [9]), (7, [3])]
    assert [part_id_number(p) for p in ("4711", 4711, " 12 ", "x", -1, 2**32, True)] == [4711, 4711, 12, 0, 0, 0, 0]
    assert [milli(v) for v in (0.0, 1.0, 0.0004, 0.0006, 99.0, -1.0, float("nan"), None)] == \
        [0, 1000, 0, 1, 65534, 0, NO_SCORE, NO_SCORE]
    with pytest.raises(ModbusError, match="part_id and score overlap at address 1"):
        ModbusMap(score_register=1).check()
    with pytest.raises(ModbusError, match="share address 0"):
        ModbusMap(reject_coil=0).check()


def test_deadline_hook():
    assert deadline_of({"deadline_at": "2026-01-01T00:00:01.500Z"}) == pytest.approx(1767225601.5)
    assert deadline_of({"captured_at": "2026-01-01T00:00:00.000Z", "deadline_ms": 250}) == pytest.approx(1767225600.25)
    assert deadline_of({"deadline_at": 12.5}) == 12.5
    assert deadline_of({"captured_at": "2026-01-01T00:00:00.000Z"}) is None  # no deadline: always written


def test_plc_down_and_back_mid_run_loses_nothing_keeps_order_and_writes_each_verdict_once(plc, tmp_path):
    sink = SpooledSink(ModbusSink(ModbusConfig("127.0.0.1", plc.port, timeout_s=0.5)), Spool(tmp_path / "spool"),
                       retry_min_s=0.05, retry_max_s=0.2)
    parts = [(4700 + i, ("pass", "fail")[i % 2], i / 10) for i in range(9)]
    try:
        for part, decision, score in parts[:3]:
            sink.put(row(part, decision, score))
        wait_for(lambda: sink.stats().delivered == 3, 30, "the first verdicts")
        plc.stop()
        for part, decision, score in parts[3:6]:
            sink.put(row(part, decision, score))
        wait_for(lambda: sink.stats().failures > 0, 30, "a failed write while the PLC is down")
        assert len(sink.spool) >= 1  # waiting on disk, not lost
        plc.start()
        for part, decision, score in parts[6:]:
            sink.put(row(part, decision, score))
        wait_for(lambda: sink.stats().delivered == 9 and len(sink.spool) == 0, 60, "every verdict")
    finally:
        sink.close(5)
    seen = plc.verdicts()
    assert [{k: v for k, v in s.items() if k != "sequence"} for s in seen] == [expected(*p) for p in parts]
    sequences = [s["sequence"] for s in seen]
    assert len(set(sequences)) == len(sequences) == 9  # one new sequence value per verdict: none written twice
    # Per verdict the data registers and coils come first and the sequence register last.
    first_verdict = plc.writes[:3]
    assert [w[0] for w in first_verdict] == [FC_WRITE_REGISTERS, FC_WRITE_COILS, FC_WRITE_REGISTER]
    assert first_verdict[2][1] == MAP.sequence_register


def test_a_retry_after_a_restart_is_not_a_new_verdict(plc, tmp_path):
    """The station died after the PLC took a verdict but before the spool forgot it: the next station writes it
    again with the same sequence value (state_file), so the PLC sees one verdict, not two."""
    state = tmp_path / "modbus.state.json"
    message = json.dumps(row(4711)).encode()
    config = ModbusConfig("127.0.0.1", plc.port, timeout_s=1, state_file=str(state))
    first = ModbusSink(config)
    first.deliver(7, message, 1)  # written; "crash" before the spool pops it
    first.close()
    second = ModbusSink(config)
    second.deliver(7, message, 1)  # the recovered spool sends it again
    second.deliver(8, json.dumps(row(4712)).encode(), 1)
    second.close()
    assert [s["part"] for s in plc.verdicts()] == [4711, 4712]

    # Without the state file the same retry would count as a second verdict (the test can fail).
    plc.writes.clear()
    memory_only = ModbusConfig("127.0.0.1", plc.port, timeout_s=1)
    for _ in range(2):
        sink = ModbusSink(memory_only)
        sink.deliver(9, json.dumps(row(4713)).encode(), 1)
        sink.close()
    assert [s["part"] for s in plc.verdicts()] == [4713, 4713]


def test_verdicts_past_their_deadline_and_late_results_are_counted_not_written(plc, tmp_path):
    now = 1_800_000_000.0
    sink = ModbusSink(ModbusConfig("127.0.0.1", plc.port, timeout_s=1, write_grace_ms=200), clock=lambda: now)
    sink.deliver(1, json.dumps(row(1, deadline_at=now + 1)).encode(), 1)  # in time
    sink.deliver(2, json.dumps(row(2, "timeout", None, deadline_at=now - 0.1)).encode(), 1)  # within the grace
    sink.deliver(3, json.dumps(row(3, deadline_at=now - 5)).encode(), 1)  # the PLC was down too long
    sink.deliver(4, json.dumps(row(4, captured_at=now - 10, deadline_ms=300)).encode(), 1)
    sink.deliver(5, json.dumps(row(2, "fail", late_for="r2")).encode(), 1)  # part 2's real result, too late
    sink.deliver(6, b"not json", 1)
    sink.deliver(7, json.dumps(row(7)).encode(), 1)  # no deadline: always written
    sink.close()
    assert [s["part"] for s in plc.verdicts()] == [1, 2, 7]
    assert (sink.written, sink.stale, sink.late, sink.bad) == (3, 2, 1, 1)
