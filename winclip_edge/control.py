"""What a line controller (a PLC, an MES) may ask of a station, as a small typed interface.

The OPC UA face (``line/opcua/``, docs/line.md "OPC UA") drives a station only through :class:`StationControl`:
it reads the station's state and recipes, prepares a recipe, triggers a part and passes the machine commands of
OPC 40100-1 on. Everything here is plain data, so a station implements it without importing an OPC UA library
and the face is tested against a fake station.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from .errors import WinclipError


class VisionState(enum.IntEnum):
    """The states of OPC 40100-1 (VisionStateMachineType §8.2 and its automatic mode §8.3), valued by the
    specification's StateNumber. 1-4 are the top level; 5-8 are the states of the automatic mode, inside
    Operational."""

    PREOPERATIONAL = 1  # starting: loading the bundle and the engine
    HALTED = 2  # stopped on purpose (a Halt command, the station shutting down)
    ERROR = 3  # cannot inspect (the engine failed); the reason says why
    OPERATIONAL = 4  # never reported alone: an operational station is in one of 5-8
    INITIALIZED = 5  # engine loaded, no recipe (product) prepared
    READY = 6  # a recipe is prepared; waiting for a trigger
    SINGLE_EXECUTION = 7  # a triggered part is being captured
    CONTINUOUS_EXECUTION = 8  # free-running sources (cameras, streams) are being inspected

    @property
    def top(self) -> "VisionState":
        """The top-level state (Operational for 5-8)."""
        return VisionState.OPERATIONAL if self >= VisionState.INITIALIZED else self

    @property
    def spec_name(self) -> str:
        """The specification's BrowseName of the state (``SingleExecution``)."""
        return "".join(part.capitalize() for part in self.name.split("_"))


@dataclass(frozen=True)
class StationState:
    """The station's state now and why (``reason``: the engine's error in Error, what loads in Preoperational)."""

    state: VisionState
    reason: str = ""

    def __post_init__(self) -> None:
        if self.state is VisionState.OPERATIONAL:
            raise ValueError("an operational station reports its automatic-mode state (Initialized ... "
                             "ContinuousExecution), not Operational alone")


@dataclass(frozen=True)
class Recipe:
    """One recipe the station can run: a product of the bundle (its recipe id and product id are its name)."""

    id: str
    prepared: bool  # selected for inspection now
    modified_at: float | None = None  # when its files were read (seconds since the epoch)


@dataclass(frozen=True)
class Trigger:
    """A part in front of the camera. ``job_id`` is the face's id for the job; the station puts it on the part's
    result row (``job_id``) so the result event names the job it answers."""

    part_id: str
    product: str | None = None  # None: the prepared recipe
    meas_id: str = ""  # the client's id of the measurement (OPC 40100-1 MeasId), echoed on the result
    job_id: str = ""
    source: str = "opcua"  # which face triggered it


class Command(enum.Enum):
    """The machine commands of OPC 40100-1 (method names of VisionStateMachine and its automatic mode)."""

    HALT = "Halt"
    RESET = "Reset"
    SELECT_MODE_AUTOMATIC = "SelectModeAutomatic"
    START_CONTINUOUS = "StartContinuous"
    STOP = "Stop"
    ABORT = "Abort"


class ControlRefused(WinclipError, RuntimeError):
    """The station cannot do what was asked now (busy, wrong state, queue full); the message says why."""


class PartRefused(ControlRefused):
    """A trigger the station does not take (its part id is in flight or decided already, or it is not an id)."""


MAX_PART_ID = 128


def check_part_id(value: Any) -> str:
    """A part id as text: a string or an integer, 1-128 printable characters without control characters. Every
    face that takes a trigger (OPC UA, HTTP, MQTT, a hot-folder file name) checks it here."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PartRefused(f"a part id is a string or an integer, got {type(value).__name__} {value!r}")
    text = str(value)
    if not text or len(text) > MAX_PART_ID or not text.isprintable() or text != text.strip():
        raise PartRefused(f"part id {text[:40]!r} is not valid: 1-{MAX_PART_ID} printable characters, no leading or "
                          "trailing white space")
    return text


class StationControl(Protocol):
    """The station as a line controller sees it. Calls come from the face's worker threads, never from the
    station's own threads; ``state`` and ``recipes`` are read every poll interval (keep them cheap), the others
    may block (``prepare`` reloads a product) and raise :class:`ControlRefused` (or ``KeyError`` for an unknown
    recipe) to refuse. Results go the other way: the station passes every result row to the face
    (``OpcuaFace.publish``)."""

    def state(self) -> StationState: ...

    def recipes(self) -> Sequence[Recipe]: ...

    def prepare(self, recipe: str) -> None:
        """Select ``recipe`` for inspection through the catalog's atomic reload: no frame lost, none scored by a
        half-switched product."""

    def unprepare(self, recipe: str) -> None: ...

    def trigger(self, trigger: Trigger) -> None:
        """Accept the part (capture, decide once, one result row with its ``part_id``) or raise to refuse."""

    def command(self, command: Command, cause: str) -> None: ...
