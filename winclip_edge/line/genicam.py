"""GenICam line cameras (GigE Vision, USB3 Vision) through Aravis: find them, set their features, acquire frames.

Aravis is a vendor-neutral GenICam library in C; Python reaches it through GObject introspection (PyGObject and
the ``Aravis-0.8`` typelib: Debian/Ubuntu ``gir1.2-aravis-0.8``, also on a Jetson; docs/cameras.md). It is imported
here only, lazily, when a camera is listed or opened.

- :func:`list_cameras` / :func:`find_camera`: what discovery finds; a camera is named by its device id, its serial
  number, its IP address or its MAC (physical id); an empty name is the first camera found.
- :class:`GenicamCamera`: one open camera. Features from the station file are checked against what the camera
  offers (names, ranges, increments, enumeration entries), written in their order and read back; the trigger mode
  follows from them (``TriggerMode=On`` with ``TriggerSource=Software``: software trigger; with a line:
  hardware trigger; otherwise free-running). :meth:`GenicamCamera.grab` returns one buffer as RGB plus the
  camera's frame id and timestamp, or says why it is incomplete.
- :class:`GenicamSource`: a camera in its own thread feeding a :class:`FrameBuffer` like the other live sources
  (drop policy, back-off reconnects); incomplete buffers are counted and dropped, never scored; in a triggered
  mode each buffer belongs to the oldest part announced by :meth:`GenicamSource.trigger` / :meth:`expect`.
"""
from __future__ import annotations

import difflib
import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Iterable, Mapping, Union

import numpy as np

from ..names import suggest_name
from .pixels import PixelFormatError, format_name, to_rgb
from .plugins import SourcePlugin
from .sources import Frame, FrameBuffer, SourceError, VideoOptions

log = logging.getLogger("winclip_edge.line")

GENICAM_PREFIX = "genicam:"
FeatureValue = Union[str, int, float, bool]
# Older (GigE Vision 1.x era) and SFNC names of the same quantity, same unit: the station file may use either.
ALIASES = {"ExposureTime": "ExposureTimeAbs", "ExposureTimeAbs": "ExposureTime",
           "AcquisitionFrameRate": "AcquisitionFrameRateAbs", "AcquisitionFrameRateAbs": "AcquisitionFrameRate",
           "Gain": "GainAbs", "GainAbs": "Gain"}
TRIGGER_OFF, TRIGGER_SOFTWARE, TRIGGER_HARDWARE = "off", "software", "hardware"
INSTALL = ("apt-get install gir1.2-aravis-0.8 (and aravis-tools for arv-fake-gv-camera-0.8), then "
           "pip install 'winclip-edge[genicam]' (PyGObject; its build needs libgirepository1.0-dev libcairo2-dev "
           "pkg-config) or use the system python3-gi")
POLL_S = 0.1  # how long one wait for a buffer lasts, so that stop() and a lost camera are seen quickly


class CameraError(SourceError):
    """A GenICam camera that cannot be found, opened or configured (the message names the camera and feature)."""


class CameraNotFound(CameraError):
    """No camera of that name answers now (it may later: a live source retries with back-off)."""


def aravis() -> Any:
    """The Aravis module (GObject introspection), imported on first use."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError) as err:
        raise CameraError(f"genicam: sources need Aravis 0.8 for Python ({err}): {INSTALL}") from None
    return Aravis


def _glib_error() -> type[BaseException]:
    from gi.repository import GLib

    return GLib.Error


def _message(err: BaseException) -> str:
    return getattr(err, "message", None) or str(err)


# ------------------------------------------------------------------------------------------------ discovery
@dataclass(frozen=True)
class CameraInfo:
    """One camera as discovery reports it."""

    id: str  # Aravis's device id (vendor-model-serial for GigE Vision), unique on the machine
    serial: str
    address: str  # IP address (GigE Vision); '' for USB3 Vision
    physical_id: str  # MAC address (GigE Vision) or USB path
    vendor: str
    model: str
    protocol: str  # GigEVision | USB3Vision | Fake

    def names(self) -> tuple[str, ...]:
        """The names this camera answers to in ``genicam:NAME``."""
        return tuple(n for n in (self.id, self.serial, self.address, self.physical_id) if n)

    def line(self) -> str:
        return (f"{self.id}  serial {self.serial or '-'}  address {self.address or '-'}  "
                f"{self.vendor} {self.model} ({self.protocol})")


def list_cameras() -> list[CameraInfo]:
    """Every camera discovery finds now (GigE Vision broadcast on every interface, USB3 Vision enumeration)."""
    arv = aravis()
    arv.update_device_list()
    found = []
    for i in range(arv.get_n_devices()):
        address = arv.get_device_address(i) or ""
        found.append(CameraInfo(id=arv.get_device_id(i) or "", serial=arv.get_device_serial_nbr(i) or "",
                                address=address.split(":")[0], physical_id=arv.get_device_physical_id(i) or "",
                                vendor=arv.get_device_vendor(i) or "", model=arv.get_device_model(i) or "",
                                protocol=arv.get_device_protocol(i) or ""))
    return found


def find_camera(target: str, cameras: Iterable[CameraInfo] | None = None) -> CameraInfo:
    """The camera named ``target`` (device id, serial number, IP address or MAC; '' = the first one found)."""
    cameras = list(list_cameras() if cameras is None else cameras)
    if not cameras:
        raise CameraNotFound(f"genicam:{target}: no GenICam camera found (GigE Vision: same subnet and a firewall open "
                          "for UDP 3956; USB3 Vision: udev rules)")
    if not target:
        return cameras[0]
    exact = [c for c in cameras if target in c.names()]
    if not exact:
        exact = [c for c in cameras if target.lower() in (n.lower() for n in c.names())]
    if len(exact) == 1:
        return exact[0]
    listing = "; ".join(c.line() for c in cameras)
    if exact:
        raise CameraError(f"genicam:{target} names {len(exact)} cameras; use a device id: {listing}")
    raise CameraNotFound(f"genicam:{target}: no such camera (a device id, serial number, IP address or MAC); "
                      f"found: {listing}")


def camera_target(spec: str) -> str:
    """The camera name of a ``genicam:NAME`` source spec ('' = the first camera)."""
    if not spec.startswith(GENICAM_PREFIX):
        raise CameraError(f"{spec}: a GenICam source spec starts with {GENICAM_PREFIX}")
    return spec[len(GENICAM_PREFIX):].strip()


# ------------------------------------------------------------------------------------------------ features
@dataclass(frozen=True)
class FeatureInfo:
    """A camera feature as `winclip-edge cameras --features` shows it."""

    name: str
    kind: str  # integer | float | enumeration | boolean | string | command
    access: str  # rw | ro | wo | ...
    value: str | None
    allowed: str  # range (with increment) or entries; '' when the camera says nothing

    def line(self) -> str:
        shown = "" if self.value is None else f" = {self.value}"
        return f"{self.name} ({self.kind}, {self.access}){shown}" + (f"  [{self.allowed}]" if self.allowed else "")


def feature_names(genicam: Any) -> list[str]:
    """The user-facing features of a camera's GenICam document, in document order: the value and command nodes
    (Integer, Float, Enumeration, Boolean, Command, String) and whatever a category lists, not the invisible
    ones. The registers and converters behind them are left out."""
    arv = aravis()
    kinds = (arv.GcIntegerNode, arv.GcFloatNode, arv.GcEnumeration, arv.GcBoolean, arv.GcCommand, arv.GcStringNode,
             arv.GcStringRegNode)
    nodes, listed = [], set()
    node = genicam.get_document_element().get_first_child()
    while node is not None:
        if isinstance(node, arv.GcCategory):
            listed.update(node.get_features() or [])
        elif isinstance(node, arv.GcFeatureNode) and node.get_name():
            nodes.append((node.get_name(), isinstance(node, kinds), node.get_visibility() == arv.GcVisibility.INVISIBLE))
        node = node.get_next_sibling()
    # no wrapper of a node may outlive this call: the document owns its nodes
    return [name for name, kind, invisible in nodes if (kind or name in listed) and not invisible]


def _kind(arv: Any, node: Any) -> str:
    for cls, kind in ((arv.GcEnumeration, "enumeration"), (arv.GcBoolean, "boolean"), (arv.GcCommand, "command"),
                      (arv.GcFloat, "float"), (arv.GcInteger, "integer"), (arv.GcString, "string")):
        if isinstance(node, cls):
            return kind
    return type(node).__name__


def _allowed(device: Any, name: str, kind: str) -> str:
    error = _glib_error()
    try:
        if kind == "integer":
            lo, hi = device.get_integer_feature_bounds(name)
            step = device.get_integer_feature_increment(name)
            return f"{lo}..{hi}" + (f" step {step}" if step > 1 else "")
        if kind == "float":
            lo, hi = device.get_float_feature_bounds(name)
            return f"{lo:g}..{hi:g}"
        if kind == "enumeration":
            return ", ".join(device.dup_available_enumeration_feature_values_as_strings(name) or [])
        if kind == "boolean":
            return "true, false"
    except error:
        return ""
    return ""


class CameraFeatures:
    """The features of one open device: described, checked, written and read back by name."""

    def __init__(self, device: Any, camera: str):
        self.arv, self.device, self.camera = aravis(), device, camera
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        if self._names is None:
            try:
                self._names = feature_names(self.device.get_genicam())
            except (_glib_error(), TypeError) as err:
                log.warning("camera %s: cannot list its features (%s)", self.camera, err)
                self._names = []
        return self._names

    def node(self, name: str) -> tuple[str, Any]:
        """``(name the camera uses, node)``: the name itself or its alias, when implemented and available."""
        for candidate in (name, ALIASES.get(name)):
            if candidate is None:
                continue
            node = self.device.get_feature(candidate)
            if node is not None and node.is_implemented() and node.is_available():
                return candidate, node
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        names = self.names()
        offers = (f"; it offers: {', '.join(names)}" if len(names) <= 60 else
                  f"; `winclip-edge cameras --features {self.camera}` lists its {len(names)} features")
        also = f" (nor {ALIASES[name]})" if name in ALIASES else ""
        raise CameraError(f"camera {self.camera} has no feature {name!r}{also}{hint}{offers}")

    def describe(self, name: str) -> FeatureInfo:
        used, node = self.node(name)
        kind = _kind(self.arv, node)
        access = node.get_actual_access_mode().value_nick
        value = None
        if kind != "command" and access in ("rw", "ro"):
            try:
                value = node.get_value_as_string()
            except _glib_error():
                value = None
        return FeatureInfo(used, kind, access, value, _allowed(self.device, used, kind))

    def read(self, name: str) -> FeatureValue:
        used, node = self.node(name)
        kind = _kind(self.arv, node)
        d = self.device
        try:
            if kind == "integer":
                return d.get_integer_feature_value(used)
            if kind == "float":
                return d.get_float_feature_value(used)
            if kind == "boolean":
                return d.get_boolean_feature_value(used)
            return d.get_string_feature_value(used)
        except _glib_error() as err:
            raise CameraError(f"camera {self.camera}: cannot read {used} ({_message(err)})") from None

    def check(self, name: str, value: FeatureValue) -> tuple[str, str, Any]:
        """``(name used, kind, value as written)``; CameraError naming the feature and what it takes."""
        used, node = self.node(name)
        kind = _kind(self.arv, node)
        access = node.get_actual_access_mode().value_nick
        said = f"{name}={value!r}"
        if kind == "command":
            raise CameraError(f"{said}: {used} is a command on camera {self.camera}, not a setting "
                              "(TriggerSoftware is sent by the trigger, not from the station file)")
        if access not in ("rw", "wo"):
            raise CameraError(f"{said}: {used} is read-only on camera {self.camera} (now {self.describe(used).value})")
        allowed = _allowed(self.device, used, kind)
        takes = f"{used} takes {allowed}" if allowed else f"{used} is {kind}"
        if kind == "enumeration":
            entries = self.device.dup_available_enumeration_feature_values_as_strings(used) or []
            if not isinstance(value, str) or value not in entries:
                raise CameraError(f"{said} is not offered by camera {self.camera}: {used} takes one of {', '.join(entries)}")
            return used, kind, value
        if kind == "boolean":
            if not isinstance(value, bool):
                raise CameraError(f"{said}: {used} on camera {self.camera} is a boolean (true or false)")
            return used, kind, value
        if kind == "string":
            return used, kind, str(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CameraError(f"{said}: {takes} on camera {self.camera} (a number)")
        if kind == "integer":
            if value != int(value):
                raise CameraError(f"{said}: {used} on camera {self.camera} is an integer ({allowed})")
            lo, hi = self.device.get_integer_feature_bounds(used)
            step = max(self.device.get_integer_feature_increment(used), 1)
            if not lo <= int(value) <= hi or (int(value) - lo) % step:
                raise CameraError(f"{said} is out of range for camera {self.camera}: {takes}")
            return used, kind, int(value)
        lo, hi = self.device.get_float_feature_bounds(used)
        if not lo <= value <= hi:
            raise CameraError(f"{said} is out of range for camera {self.camera}: {takes}")
        return used, kind, float(value)

    def set(self, name: str, value: FeatureValue) -> FeatureValue:
        """Check, write and read back one feature; the value read back (a float may be rounded by the camera)."""
        used, kind, written = self.check(name, value)
        d = self.device
        try:
            if kind == "integer":
                d.set_integer_feature_value(used, written)
            elif kind == "float":
                d.set_float_feature_value(used, written)
            elif kind == "boolean":
                d.set_boolean_feature_value(used, written)
            else:
                d.set_string_feature_value(used, written)
        except _glib_error() as err:
            raise CameraError(f"camera {self.camera} refused {name}={value!r} ({_message(err)}); "
                              f"{used} takes {_allowed(d, used, kind) or kind}") from None
        back = self.read(used)
        if kind != "float" and back != written:
            raise CameraError(f"camera {self.camera} took {name}={value!r} but reads back {back!r}")
        return back


def trigger_kind(features: Mapping[str, FeatureValue]) -> str:
    """off | software | hardware, from the station file's TriggerMode / TriggerSource / TriggerSelector."""
    if str(features.get("TriggerMode", "Off")) != "On":
        return TRIGGER_OFF
    selector = features.get("TriggerSelector", "FrameStart")
    if selector != "FrameStart":
        raise CameraError(f"TriggerSelector={selector!r}: one frame per trigger needs TriggerSelector=FrameStart")
    if "TriggerSource" not in features:
        raise CameraError("TriggerMode=On needs a TriggerSource: Software, or the input line (Line0, Line1, ...)")
    return TRIGGER_SOFTWARE if features["TriggerSource"] == "Software" else TRIGGER_HARDWARE


# ------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class GenicamOptions:
    """How a GenICam camera is opened and read: the keys of a ``genicam:`` source's ``[[sources]]`` table
    (docs/cameras.md). ``features`` are written in their order, after the camera is put in a known state (all
    triggers off, continuous acquisition, trigger selector FrameStart); given as a mapping (a station file's
    ``[sources.features]`` table) or (name, value) pairs, held as pairs. The buffer, drop and reconnect keys are
    those of the other live sources (``VideoOptions``, whose defaults they take): :attr:`live`."""

    features: Mapping[str, FeatureValue] = ()  # e.g. {"PixelFormat": "BayerRG8", "ExposureTime": 5000}
    packet_socket: bool = True  # GigE Vision: Aravis's packet-socket receive path (False: plain UDP sockets)
    packet_resend: bool = True  # GigE Vision: ask the camera to resend lost packets
    stream_buffers: int = 8  # buffers queued in the Aravis stream (the camera's side of the frame buffer)
    stall_s: float = 2.0  # no buffer for this long: the camera is probed; no answer = lost, reconnect
    fps_limit: float = VideoOptions.fps_limit  # free-running: at most this many frames/s (0 = all)
    every_nth: int = VideoOptions.every_nth  # free-running: keep frames 0, n, 2n, ... of the capture
    drop: str = VideoOptions.drop  # "oldest": keep the newest frames when the engine falls behind; "none": wait
    buffer: int = VideoOptions.buffer  # frames waiting for the engine
    reconnect_min_s: float = VideoOptions.reconnect_min_s  # back-off after a lost camera, doubled up to the max
    reconnect_max_s: float = VideoOptions.reconnect_max_s

    def __post_init__(self) -> None:
        pairs = tuple((self.features.items() if isinstance(self.features, Mapping) else self.features) or ())
        for pair in pairs:
            if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], (str, int, float, bool)):
                raise CameraError(f"a camera feature is a name and a value (text, number or boolean), got {pair!r}")
        if len({name for name, _ in pairs}) != len(pairs):
            raise CameraError(f"a camera feature is set twice: {[n for n, _ in pairs]}")
        object.__setattr__(self, "features", tuple((name, value) for name, value in pairs))
        if self.stream_buffers < 1:
            raise CameraError(f"stream_buffers must be >= 1, got {self.stream_buffers}")
        if not self.stall_s > 0:
            raise CameraError(f"stall_s must be > 0, got {self.stall_s}")
        self.live  # refuses a bad buffer, drop policy, rate or back-off as every live source does
        trigger_kind(dict(pairs))  # refuses an incomplete trigger setup before any camera is opened

    @property
    def live(self) -> VideoOptions:
        """The live-source policy of these options (buffer, drop, fps_limit / every_nth, reconnect back-off)."""
        return VideoOptions(fps_limit=self.fps_limit, every_nth=self.every_nth, drop=self.drop, buffer=self.buffer,
                            reconnect_min_s=self.reconnect_min_s, reconnect_max_s=self.reconnect_max_s)

    @property
    def trigger(self) -> str:
        return trigger_kind(dict(self.features))


@dataclass(frozen=True)
class Grab:
    """One buffer from the camera: an RGB image when complete, otherwise why not (``status``)."""

    status: str  # success | missing-packets | timeout | size-mismatch | aborted | ... | unconvertible
    image: np.ndarray | None
    frame_id: int  # the camera's frame (block) id; GigE Vision 1.x wraps at 65535
    timestamp_ns: int  # the camera's timestamp in ns
    arrived_ns: int  # host wall clock when the buffer arrived, ns since the epoch
    pixel_format: str
    width: int
    height: int
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.status == "success" and self.image is not None


# ------------------------------------------------------------------------------------------------ one camera
class GenicamCamera:
    """One open GenICam camera, configured from ``options``. Not thread-safe, except :meth:`software_trigger`
    (Aravis serialises control-channel commands) and ``lost`` (set by Aravis's heartbeat thread)."""

    def __init__(self, target: str = "", options: GenicamOptions = GenicamOptions()):
        arv = self.arv = aravis()
        self.options, self.target = options, target
        self.info = find_camera(target)
        self.name = self.info.id
        error = _glib_error()
        try:
            # GigE Vision by address: Aravis then talks to it from the interface that reaches it (by id, without a
            # fresh discovery, it may pick another interface, whose packet socket never sees the frames)
            self._camera = arv.Camera.new(self.info.address or self.info.id)
        except error as err:
            raise CameraNotFound(f"camera {self.info.id}: cannot open it ({_message(err)}); is another program "
                              "controlling it?") from None
        self._device = self._camera.get_device()
        self.lost = threading.Event()
        self._handler = self._device.connect("control-lost", lambda *_: self.lost.set())
        self._stream: Any = None
        self.features = CameraFeatures(self._device, self.info.id)
        self.trigger = options.trigger
        try:
            self.settings = self._configure()
            self.pixel_format = format_name(str(self.features.read("PixelFormat")))
        except PixelFormatError as err:
            self.close()
            raise CameraError(f"camera {self.info.id}: {err}") from None
        except BaseException:
            self.close()
            raise

    @property
    def is_gige(self) -> bool:
        return bool(self._camera.is_gv_device())

    def _configure(self) -> dict[str, FeatureValue]:
        """A known state, then the station's features in their order; every value read back and logged."""
        error = _glib_error()
        features = self.features
        try:
            if self._camera.is_software_trigger_supported() or features.device.get_feature("TriggerMode"):
                self._camera.clear_triggers()
        except error as err:
            log.warning("camera %s: cannot clear its triggers (%s)", self.name, _message(err))
        wanted = dict(self.options.features)
        state: list[tuple[str, FeatureValue]] = []
        for name, value in (("AcquisitionMode", "Continuous"), ("TriggerSelector", "FrameStart")):
            if name not in wanted and features.device.get_feature(name) is not None:
                state.append((name, value))
        if "TriggerMode" not in wanted and features.device.get_feature("TriggerMode") is not None:
            state.append(("TriggerMode", "Off"))
        settings: dict[str, FeatureValue] = {}
        asked = [*state, *self.options.features]
        for name, value in asked:
            settings[name] = features.set(name, value)
        for name, value in asked:  # once all are set: a refused feature is then the one line said about them
            back = settings[name]
            log.info("camera %s: %s = %r%s", self.name, name, back, "" if back == value else f" (asked {value!r})")
        if self.is_gige:
            arv = self.arv
            self._camera.gv_set_stream_options(arv.GvStreamOption.NONE if self.options.packet_socket
                                               else arv.GvStreamOption.PACKET_SOCKET_DISABLED)
        return settings

    def start(self) -> None:
        """Create the stream, queue its buffers, start acquisition."""
        arv, error = self.arv, _glib_error()
        try:
            stream = self._camera.create_stream(None, None)
            if self.is_gige:
                stream.set_property("packet-resend", arv.GvStreamPacketResend.ALWAYS if self.options.packet_resend
                                    else arv.GvStreamPacketResend.NEVER)
            payload = self._camera.get_payload()
            for _ in range(self.options.stream_buffers):
                stream.push_buffer(arv.Buffer.new_allocate(payload))
            self._stream = stream
            self._camera.start_acquisition()
        except error as err:
            raise CameraError(f"camera {self.name}: cannot start acquisition ({_message(err)})") from None
        log.info("camera %s: acquiring (%s, %s, packet socket %s)", self.name, self.pixel_format,
                 f"trigger {self.trigger}", "on" if self.options.packet_socket else "off")

    def grab(self, timeout_s: float) -> Grab | None:
        """The next buffer, or None when none came within ``timeout_s``. The buffer goes back to the stream."""
        buffer = self._stream.timeout_pop_buffer(max(int(timeout_s * 1e6), 1))
        if buffer is None:
            return None
        arv = self.arv
        try:
            status = buffer.get_status()
            code = buffer.get_image_pixel_format()
            fields = dict(frame_id=buffer.get_frame_id(), timestamp_ns=buffer.get_timestamp(),
                          arrived_ns=buffer.get_system_timestamp() or time.time_ns(),
                          width=buffer.get_image_width(), height=buffer.get_image_height())
            try:
                shown = format_name(code)
            except PixelFormatError:
                shown = f"0x{code:08X}"
            if status != arv.BufferStatus.SUCCESS:
                return Grab(status.value_nick, None, pixel_format=shown, **fields)
            if buffer.get_payload_type() not in (arv.BufferPayloadType.IMAGE, arv.BufferPayloadType.CHUNK_DATA,
                                                 arv.BufferPayloadType.EXTENDED_CHUNK_DATA):
                return Grab("not-an-image", None, pixel_format=shown, error=f"payload {buffer.get_payload_type()}",
                            **fields)
            try:
                x_padding = buffer.get_image_padding()[0]
                image = to_rgb(buffer.get_image_data(), fields["width"], fields["height"], code, x_padding)
            except PixelFormatError as err:
                return Grab("unconvertible", None, pixel_format=shown, error=str(err), **fields)
            return Grab("success", image, pixel_format=shown, **fields)
        finally:
            self._stream.push_buffer(buffer)

    def software_trigger(self) -> None:
        try:
            self._camera.software_trigger()
        except _glib_error() as err:
            raise CameraError(f"camera {self.name}: the software trigger failed ({_message(err)})") from None

    def probe(self) -> bool:
        """Does the camera still answer on its control channel?"""
        if self.lost.is_set():
            return False
        try:
            self._camera.get_payload()
            return True
        except _glib_error():
            return False

    def statistics(self) -> dict[str, int]:
        """Aravis's stream counters (completed, failures, underruns) where it has a stream."""
        if self._stream is None:
            return {}
        completed, failures, underruns = self._stream.get_statistics()
        return {"completed": completed, "failures": failures, "underruns": underruns}

    def close(self) -> None:
        """Stop acquisition (errors ignored: the camera may be gone) and release the camera."""
        if getattr(self, "_camera", None) is None:
            return
        if self._stream is not None:
            try:
                self._camera.stop_acquisition()
            except _glib_error():
                pass
            self._stream.set_emit_signals(False)
        try:
            self._device.disconnect(self._handler)
        except (TypeError, ValueError):
            pass
        if getattr(self, "features", None) is not None:
            self.features.device = None  # nothing may keep the device (and its heartbeat, holding control) alive
        self._stream = self._device = self._camera = None


def camera_features(target: str = "") -> tuple[CameraInfo, list[FeatureInfo]]:
    """Every user-facing feature of a camera, with its value and what it takes (`winclip-edge cameras --features`)."""
    arv = aravis()
    info = find_camera(target)
    try:
        camera = arv.Camera.new(info.address or info.id)
    except _glib_error() as err:
        raise CameraError(f"camera {info.id}: cannot open it ({_message(err)})") from None
    features = CameraFeatures(camera.get_device(), info.id)
    out = []
    for name in features.names():
        try:
            out.append(features.describe(name))
        except CameraError:  # not available in the camera's present state
            continue
    return info, out


# ------------------------------------------------------------------------------------------------ the source
@dataclass
class CameraFrame(Frame):
    """A frame of a GenICam camera: the live-source frame plus what the camera says about it."""

    camera_frame_id: int = 0
    camera_timestamp_ns: int = 0
    pixel_format: str = ""
    part_id: str | None = None  # the part announced for this trigger (triggered modes), else None

    def row_fields(self) -> dict[str, Any]:
        return {"camera_frame_id": self.camera_frame_id, "camera_timestamp_ns": self.camera_timestamp_ns}


@dataclass(frozen=True)
class MissedPart:
    """A part whose trigger brought no complete frame (its buffer was incomplete, or the camera went away)."""

    part_id: str | None
    reason: str


class GenicamSource:
    """A GenICam camera in its own thread, a live source like ``VideoSource`` (``name``, ``kind``, ``finite``,
    ``buffer``, ``captured``, ``emitted``, ``reconnects``, ``check``/``start``/``stop``/``join``).

    ``captured`` counts every buffer (complete or not) and gives the frame index; ``incomplete`` the buffers
    dropped unscored (by status in ``incomplete_by_status``). In a triggered mode each buffer takes the oldest
    announced part; ``on_missed`` hears of parts that got no complete frame."""

    kind = "genicam"
    finite = False

    def __init__(self, target: str, name: str, options: GenicamOptions = GenicamOptions(),
                 camera_factory: Callable[[str, GenicamOptions], GenicamCamera] = GenicamCamera,
                 on_missed: Callable[[MissedPart], None] | None = None):
        self.target, self.name, self.options = target, name, options
        self._factory, self.on_missed = camera_factory, on_missed
        live = options.live
        self.buffer = FrameBuffer(live.buffer, drop_oldest=live.drop == "oldest")
        self.captured = self.emitted = self.reconnects = self.incomplete = 0
        self.incomplete_by_status: Counter = Counter()
        self.settings: dict[str, FeatureValue] = {}
        self.camera_id: str | None = None
        self.connected = threading.Event()
        self.trigger_mode = options.trigger
        self._parts: Deque[str | None] = deque()
        self._lock = threading.Lock()
        self._camera: GenicamCamera | None = None  # opened by check(), or by the thread
        self._live: GenicamCamera | None = None  # acquiring now (for trigger())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"winclip-source-{name}", daemon=True)

    # ---- the live-source interface
    def check(self) -> None:
        """Refuse bad options before the run: Aravis missing, or a feature the camera does not take. A camera not
        there yet is not an error (it is retried with back-off once the source runs)."""
        aravis()
        try:
            self._camera = self._factory(self.target, self.options)
        except CameraNotFound as err:
            log.warning("source %s: %s; retried once running", self.name, err)
        except CameraError as err:
            raise CameraError(f"source {self.name}: {err}") from None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop capturing; frames already buffered are still inspected."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ---- triggers
    def trigger(self, part_id: str | None = None) -> None:
        """Software trigger: the camera takes one frame, which carries ``part_id``."""
        if self.trigger_mode != TRIGGER_SOFTWARE:
            raise CameraError(f"source {self.name}: a software trigger needs TriggerMode=On and TriggerSource=Software "
                              f"(this camera is {self.trigger_mode})")
        with self._lock:
            camera = self._live
            if camera is None:
                raise CameraError(f"source {self.name}: the camera is not connected (reconnecting)")
            self._parts.append(part_id)
            try:
                camera.software_trigger()
            except CameraError:
                self._parts.pop()
                raise

    def expect(self, part_id: str | None) -> None:
        """Hardware trigger: announce the part the next triggered frame belongs to (parts queue in order)."""
        if self.trigger_mode != TRIGGER_HARDWARE:
            raise CameraError(f"source {self.name}: expect() is for a hardware trigger (this camera is {self.trigger_mode})")
        with self._lock:
            self._parts.append(part_id)

    def _next_part(self) -> str | None:
        if self.trigger_mode == TRIGGER_OFF:
            return None
        with self._lock:
            return self._parts.popleft() if self._parts else None

    def _missed(self, part_id: str | None, reason: str) -> None:
        log.warning("source %s: part %s got no complete frame (%s)", self.name, part_id, reason)
        if self.on_missed is not None:
            self.on_missed(MissedPart(part_id, reason))

    # ---- the capture thread
    def _backoff(self, delay: float, why: str) -> float:
        self.reconnects += 1
        log.warning("source %s: %s; reconnecting in %.1f s (reconnect #%d)", self.name, why, delay, self.reconnects)
        self._stop.wait(delay)
        return min(delay * 2, self.options.live.reconnect_max_s)

    def _run(self) -> None:
        live = self.options.live
        delay = live.reconnect_min_s
        try:
            while not self._stop.is_set():
                camera, self._camera = self._camera, None
                try:
                    if camera is None:
                        camera = self._factory(self.target, self.options)
                    self.settings, self.camera_id = dict(camera.settings), camera.name
                    camera.start()
                except CameraError as err:
                    if camera is not None:
                        camera.close()
                    delay = self._backoff(delay, str(err))
                    continue
                with self._lock:
                    self._live = camera
                self.connected.set()
                delay = live.reconnect_min_s  # a camera that came back starts the back-off afresh
                try:
                    why = self._acquire(camera)
                finally:
                    with self._lock:
                        self._live = None
                        pending, self._parts = list(self._parts), deque()
                    self.connected.clear()
                    camera.close()
                for part in pending:
                    self._missed(part, "the source stopped before its frame came" if why is None else
                                 f"the camera was lost before its frame came ({why})")
                if self._stop.is_set() or why is None:
                    return
                delay = self._backoff(delay, why)
        finally:
            if self._camera is not None:
                self._camera.close()
            self.buffer.close()

    def _acquire(self, camera: GenicamCamera) -> str | None:
        """Read buffers until stopped (None) or the camera is lost (why)."""
        live = self.options.live
        period = 1.0 / live.fps_limit if live.fps_limit and self.trigger_mode == TRIGGER_OFF else 0.0
        every = live.every_nth if self.trigger_mode == TRIGGER_OFF else 1
        last_frame, last_emit, warned = time.monotonic(), -math.inf, False
        while not self._stop.is_set():
            if camera.lost.is_set():
                return "the camera stopped answering (control lost)"
            grab = camera.grab(POLL_S)
            now = time.monotonic()
            if grab is None:
                if now - last_frame > self.options.stall_s:
                    if not camera.probe():
                        return "the camera stopped answering"
                    if self.trigger_mode == TRIGGER_OFF and not warned:
                        log.warning("source %s: no frame for %.1f s although the camera answers (GigE Vision on "
                                    "loopback or a virtual interface: try packet_socket = false)",
                                    self.name, now - last_frame)
                        warned = True
                    last_frame = now
                continue
            last_frame, warned = now, False
            index = self.captured
            self.captured += 1
            part = self._next_part()
            if not grab.complete:
                self.incomplete += 1
                self.incomplete_by_status[grab.status] += 1
                log.warning("source %s: frame %d (camera frame id %d) %s%s; dropped, not scored", self.name, index,
                            grab.frame_id, grab.status, f": {grab.error}" if grab.error else "")
                if self.trigger_mode != TRIGGER_OFF:
                    self._missed(part, f"frame {grab.frame_id} {grab.status}")
                continue
            if index % every:
                continue
            if period and now - last_emit < period:
                continue
            last_emit = now
            arrived = grab.arrived_ns / 1e9
            captured_mono = now - max(time.time() - arrived, 0.0)  # when it arrived, on the monotonic clock
            frame = CameraFrame(self.name, index, arrived, captured_mono, image=grab.image,
                                camera_frame_id=grab.frame_id, camera_timestamp_ns=grab.timestamp_ns,
                                pixel_format=grab.pixel_format, part_id=part)
            if not self.buffer.put(frame):
                return None
            self.emitted += 1
        return None


# ------------------------------------------------------------------------------------------------ the kind
def _create(name: str, target: str, options: GenicamOptions) -> GenicamSource:
    return GenicamSource(target.strip(), name, options)


GENICAM_SOURCE = SourcePlugin(
    "genicam", GENICAM_PREFIX, GenicamOptions, _create,
    default_name=lambda target, i: suggest_name(target.strip()) if target.strip() else "genicam",
    requires=("gi",), install=INSTALL)
"""``genicam:ID`` sources (registry.py lists it with the built-ins): ID = device id, serial number, IP or MAC."""
