"""The line controller's view of a real station: :class:`StationController` implements the StationControl protocol
(winclip_edge/control.py) over a wired station (build.py's LineStation), for the OPC UA face, the MQTT trigger topic and the
HTTP trigger endpoint alike.

State (OPC 40100-1, docs/line.md "OPC UA"): loading the bundle and the engine = Preoperational; the engine's last
call failed = Error with its reason (until a call or a probe succeeds); halted or shutting down = Halted;
otherwise Operational with no recipe prepared = Initialized, a triggered part in flight = SingleExecution,
free-running sources inspected = ContinuousExecution, else Ready. Recipes are the bundle's products; preparing
one re-reads its files through the catalog's atomic reload and selects it for the sources (a frame is scored
wholly by the old or wholly by the new product, none is lost).
"""
from __future__ import annotations

import datetime as _dt
import logging
import threading
from typing import Any, Sequence

from ..errors import WinclipError
from ..control import Command, ControlRefused, Recipe, StationState, Trigger, VisionState

log = logging.getLogger("winclip_edge.line")

LOADING, RUNNING, STOPPING = "loading", "running", "stopping"


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return _dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class StationController:
    """StationControl of a LineStation (see the module docstring). Made before the engine loads (so the line sees
    Preoperational), attached to the station once it is wired."""

    def __init__(self, reason: str = "loading the bundle and the engine"):
        self._line: Any = None
        self._phase, self._reason = LOADING, reason
        self._halted = ""
        self._lock = threading.Lock()  # prepare / command, one at a time

    def attach(self, line: Any) -> None:
        self._line = line

    def running(self) -> None:
        self._phase = RUNNING

    def stopping(self) -> None:
        self._phase = STOPPING

    # ---- read every poll
    def state(self) -> StationState:
        line = self._line
        if self._phase == LOADING or line is None:
            return StationState(VisionState.PREOPERATIONAL, self._reason)
        station = line.station
        if self._phase == STOPPING or station.stopping:
            return StationState(VisionState.HALTED, "shutting down")
        if station.halted:
            return StationState(VisionState.HALTED, self._halted)
        failure = line.watch.failure if line.watch is not None else None
        if failure is not None:
            return StationState(VisionState.ERROR, failure)
        if station.product is None:
            return StationState(VisionState.INITIALIZED)
        if station.tracker.in_flight():
            return StationState(VisionState.SINGLE_EXECUTION)
        if station.continuous and station.sources:
            return StationState(VisionState.CONTINUOUS_EXECUTION)
        return StationState(VisionState.READY)

    def recipes(self) -> Sequence[Recipe]:
        line = self._line
        if line is None:
            return ()
        catalog, selected = line.catalog, line.station.product
        return [Recipe(p, p == selected, _epoch(catalog.info(p).loaded_at)) for p in catalog.products]

    # ---- calls
    def _running(self) -> Any:
        if self._line is None or self._phase != RUNNING:
            raise ControlRefused("the station is " + ("still loading" if self._phase == LOADING else "stopping"))
        return self._line

    def prepare(self, recipe: str) -> None:
        line = self._running()
        if recipe not in line.catalog.products:
            raise KeyError(f"unknown recipe {recipe!r}; this station serves {line.catalog.products}")
        with self._lock:
            try:
                inspector = line.catalog.reload(recipe)  # a complete new Inspector, or the old one stays
            except WinclipError as err:
                raise ControlRefused(f"recipe {recipe} cannot be prepared ({err}); the previous files stay in use") \
                    from None
            line.batchers[recipe].inspector = inspector  # the next batch is scored with it
            line.station.select(recipe)
        log.info("recipe %s prepared (its files read again); the sources inspect it", recipe)

    def unprepare(self, recipe: str) -> None:
        line = self._running()
        if recipe not in line.catalog.products:
            raise KeyError(f"unknown recipe {recipe!r}; this station serves {line.catalog.products}")
        with self._lock:
            if line.station.product == recipe:
                line.station.select(None)
                log.info("recipe %s unprepared: free-running frames wait for a recipe, triggers must name one", recipe)

    def trigger(self, trigger: Trigger) -> Any:
        """Take a part (the station journals it before this returns: the acknowledgement)."""
        return self._running().station.trigger(trigger)

    def command(self, command: Command, cause: str) -> None:
        line = self._running()
        station = line.station
        with self._lock:
            if command is Command.HALT:
                self._halted = f"halted by the line controller ({cause})"
                station.halt(True)
            elif command is Command.RESET:
                station.halt(False)
                line.probe()  # an engine that failed is tried again at once
            elif command is Command.START_CONTINUOUS:
                if not station.sources:
                    raise ControlRefused("no free-running source: this station inspects triggered parts and uploads")
                if station.product is None:
                    raise ControlRefused("no recipe is prepared")
                station.continuous = True
            elif command is Command.STOP:
                station.continuous = False
            elif command is Command.ABORT:
                station.continuous = False
                station.abort(f"aborted by the line controller ({cause})")
            # SelectModeAutomatic: the station has only the automatic mode
        log.info("line controller: %s (%s)", command.value, cause)
