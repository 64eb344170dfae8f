"""The station as an OPC UA server, modelled after OPC 40100-1 (OPC UA for Machine Vision, release 1.0): the line's
PLC or MES browses a ``VisionSystem`` object, watches its state machine, prepares recipes, triggers parts and
subscribes to one ``ResultReadyEventType`` event per verdict (docs/line.md, "OPC UA", lists the address space).

The browse names, state numbers, method signatures and event fields are the specification's; the types are this
project's own (namespace :data:`NAMESPACE`), written here rather than loaded from the official nodeset, and the
specification's id structures (PartIdDataType, JobIdDataType, ...) travel as their ``Id`` string so a generic
client calls every method without loading type definitions. What is not implemented is named in the doc.

The server runs its asyncio loop in its own thread; the station talks to it through :class:`StationControl`
(``winclip_edge/control.py``) and :meth:`OpcuaFace.publish`. Blocking station calls (a recipe reload) run on the face's
worker threads, never on the server's loop, so browsing and events go on meanwhile.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import hmac
import json
import logging
import math
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

from asyncua import Node, Server, ua
from asyncua.common.event_objects import TransitionEvent
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen, uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from ...fileio import atomic_write_bytes
from ...control import Command, ControlRefused, Recipe, StationControl, StationState, Trigger, VisionState
from .config import OpcuaConfig, OpcuaError

log = logging.getLogger("winclip_edge.line.opcua")

NAMESPACE = "urn:winclip-edge:opcua:machinevision"
SERVER_CERT, SERVER_KEY = "server_cert.der", "server_key.pem"

# The Error output of every method (OPC 40100-1: 0 = OK, < 0 application-specific).
OK = 0
E_STATE = -1  # the state machine is not in a state that allows the call (e.g. a trigger while not Operational)
E_UNKNOWN_RECIPE = -2  # no such recipe / product
E_REFUSED = -3  # the station refused (busy, queue full, ...): the log says why
E_INTERNAL = -4  # the station failed while handling the call: the log has the traceback

# ResultStateDataType (OPC 40100-1 §12.19)
RESULT_COMPLETED, RESULT_ABORTED, RESULT_FAILED = 1, 3, 4

_TOP = (VisionState.PREOPERATIONAL, VisionState.HALTED, VisionState.ERROR, VisionState.OPERATIONAL)
_AUTO = (VisionState.INITIALIZED, VisionState.READY, VisionState.SINGLE_EXECUTION,
         VisionState.CONTINUOUS_EXECUTION)
_S, _B, _I32, _U32, _D, _T = (ua.VariantType.String, ua.VariantType.Boolean, ua.VariantType.Int32,
                              ua.VariantType.UInt32, ua.VariantType.Double, ua.VariantType.DateTime)
# ResultReadyEventType's fields (§8.3.8.4) as this face fills them; the last five are this project's own.
RESULT_EVENT_FIELDS = (
    ("IsPartial", _B), ("IsSimulated", _B), ("ResultState", _I32), ("MeasId", _S), ("PartId", _S),
    ("ExternalRecipeId", _S), ("InternalRecipeId", _S), ("ProductId", _S), ("ExternalConfigurationId", _S),
    ("InternalConfigurationId", _S), ("JobId", _S), ("CreationTime", _T), ("ResultId", _S),
    ("ResultContent", ua.VariantType.Variant),
    ("Decision", _S), ("Score", _D), ("Threshold", _D), ("OverlayUrl", _S), ("LateFor", _S),
)


def _utc(value: Any) -> _dt.datetime:
    """A row's time (ISO 8601 text or seconds since the epoch) as an aware UTC datetime; now when absent."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _dt.datetime.fromtimestamp(value, _dt.timezone.utc)
    if isinstance(value, str) and value:
        try:
            moment = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return moment if moment.tzinfo else moment.replace(tzinfo=_dt.timezone.utc)
        except ValueError:
            pass
    return _dt.datetime.now(_dt.timezone.utc)


def _number(value: Any) -> float:
    """A score or threshold for a Double field: NaN when the row has none (a failed or timed-out part)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def result_state(row: Mapping[str, Any]) -> int:
    """ResultState of a row: Aborted for a fail-safe timeout, Failed for an error (no score), else Completed (a
    verdict, or a score without a threshold to decide it)."""
    decision = row.get("decision")
    if decision == "timeout":
        return RESULT_ABORTED
    if decision in ("pass", "fail"):
        return RESULT_COMPLETED
    return RESULT_FAILED if row.get("error") or row.get("score") is None else RESULT_COMPLETED


def result_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The event fields (and LastResult variables) of one result row (docs/line.md, "OPC UA", "Results")."""
    product = str(row.get("product") or "")
    return {
        "IsPartial": False, "IsSimulated": False, "ResultState": result_state(row),
        "MeasId": str(row.get("meas_id") or ""), "PartId": str(row.get("part_id") or ""),
        "ExternalRecipeId": product, "InternalRecipeId": product, "ProductId": product,
        "ExternalConfigurationId": "", "InternalConfigurationId": str(row.get("weights_id") or ""),
        "JobId": str(row.get("job_id") or ""),
        "CreationTime": _utc(row.get("decided_at") or row.get("captured_at")),
        "ResultId": str(row.get("id") or ""),
        "ResultContent": [ua.Variant(json.dumps(row, default=str), _S)],
        "Decision": str(row.get("decision") or ""), "Score": _number(row.get("score")),
        "Threshold": _number(row.get("threshold")), "OverlayUrl": str(row.get("overlay_url") or ""),
        "LateFor": str(row.get("late_for") or ""),
    }


def _arg(name: str, vtype: ua.VariantType, description: str, array: bool = False,
         datatype: int | None = None) -> ua.Argument:
    argument = ua.Argument()
    argument.Name = name
    argument.DataType = ua.NodeId(datatype if datatype is not None else vtype.value)
    argument.ValueRank = 1 if array else -1
    argument.ArrayDimensions = [0] if array else []
    argument.Description = ua.LocalizedText(description)
    return argument


_JOB_ARGS = [
    _arg("MeasId", _S, "the client's id of this measurement (may be empty)"),
    _arg("PartId", _S, "the part in front of the camera; the result event carries it as PartId"),
    _arg("RecipeId", _S, "the recipe (product) to inspect it with; empty: the prepared one"),
    _arg("ProductId", _S, "the product (same as RecipeId here); empty: the prepared one"),
    _arg("Parameters", ua.VariantType.Variant, "unused", array=True, datatype=ua.ObjectIds.BaseDataType),
]
_JOB_OUT = [_arg("JobId", _S, "this job's id; the result event carries it"), _arg("Error", _I32, "0 = OK")]
_CAUSE_ARGS = [_arg("Cause", _I32, "why (0 = unspecified)"), _arg("CauseDescription", _S, "why, as text")]
_ERROR_OUT = [_arg("Error", _I32, "0 = OK")]


class _Users(UserManager):
    """Who may open a session: anonymous clients on a loopback endpoint without credentials; otherwise the one
    configured user (password compared in constant time) or a client presenting a trusted certificate."""

    def __init__(self, config: OpcuaConfig, trusted: set[bytes]):
        self.config, self.trusted = config, trusted

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username is not None:
            if not self.config.username:
                return None
            same_user = hmac.compare_digest(username.encode(), self.config.username.encode())
            same_password = hmac.compare_digest((password or "").encode(), (self.config.password or "").encode())
            if same_user and same_password:
                return User(role=UserRole.User, name=username)
            log.warning("opcua: refused user %r (wrong user or password)", username)
            return None
        if self.config.secure:  # only an X509 token gets here (the endpoint accepts no anonymous token)
            if certificate is not None and bytes(certificate) in self.trusted:
                return User(role=UserRole.User, name="certificate")
            log.warning("opcua: refused a client certificate that is not trusted")
            return None
        return User(role=UserRole.User, name="anonymous")


class _SecureSession(InternalSession):
    """A session that activates only on an encrypted channel. asyncua lets a client open a channel without
    security even when no endpoint offers one (and would then take a password in plain text); such a channel has
    no client certificate, so a session on it is refused here."""

    def activate_session(self, params: Any, peer_certificate: bytes | None) -> Any:
        if not peer_certificate:  # None or b"": a channel without security
            log.warning("opcua: refused a session on a channel without security (only Basic256Sha256 "
                        "SignAndEncrypt is served)")
            raise ServiceError(ua.StatusCodes.BadSecurityModeRejected)
        return super().activate_session(params, peer_certificate)


class _SecureServer(InternalServer):
    def create_session(self, name: str, user: User = User(role=UserRole.Anonymous),
                       external: bool = False) -> InternalSession:
        return _SecureSession(self, self.aspace, self.subscription_service, name, user=user, external=external)


def _load_der(path: str) -> bytes:
    """A certificate file (DER or PEM) as DER bytes; a one-line error when it is not a certificate."""
    data = Path(path).read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError as err:
        raise OpcuaError(f"{path} is not an X.509 certificate (DER or PEM): {err}") from None
    return uacrypto.der_from_x509(cert)


def server_certificate(config: OpcuaConfig) -> tuple[Path, Path]:
    """The server's certificate and key files: the configured ones, else a self-signed pair made once in
    ``certificate_dir`` and kept (clients that trusted it keep trusting it after a restart)."""
    if config.certificate and config.private_key:
        return Path(config.certificate), Path(config.private_key)
    if not config.certificate_dir:
        raise OpcuaError("no OPC UA server certificate: give certificate + private_key, or certificate_dir")
    folder = Path(config.certificate_dir)
    cert_path, key_path = folder / SERVER_CERT, folder / SERVER_KEY
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(config.application_uri),
                                     x509.DNSName(socket.gethostname())]
    try:
        import ipaddress

        address = ipaddress.ip_address(config.host.strip("[]"))
        if not address.is_unspecified:
            names.append(x509.IPAddress(address))
    except ValueError:
        names.append(x509.DNSName(config.host))
    cert = cert_gen.generate_self_signed_app_certificate(
        key, config.server_name, {}, names, extended=[ExtendedKeyUsageOID.SERVER_AUTH], days=3650)
    atomic_write_bytes(key_path, cert_gen.dump_private_key_as_pem(key), mode=0o600)
    atomic_write_bytes(cert_path, uacrypto.der_from_x509(cert))
    log.warning("opcua: made a self-signed server certificate %s (clients must trust it once)", cert_path)
    return cert_path, key_path


class OpcuaFace:
    """The OPC UA server of a station (see the module docstring). ``start`` binds and builds the address space
    (raises :class:`OpcuaError` when it cannot); ``stop`` + ``start`` restarts it on the same endpoint with the
    same node ids, so a client reconnects and finds every node where it was."""

    def __init__(self, config: OpcuaConfig, control: StationControl):
        config.check()
        self.config, self.control = config, control
        self.published = 0  # results turned into events (this run of the face)
        self.dropped = 0  # results refused because too many were waiting
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def endpoint(self) -> str:
        return self.config.endpoint

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set() and self._error is None

    # --- the station's side -------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "OpcuaFace":
        if self._thread is not None:
            raise OpcuaError("the OPC UA face is running already")
        self._ready.clear()
        self._error = None
        self._stop = asyncio.Event()  # bound to the server's loop on first use
        self._queue = asyncio.Queue(self.config.max_pending_results)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="winclip-opcua-call")
        self._thread = threading.Thread(target=self._run, name="winclip-opcua", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise OpcuaError(f"the OPC UA server on {self.endpoint} did not start within {timeout:.0f} s")
        if self._error is not None:
            error = self._error
            self.stop()
            if isinstance(error, OSError):
                raise OpcuaError(f"cannot listen on {self.endpoint}: {error.strerror or error}") from None
            if isinstance(error, OpcuaError):
                raise error
            raise OpcuaError(f"the OPC UA server on {self.endpoint} failed to start: {error}") from error
        log.info("opcua: serving %s (%s)", self.endpoint,
                 "Basic256Sha256 SignAndEncrypt" if self.config.secure else "loopback, anonymous, no security")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is None:  # the thread has not made its loop yet: let it start, then stop it
            self._ready.wait(timeout)
            loop = self._loop
        if loop is not None and self._stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        thread.join(timeout)
        if thread.is_alive():
            log.warning("opcua: the server thread did not end within %.0f s", timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._thread = self._loop = self._queue = self._stop = self._pool = None

    def publish(self, row: Mapping[str, Any]) -> bool:
        """Hand one result row to the face (any thread, never blocks): one ResultReady event and the LastResult
        variables. False when the face is not running; a row that finds ``max_pending_results`` waiting is
        counted in ``dropped`` and logged."""
        loop, queue = self._loop, self._queue
        if loop is None or queue is None or not self.running:
            return False
        snapshot = dict(row)

        def put() -> None:
            try:
                queue.put_nowait(snapshot)
            except asyncio.QueueFull:
                self.dropped += 1
                log.error("opcua: %d results wait already; result %s is not published (it is in the results "
                          "file); %d dropped so far", queue.maxsize, snapshot.get("id"), self.dropped)

        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:  # the loop is closing
            return False
        return True

    # --- the server's thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self) -> None:
        assert self._stop is not None
        try:
            model = _Model(self.config, self.control, self._pool)
            server = await model.build()
            await server.start()
        except BaseException as err:  # reported to start(), which raises it in the station's thread
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        tasks = [asyncio.ensure_future(model.poll_forever()), asyncio.ensure_future(self._publish_forever(model))]
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.stop()

    async def _publish_forever(self, model: "_Model") -> None:
        assert self._queue is not None
        while True:
            row = await self._queue.get()
            try:
                await model.publish(row)
                self.published += 1
            except Exception:  # one bad row never stops the events of the others
                log.exception("opcua: result %s could not be published", row.get("id"))


class _Model:
    """The address space of one server run and what changes it (state, recipes, results)."""

    def __init__(self, config: OpcuaConfig, control: StationControl, pool: ThreadPoolExecutor | None):
        self.config, self.control, self.pool = config, control, pool
        self.server: Server | None = None
        self.idx = 0
        self.states: dict[VisionState, Node] = {}
        self.recipe_nodes: dict[str, Node] = {}
        self.recipes: tuple[Recipe, ...] | None = None
        self.state: StationState | None = None
        self.last: dict[str, Node] = {}

    def nid(self, path: str) -> ua.NodeId:
        return ua.NodeId(path, self.idx)

    def qn(self, name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, self.idx)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A station call on a worker thread (it may block: a recipe reload)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # --- building ---------------------------------------------------------------------------------------------

    async def build(self) -> Server:
        config = self.config
        trusted = {_load_der(path) for path in config.trusted_clients}
        users = _Users(config, trusted)
        self.server = Server(iserver=_SecureServer(users)) if config.secure else Server(user_manager=users)
        server = self.server
        await server.init()
        server.set_endpoint(config.endpoint)
        server.set_server_name(config.server_name)
        await server.set_application_uri(config.application_uri)
        server.allow_remote_admin(False)
        if config.secure:
            cert_path, key_path = server_certificate(config)
            await server.load_certificate(str(cert_path))
            await server.load_private_key(str(key_path))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            tokens: list[type] = []
            if config.username:
                tokens.append(ua.UserNameIdentityToken)
            if trusted:
                tokens.append(ua.X509IdentityToken)
            server.set_identity_tokens(tokens)
            if trusted and not config.username:
                async def only_trusted(cert: x509.Certificate, description: Any) -> None:
                    if uacrypto.der_from_x509(cert) not in trusted:
                        raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

                server.set_certificate_validator(only_trusted)
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        self.idx = await server.register_namespace(NAMESPACE)
        await self._build_types()
        await self._build_instance()
        await self.poll_once()
        return server

    async def _type(self, base: int | ua.NodeId, name: str) -> Node:
        parent = self.server.get_node(ua.NodeId(base) if isinstance(base, int) else base)
        return await parent.add_object_type(self.nid(name), self.qn(name))

    async def _build_types(self) -> None:
        self.t_system = await self._type(ua.ObjectIds.BaseObjectType, "VisionSystemType")
        self.t_machine = await self._type(ua.ObjectIds.FiniteStateMachineType, "VisionStateMachineType")
        self.t_auto = await self._type(ua.ObjectIds.FiniteStateMachineType, "VisionAutomaticModeStateMachineType")
        self.t_recipes = await self._type(ua.ObjectIds.BaseObjectType, "RecipeManagementType")
        self.t_recipe = await self._type(ua.ObjectIds.BaseObjectType, "RecipeType")
        self.t_recipe_folder = await self._type(ua.ObjectIds.FolderType, "RecipeFolderType")
        self.t_results = await self._type(ua.ObjectIds.BaseObjectType, "ResultManagementType")
        self.t_event = await self._type(ua.ObjectIds.BaseEventType, "ResultReadyEventType")
        defaults = {_B: False, _I32: 0, _S: "", _D: 0.0, _T: _dt.datetime.now(_dt.timezone.utc)}
        for name, vtype in RESULT_EVENT_FIELDS:
            if vtype is ua.VariantType.Variant:
                prop = await self.t_event.add_property(self.nid(f"ResultReadyEventType.{name}"), self.qn(name),
                                                       ua.Variant([ua.Variant("", _S)], vtype),
                                                       datatype=ua.NodeId(ua.ObjectIds.BaseDataType))
                await prop.write_value_rank(1)
            else:
                prop = await self.t_event.add_property(self.nid(f"ResultReadyEventType.{name}"), self.qn(name),
                                                       ua.Variant(defaults[vtype], vtype))
            await prop.set_modelling_rule(True)

    async def _machine(self, parent: Node, path: str, name: str, type_node: Node,
                       states: Sequence[VisionState]) -> Node:
        machine = await parent.add_object(self.nid(path), self.qn(name), objecttype=type_node.nodeid,
                                          instantiate_optional=False)
        current = await machine.get_child(["0:CurrentState"])
        await current.add_property(self.nid(f"{path}.CurrentState.Number"), ua.QualifiedName("Number", 0),
                                   ua.Variant(0, _U32))
        for state in states:
            node = await machine.add_object(self.nid(f"{path}.{state.spec_name}"), self.qn(state.spec_name),
                                            objecttype=ua.NodeId(ua.ObjectIds.StateType))
            await (await node.get_child(["0:StateNumber"])).write_value(ua.Variant(int(state), _U32))
            self.states[state] = node
        return machine

    async def _method(self, parent: Node, path: str, name: str, handler: Callable[..., Awaitable[list]],
                      inputs: list[ua.Argument], outputs: list[ua.Argument]) -> Node:
        async def callback(parent_id: ua.NodeId, *args: ua.Variant) -> Any:
            if len(args) == len(inputs) - 1 and inputs[-1].ValueRank == 1:  # a trailing array may be left out
                args = (*args, ua.Variant([], ua.VariantType.Variant))
            if len(args) < len(inputs):
                return ua.StatusCode(ua.StatusCodes.BadArgumentsMissing)
            if len(args) > len(inputs):
                return ua.StatusCode(ua.StatusCodes.BadTooManyArguments)
            values = []
            for arg, spec in zip(args, inputs):
                if spec.ValueRank == 1:
                    values.append(arg.Value)
                    continue
                expected = ua.VariantType(spec.DataType.Identifier)
                if arg.VariantType is ua.VariantType.Null:
                    values.append("" if expected is _S else 0)
                elif arg.VariantType is not expected:
                    return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
                else:
                    values.append(arg.Value)
            return await handler(*values)

        return await parent.add_method(self.nid(path), self.qn(name), callback, inputs, outputs)

    async def _build_instance(self) -> None:
        objects = self.server.nodes.objects
        system = await objects.add_object(self.nid("VisionSystem"), self.qn("VisionSystem"),
                                          objecttype=self.t_system.nodeid)
        self.system = system
        machine = await self._machine(system, "VisionSystem.VisionStateMachine", "VisionStateMachine",
                                      self.t_machine, _TOP)
        self.machine_current = await machine.get_child(["0:CurrentState"])
        self.reason = await machine.add_variable(self.nid("VisionSystem.VisionStateMachine.StateReason"),
                                                 self.qn("StateReason"), ua.Variant("", _S))
        auto_path = "VisionSystem.VisionStateMachine.AutomaticModeStateMachine"
        auto = await self._machine(machine, auto_path, "AutomaticModeStateMachine", self.t_auto, _AUTO)
        self.auto_current = await auto.get_child(["0:CurrentState"])
        await self.states[VisionState.OPERATIONAL].add_reference(auto.nodeid, ua.ObjectIds.HasSubStateMachine)

        m = "VisionSystem.VisionStateMachine"
        await self._method(machine, f"{m}.Halt", "Halt", self._on_command(Command.HALT), _CAUSE_ARGS, _ERROR_OUT)
        await self._method(machine, f"{m}.Reset", "Reset", self._on_command(Command.RESET), _CAUSE_ARGS,
                           _ERROR_OUT)
        await self._method(machine, f"{m}.SelectModeAutomatic", "SelectModeAutomatic",
                           self._on_command(Command.SELECT_MODE_AUTOMATIC), [], _ERROR_OUT)
        await self._method(auto, f"{auto_path}.StartSingleJob", "StartSingleJob", self._on_single_job, _JOB_ARGS,
                           _JOB_OUT)
        await self._method(auto, f"{auto_path}.StartContinuous", "StartContinuous", self._on_continuous,
                           _JOB_ARGS, _JOB_OUT)
        await self._method(auto, f"{auto_path}.Stop", "Stop", self._on_command(Command.STOP), [], _ERROR_OUT)
        await self._method(auto, f"{auto_path}.Abort", "Abort", self._on_command(Command.ABORT), [], _ERROR_OUT)

        recipes = await system.add_object(self.nid("VisionSystem.RecipeManagement"), self.qn("RecipeManagement"),
                                          objecttype=self.t_recipes.nodeid)
        r = "VisionSystem.RecipeManagement"
        ids_in = [_arg("ExternalId", _S, "the recipe (a product name)"),
                  _arg("InternalIdIn", _S, "the same, or empty")]
        await self._method(recipes, f"{r}.PrepareRecipe", "PrepareRecipe", self._on_prepare_recipe, ids_in,
                           [_arg("InternalIdOut", _S, "the recipe prepared"), _arg("IsCompleted", _B, "done"),
                            _arg("Error", _I32, "0 = OK")])
        await self._method(recipes, f"{r}.UnprepareRecipe", "UnprepareRecipe", self._on_unprepare_recipe, ids_in,
                           [_arg("InternalIdOut", _S, "the recipe unprepared"), _arg("Error", _I32, "0 = OK")])
        product_in = [_arg("ProductId", _S, "the product")]
        await self._method(recipes, f"{r}.PrepareProduct", "PrepareProduct", self._on_prepare_product, product_in,
                           [_arg("InternalId", _S, "its recipe"), _arg("IsCompleted", _B, "done"),
                            _arg("Error", _I32, "0 = OK")])
        await self._method(recipes, f"{r}.UnprepareProduct", "UnprepareProduct", self._on_unprepare_product,
                           product_in, [_arg("InternalId", _S, "its recipe"), _arg("Error", _I32, "0 = OK")])
        await self._method(
            recipes, f"{r}.GetRecipeListFiltered", "GetRecipeListFiltered", self._on_recipe_list,
            [_arg("ExternalId", _S, "only this recipe (empty: any)"),
             _arg("ProductId", _S, "only recipes of this product (empty: any)"),
             _arg("IsPrepared", _I32, "0 = unprepared, 1 = prepared, 2 = either (TriStateBooleanDataType)"),
             _arg("MaxResults", _U32, "at most this many (0: all)"), _arg("StartIndex", _U32, "skip this many"),
             _arg("Timeout", _I32, "unused")],
            [_arg("IsComplete", _B, "no more beyond this list"), _arg("ResultCount", _U32, "matches in all"),
             _arg("RecipeHandle", _U32, "always 0 (no handles)"), _arg("RecipeList", _S, "ids", array=True),
             _arg("Error", _I32, "0 = OK")])
        self.recipe_folder = await recipes.add_object(self.nid(f"{r}.Recipes"), self.qn("Recipes"),
                                                      objecttype=self.t_recipe_folder.nodeid)

        results = await system.add_object(self.nid("VisionSystem.ResultManagement"), self.qn("ResultManagement"),
                                          objecttype=self.t_results.nodeid)
        last = await results.add_object(self.nid("VisionSystem.ResultManagement.LastResult"), self.qn("LastResult"))
        for name, vtype in RESULT_EVENT_FIELDS:
            if vtype is ua.VariantType.Variant:
                continue
            value = {_B: False, _I32: 0, _S: "", _D: math.nan, _T: _dt.datetime.now(_dt.timezone.utc)}[vtype]
            self.last[name] = await last.add_variable(self.nid(f"VisionSystem.ResultManagement.LastResult.{name}"),
                                                      self.qn(name), ua.Variant(value, vtype))

        # Every event goes to subscribers of the VisionSystem object and of the Server object.
        self.result_events = [await self.server.get_event_generator(self.t_event, emitter)
                              for emitter in (system, self.server.nodes.server)]
        for generator in self.result_events:
            generator.event.SourceNode = system.nodeid
            generator.event.SourceName = "VisionSystem"
        self.transition_events = [await self.server.get_event_generator(TransitionEvent(), emitter)
                                  for emitter in (system, self.server.nodes.server)]
        for generator in self.transition_events:
            generator.event.SourceNode = machine.nodeid
            generator.event.SourceName = "VisionStateMachine"

    # --- what changes -----------------------------------------------------------------------------------------

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("opcua: reading the station's state failed")

    async def poll_once(self) -> None:
        try:
            state = await self.call(self.control.state)
        except Exception as err:  # the station cannot say: that is an error state to the line
            state = StationState(VisionState.ERROR, f"station state unavailable: {err}")
        await self._set_state(state)
        recipes = tuple(await self.call(self.control.recipes))
        if recipes != self.recipes:
            await self._set_recipes(recipes)

    async def _set_state(self, state: StationState) -> None:
        previous = self.state
        if previous == state:
            return
        self.state = state
        top = state.state.top
        await self._write_current(self.machine_current, top)
        auto = state.state if state.state in _AUTO else None
        await self._write_current(self.auto_current, auto)
        await self.reason.write_value(ua.Variant(state.reason, _S))
        if previous is not None:
            before = previous.state.spec_name
            log.info("opcua: state %s -> %s%s", before, state.state.spec_name,
                     f" ({state.reason})" if state.reason else "")
            for generator in self.transition_events:
                event = generator.event
                event.FromState = ua.LocalizedText(before)
                event.ToState = ua.LocalizedText(state.state.spec_name)
                event.Transition = ua.LocalizedText(f"{before}To{state.state.spec_name}")
                event.Severity = 800 if top is VisionState.ERROR else 300
                await generator.trigger(message=state.reason or f"{before} -> {state.state.spec_name}")

    async def _write_current(self, current: Node, state: VisionState | None) -> None:
        """A state machine's CurrentState (name, Id = the state's node, Number); empty when not active."""
        await current.write_value(ua.Variant(ua.LocalizedText(state.spec_name if state else ""),
                                             ua.VariantType.LocalizedText))
        state_id = self.states[state].nodeid if state else ua.NodeId()
        await (await current.get_child(["0:Id"])).write_value(ua.Variant(state_id, ua.VariantType.NodeId))
        await (await current.get_child(["0:Number"])).write_value(ua.Variant(int(state) if state else 0, _U32))

    async def _set_recipes(self, recipes: tuple[Recipe, ...]) -> None:
        """The Recipes folder: one RecipeType object per recipe (made, updated, removed as the station's list
        changes)."""
        self.recipes = recipes
        wanted = {recipe.id: recipe for recipe in recipes}
        for gone in [name for name in self.recipe_nodes if name not in wanted]:
            await self.server.delete_nodes([self.recipe_nodes.pop(gone)], recursive=True)
        for recipe in recipes:
            node = self.recipe_nodes.get(recipe.id)
            if node is None:
                node = await self._add_recipe(recipe.id)
                self.recipe_nodes[recipe.id] = node
            modified = _utc(recipe.modified_at) if recipe.modified_at is not None else _dt.datetime(
                1601, 1, 1, tzinfo=_dt.timezone.utc)
            await (await node.get_child([f"{self.idx}:IsPrepared"])).write_value(ua.Variant(recipe.prepared, _B))
            await (await node.get_child([f"{self.idx}:LastModified"])).write_value(ua.Variant(modified, _T))

    async def _add_recipe(self, recipe: str) -> Node:
        path = f"VisionSystem.RecipeManagement.Recipes.{recipe}"
        node = await self.recipe_folder.add_object(self.nid(path), self.qn(recipe), objecttype=self.t_recipe.nodeid)
        for name, value in (("ExternalId", ua.Variant(recipe, _S)), ("InternalId", ua.Variant(recipe, _S)),
                            ("IsPrepared", ua.Variant(False, _B)),
                            ("LastModified", ua.Variant(_dt.datetime.now(_dt.timezone.utc), _T)),
                            ("LinkedProducts", ua.Variant([recipe], _S))):
            await node.add_property(self.nid(f"{path}.{name}"), self.qn(name), value)

        async def prepare() -> list[ua.Variant]:
            error = await self._guard(self.control.prepare, recipe)
            return [ua.Variant(error == OK, _B), ua.Variant(error, _I32)]

        async def unprepare() -> list[ua.Variant]:
            return [ua.Variant(await self._guard(self.control.unprepare, recipe), _I32)]

        await self._method(node, f"{path}.Prepare", "Prepare", prepare, [],
                           [_arg("IsCompleted", _B, "done"), _arg("Error", _I32, "0 = OK")])
        await self._method(node, f"{path}.Unprepare", "Unprepare", unprepare, [], _ERROR_OUT)
        return node

    async def publish(self, row: Mapping[str, Any]) -> None:
        fields = result_fields(row)
        for name, node in self.last.items():
            vtype = dict(RESULT_EVENT_FIELDS)[name]
            await node.write_value(ua.Variant(fields[name], vtype))
        for generator in self.result_events:
            for name, value in fields.items():
                setattr(generator.event, name, value)
            message = f"part {fields['PartId'] or '-'}: {fields['Decision'] or 'error'}"
            await generator.trigger(time_attr=fields["CreationTime"], message=message)

    # --- method handlers --------------------------------------------------------------------------------------

    async def _guard(self, fn: Callable[..., Any], *args: Any) -> int:
        """Run a station call; its outcome as a method's Error code (the reason is logged)."""
        try:
            await self.call(fn, *args)
        except KeyError as err:
            log.warning("opcua: %s%s refused: %s", getattr(fn, "__name__", "call"), args, err)
            return E_UNKNOWN_RECIPE
        except ControlRefused as err:
            log.warning("opcua: %s%s refused: %s", getattr(fn, "__name__", "call"), args, err)
            return E_REFUSED
        except Exception:
            log.exception("opcua: %s%s failed", getattr(fn, "__name__", "call"), args)
            return E_INTERNAL
        finally:
            try:
                await self.poll_once()  # the client that called sees the outcome at once
            except Exception:
                log.exception("opcua: reading the station's state failed")
        return OK

    def _on_command(self, command: Command) -> Callable[..., Awaitable[list]]:
        async def handler(*args: Any) -> list[ua.Variant]:
            cause = " ".join(str(a) for a in args if a not in ("", 0)) or command.value
            return [ua.Variant(await self._guard(self.control.command, command, cause), _I32)]

        return handler

    def _product(self, recipe_id: str, product_id: str) -> tuple[str | None, int]:
        if recipe_id and product_id and recipe_id != product_id:
            log.warning("opcua: RecipeId %r and ProductId %r name different products", recipe_id, product_id)
            return None, E_UNKNOWN_RECIPE
        return (recipe_id or product_id or None), OK

    async def _on_single_job(self, meas_id: str, part_id: str, recipe_id: str, product_id: str,
                             parameters: Any) -> list[ua.Variant]:
        job_id = uuid.uuid4().hex
        product, error = self._product(recipe_id, product_id)
        if error == OK:
            state = self.state.state if self.state else VisionState.PREOPERATIONAL
            if state.top is not VisionState.OPERATIONAL:
                log.warning("opcua: StartSingleJob for part %r refused: the station is %s", part_id, state.spec_name)
                error = E_STATE
            else:
                error = await self._guard(self.control.trigger, Trigger(part_id=part_id, product=product,
                                                                        meas_id=meas_id, job_id=job_id))
        return [ua.Variant(job_id if error == OK else "", _S), ua.Variant(error, _I32)]

    async def _on_continuous(self, meas_id: str, part_id: str, recipe_id: str, product_id: str,
                             parameters: Any) -> list[ua.Variant]:
        job_id = uuid.uuid4().hex
        product, error = self._product(recipe_id, product_id)
        if error == OK and product:
            error = await self._guard(self.control.prepare, product)
        if error == OK:
            error = await self._guard(self.control.command, Command.START_CONTINUOUS, meas_id or job_id)
        return [ua.Variant(job_id if error == OK else "", _S), ua.Variant(error, _I32)]

    async def _on_prepare_recipe(self, external_id: str, internal_id: str) -> list[ua.Variant]:
        recipe = external_id or internal_id
        error = await self._guard(self.control.prepare, recipe)
        return [ua.Variant(recipe if error == OK else "", _S), ua.Variant(error == OK, _B), ua.Variant(error, _I32)]

    async def _on_unprepare_recipe(self, external_id: str, internal_id: str) -> list[ua.Variant]:
        recipe = external_id or internal_id
        error = await self._guard(self.control.unprepare, recipe)
        return [ua.Variant(recipe if error == OK else "", _S), ua.Variant(error, _I32)]

    async def _on_prepare_product(self, product: str) -> list[ua.Variant]:
        return await self._on_prepare_recipe(product, "")

    async def _on_unprepare_product(self, product: str) -> list[ua.Variant]:
        return await self._on_unprepare_recipe(product, "")

    async def _on_recipe_list(self, external_id: str, product_id: str, is_prepared: int, max_results: int,
                              start_index: int, timeout: int) -> list[ua.Variant]:
        recipes = [r for r in await self.call(self.control.recipes)
                   if (not external_id or r.id == external_id) and (not product_id or r.id == product_id)
                   and (is_prepared not in (0, 1) or r.prepared == bool(is_prepared))]
        chosen = recipes[start_index:start_index + max_results] if max_results else recipes[start_index:]
        complete = start_index + len(chosen) >= len(recipes)
        return [ua.Variant(complete, _B), ua.Variant(len(recipes), _U32), ua.Variant(0, _U32),
                ua.Variant([r.id for r in chosen], _S), ua.Variant(OK, _I32)]


__all__ = ["NAMESPACE", "OpcuaFace", "result_fields", "result_state", "server_certificate",
           "E_STATE", "E_UNKNOWN_RECIPE", "E_REFUSED", "E_INTERNAL", "OK"]
