"""Each part's verdict written to a PLC over Modbus TCP (pymodbus), behind the same on-disk spool as MQTT.

:class:`ModbusSink` implements the ``Sink`` protocol of ``line/sinks.py``; wrapped in a ``SpooledSink`` a PLC that
is down loses nothing and gets the writes in order when it is back, also after a restart of the station.
docs/line.md ("Modbus TCP") has the register map. Per verdict the writes go in one order the PLC can rely on: the data
registers, then the coils, then the sequence register **last**; the PLC acts when the sequence register changes.

Exactly one live write per verdict: a retried message (lost answer, reconnect, restart) is written again with
the *same* sequence value, so the PLC sees no new verdict; the value is kept in ``state_file`` so this also holds
across a restart. A verdict past its deadline when it could be written, or a late result of a part that already
got its fail-safe timeout (``late_for``), is logged and counted, never written as a live verdict.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..bundle import json_with_checksum, read_checked_json
from ..errors import WinclipError
from ..fileio import atomic_write_json
from .plugins import SinkContext, SinkPlugin
from .sinks import SinkUnavailable

log = logging.getLogger("winclip_edge.line")

# The result register's codes.
RESULT_NONE, RESULT_PASS, RESULT_FAIL, RESULT_TIMEOUT, RESULT_ERROR = 0, 1, 2, 3, 4
RESULT_CODES = {"pass": RESULT_PASS, "fail": RESULT_FAIL, "timeout": RESULT_TIMEOUT}
NO_SCORE = 0xFFFF  # the score/threshold registers when the row has no number
SEQUENCE_MAX = 0xFFFF  # the sequence register counts 1..65535 and wraps to 1 (0 = nothing written yet)


class ModbusError(WinclipError, ValueError):
    """A register map or Modbus setting that cannot work (overlapping addresses, out of range)."""


@dataclass(frozen=True)
class ModbusMap:
    """Where a verdict goes in the PLC: 0-based Modbus addresses (coil / holding register), None = not written."""

    unit: int = 1  # the Modbus unit (device) id
    accept_coil: int | None = 0  # 1 for a pass
    reject_coil: int | None = 1  # 1 for a fail, a timeout or an error (fail-safe)
    timeout_coil: int | None = 2  # 1 when the reject is the fail-safe timeout
    part_id_register: int | None = 0  # 2 registers: the part id as uint32, high word first
    score_register: int | None = 2  # round(score * 1000), 0..65534; 65535 = no score
    threshold_register: int | None = None  # round(threshold * 1000), same coding
    result_register: int | None = 3  # RESULT_* code
    sequence_register: int = 4  # written last: changes once per verdict (1..65535)

    def registers(self) -> dict[str, tuple[int, int]]:
        """Name -> (first address, width) of every holding register written."""
        spans = {"part_id": (self.part_id_register, 2), "score": (self.score_register, 1),
                 "threshold": (self.threshold_register, 1), "result": (self.result_register, 1),
                 "sequence": (self.sequence_register, 1)}
        return {name: (address, width) for name, (address, width) in spans.items() if address is not None}

    def coils(self) -> dict[str, int]:
        spans = {"accept": self.accept_coil, "reject": self.reject_coil, "timeout": self.timeout_coil}
        return {name: address for name, address in spans.items() if address is not None}

    def check(self) -> None:
        if not 0 <= self.unit <= 247:
            raise ModbusError(f"Modbus unit id {self.unit} is out of range (0-247)")
        used: dict[int, str] = {}
        for name, (address, width) in self.registers().items():
            for a in range(address, address + width):
                if not 0 <= a <= 0xFFFF:
                    raise ModbusError(f"Modbus register {name} at {address} is out of range (0-65535)")
                if a in used:
                    raise ModbusError(f"Modbus registers {used[a]} and {name} overlap at address {a}")
                used[a] = name
        coils: dict[int, str] = {}
        for name, address in self.coils().items():
            if not 0 <= address <= 0xFFFF:
                raise ModbusError(f"Modbus coil {name} at {address} is out of range (0-65535)")
            if address in coils:
                raise ModbusError(f"Modbus coils {coils[address]} and {name} share address {address}")
            coils[address] = name


@dataclass(frozen=True)
class ModbusConfig:
    host: str
    port: int = 502
    map: ModbusMap = field(default_factory=ModbusMap)
    timeout_s: float = 2.0  # one request
    # How long after its deadline a verdict may still be written: the time from the deadline to the reject gate.
    write_grace_ms: float = 500.0
    state_file: str | None = None  # keeps the sequence value of the message being written (exactly-once across
    # a restart); None: in memory (a message retried after a crash can then count as a new verdict)

    def check(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ModbusError(f"Modbus port {self.port} is out of range (1-65535)")
        if self.timeout_s <= 0 or self.write_grace_ms < 0:
            raise ModbusError("the Modbus timeout must be > 0 s and the write grace >= 0 ms")
        self.map.check()


def _epoch(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            moment = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (moment if moment.tzinfo else moment.replace(tzinfo=_dt.timezone.utc)).timestamp()
    return None


def deadline_of(message: Mapping[str, Any]) -> float | None:
    """When the PLC needs this verdict at the latest (seconds since the epoch), or None when it has no deadline:
    ``deadline_at`` (ISO 8601 UTC or epoch seconds), else ``captured_at`` + ``deadline_ms``. The hook of the
    triggered-part flow: the row carries one of the two."""
    deadline = _epoch(message.get("deadline_at"))
    if deadline is not None:
        return deadline
    captured, budget = _epoch(message.get("captured_at")), message.get("deadline_ms")
    if captured is not None and isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return captured + budget / 1000.0
    return None


def part_id_number(part_id: Any) -> int:
    """The part id as the uint32 the PLC gets back: a decimal id 0..4294967295 as itself, anything else 0."""
    if isinstance(part_id, bool):
        return 0
    if isinstance(part_id, int):
        return part_id if 0 <= part_id <= 0xFFFFFFFF else 0
    if isinstance(part_id, str) and part_id.strip().isdigit():
        value = int(part_id.strip())
        return value if value <= 0xFFFFFFFF else 0
    return 0


def milli(value: Any) -> int:
    """A score or threshold as round(value * 1000) in 0..65534 (65535 = no number)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return NO_SCORE
    return min(max(int(round(value * 1000)), 0), NO_SCORE - 1)


def verdict_values(message: Mapping[str, Any], registers: Mapping[str, tuple[int, int]],
                   coils: Mapping[str, int]) -> tuple[dict[int, int], dict[int, bool]]:
    """Register address -> value and coil address -> value of one verdict (the sequence register excluded)."""
    decision = message.get("decision")
    code = RESULT_CODES.get(decision, RESULT_ERROR)  # no decision (an error) is rejected too: fail-safe
    accept = message.get("accept")  # what the station decided to do with the part (a timeout: its on_timeout)
    good = accept if isinstance(accept, bool) else code == RESULT_PASS
    part = part_id_number(message.get("part_id"))
    words = {"part_id": [part >> 16, part & 0xFFFF], "score": [milli(message.get("score"))],
             "threshold": [milli(message.get("threshold"))], "result": [code]}
    values: dict[int, int] = {}
    for name, (address, _width) in registers.items():
        if name != "sequence":
            for offset, word in enumerate(words[name]):
                values[address + offset] = word
    bits = {"accept": good, "reject": not good, "timeout": code == RESULT_TIMEOUT}
    return values, {address: bits[name] for name, address in coils.items()}


def runs(values: Mapping[int, Any]) -> list[tuple[int, list[Any]]]:
    """Values by address as runs of consecutive addresses, ascending: one Modbus write per run."""
    out: list[tuple[int, list[Any]]] = []
    for address in sorted(values):
        if out and out[-1][0] + len(out[-1][1]) == address:
            out[-1][1].append(values[address])
        else:
            out.append((address, [values[address]]))
    return out


class ModbusSink:
    """Writes each verdict to the PLC (see the module docstring); a ``Sink`` for ``SpooledSink``."""

    name = "modbus"

    def __init__(self, config: ModbusConfig, clock: Callable[[], float] = time.time):
        config.check()
        try:
            from pymodbus.client import ModbusTcpClient  # the plc extra, imported when a sink is made
        except ImportError as err:
            raise ModbusError(f"--modbus needs the plc extra: pip install \"winclip-edge[plc]\" ({err})") from None

        self.config, self.clock = config, clock
        self.written = 0  # verdicts written (sequence register confirmed)
        self.stale = 0  # past their deadline when they could be written: not written
        self.late = 0  # late results of parts that already got their timeout: not written
        self.bad = 0  # not a JSON object: not written
        self._client = ModbusTcpClient(config.host, port=config.port, timeout=config.timeout_s, retries=0)
        self._last_sequence: int | None = None  # what the PLC holds, once known
        self._pending: dict[str, Any] | None = None  # {key, digest, sequence} of the message being written
        self._state = Path(config.state_file) if config.state_file else None
        if self._state is not None and self._state.is_file():
            try:
                self._pending = read_checked_json(self._state)
                self._last_sequence = int(self._pending["sequence"])
            except (WinclipError, OSError, ValueError, KeyError, TypeError) as err:
                log.warning("modbus: ignoring %s (%s); the next verdict gets a fresh sequence value", self._state, err)
                self._pending = None

    def open(self) -> None:
        pass  # connects on the first delivery (and again after every failure)

    def close(self) -> None:
        self._client.close()

    # --- the hooks: what is written at all --------------------------------------------------------------------

    def skip_reason(self, message: Mapping[str, Any]) -> tuple[str, str] | None:
        """Why ``message`` must not reach the PLC as a live verdict now, as (counter, text); None: write it."""
        if message.get("late_for"):
            return "late", f"a late result of a part whose timeout ({message['late_for']}) was sent"
        deadline = deadline_of(message)
        if deadline is not None:
            late_s = self.clock() - deadline
            if late_s * 1000.0 > self.config.write_grace_ms:
                return "stale", f"{late_s:.3f} s past its deadline"
        return None

    # --- writing ----------------------------------------------------------------------------------------------

    def deliver(self, key: int, message: bytes, timeout: float) -> None:
        try:
            row = json.loads(message)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            self.bad += 1
            log.error("modbus: message %d is not a result row (%s): not written", key, err)
            return
        skip = self.skip_reason(row)
        if skip is not None:
            counter, reason = skip
            setattr(self, counter, getattr(self, counter) + 1)
            log.warning("modbus: verdict %s (part %r, %s) NOT written to %s:%d: %s", row.get("id"), row.get("part_id"),
                        row.get("decision"), self.config.host, self.config.port, reason)
            return  # handled: the spool forgets it (it is in results.jsonl)
        try:
            self._write(key, message, row)
        except SinkUnavailable:
            self._client.close()
            raise
        except Exception as err:  # pymodbus' ConnectionException, ModbusIOException, timeouts
            self._client.close()
            raise SinkUnavailable(f"modbus {self.config.host}:{self.config.port}: {err}") from None
        self.written += 1

    def _check(self, response: Any, what: str) -> Any:
        if response is None or response.isError():
            raise SinkUnavailable(f"modbus {self.config.host}:{self.config.port}: {what} failed: {response}")
        return response

    def _sequence_for(self, key: int, message: bytes) -> int:
        """The sequence value of this message: the one already chosen when it is a retry, else the next one
        (chosen, and kept in state_file, before anything is written)."""
        digest = hashlib.sha256(message).hexdigest()
        pending = self._pending
        if pending is not None and pending.get("key") == key and pending.get("digest") == digest:
            return int(pending["sequence"])
        mapping = self.config.map
        if self._last_sequence is None:  # first write of this sink: continue from what the PLC holds
            response = self._check(self._client.read_holding_registers(mapping.sequence_register, count=1,
                                                                       device_id=mapping.unit), "reading the sequence")
            self._last_sequence = int(response.registers[0])
        sequence = self._last_sequence % SEQUENCE_MAX + 1
        self._pending = {"key": key, "digest": digest, "sequence": sequence}
        if self._state is not None:
            atomic_write_json(self._state, json_with_checksum(self._pending))
        return sequence

    def _write(self, key: int, message: bytes, row: Mapping[str, Any]) -> None:
        mapping = self.config.map
        if not self._client.connected and not self._client.connect():
            raise SinkUnavailable(f"modbus: cannot connect to {self.config.host}:{self.config.port}")
        sequence = self._sequence_for(key, message)
        registers, coils = verdict_values(row, mapping.registers(), mapping.coils())
        for address, words in runs(registers):
            self._check(self._client.write_registers(address, words, device_id=mapping.unit),
                        f"writing registers {address}..{address + len(words) - 1}")
        for address, bits in runs(coils):
            self._check(self._client.write_coils(address, bits, device_id=mapping.unit),
                        f"writing coils {address}..{address + len(bits) - 1}")
        self._check(self._client.write_register(mapping.sequence_register, sequence, device_id=mapping.unit),
                    "writing the sequence register")
        self._last_sequence = sequence


# ---------------------------------------------------------------- the sink kind (registry.py) and [modbus]
NOT_WRITTEN = -1  # an address of ModbusOptions that is not written (TOML has no null)
STATE_SUFFIX = ".modbus-state.json"


@dataclass(frozen=True)
class ModbusOptions:
    """A PLC in a station file (``[modbus]``, or ``[[sinks]]`` with ``kind = "modbus"``): where it listens, the
    register map (0-based addresses; -1 = not written) and the deadline grace (docs/line.md, "Modbus TCP")."""

    host: str
    port: int = 502
    unit: int = 1
    accept_coil: int = 0
    reject_coil: int = 1
    timeout_coil: int = 2
    part_id_register: int = 0
    score_register: int = 2
    threshold_register: int = NOT_WRITTEN
    result_register: int = 3
    sequence_register: int = 4
    timeout_s: float = 2.0
    write_grace_ms: float = 500.0

    def __post_init__(self) -> None:
        if not self.host:
            raise ModbusError("a modbus sink needs the PLC's host")
        self.config().check()

    def config(self, state_file: str | None = None) -> ModbusConfig:
        def at(address: int) -> int | None:
            return None if address == NOT_WRITTEN else address

        mapping = ModbusMap(unit=self.unit, accept_coil=at(self.accept_coil), reject_coil=at(self.reject_coil),
                            timeout_coil=at(self.timeout_coil), part_id_register=at(self.part_id_register),
                            score_register=at(self.score_register), threshold_register=at(self.threshold_register),
                            result_register=at(self.result_register), sequence_register=self.sequence_register)
        return ModbusConfig(self.host, self.port, mapping, timeout_s=self.timeout_s,
                            write_grace_ms=self.write_grace_ms, state_file=state_file)


def state_file(out: str | None, name: str) -> str | None:
    """The sequence state of sink ``name``: beside its spool folder (``OUT/spool/<name>.modbus-state.json``)."""
    return None if out is None else str(Path(out).resolve() / "spool" / f"{name}{STATE_SUFFIX}")


def _modbus(name: str, options: ModbusOptions, context: SinkContext) -> ModbusSink:
    sink = ModbusSink(options.config(state_file(context.out, name)))
    sink.name = name
    return sink


MODBUS_SINK = SinkPlugin("modbus", ModbusOptions, _modbus, requires=("pymodbus",),
                         install='pip install "winclip-edge[plc]"')


__all__ = ["MODBUS_SINK", "ModbusConfig", "ModbusError", "ModbusMap", "ModbusOptions", "ModbusSink", "deadline_of",
           "milli", "part_id_number",
           "runs", "verdict_values", "RESULT_NONE", "RESULT_PASS", "RESULT_FAIL", "RESULT_TIMEOUT", "RESULT_ERROR",
           "NO_SCORE", "SEQUENCE_MAX"]
