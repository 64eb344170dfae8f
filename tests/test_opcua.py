"""The OPC UA face against asyncua's own client on loopback (docs/line.md): the address space as documented,
the recipe and trigger methods, one result event per verdict, the state machine following the station (Error
with the reason, and back), a server restart with clients reconnecting, and the security rules."""
from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("asyncua")

from asyncua import Client, ua  # noqa: E402
from asyncua.crypto import cert_gen, uacrypto  # noqa: E402
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

from conftest import free_port, wait_for  # noqa: E402
from winclip_edge.control import (  # noqa: E402
    Command, ControlRefused, Recipe, StationState, Trigger, VisionState)
from winclip_edge.line.opcua.server import (  # noqa: E402
    E_REFUSED, E_STATE, E_UNKNOWN_RECIPE, NAMESPACE, OK, OpcuaFace, RESULT_EVENT_FIELDS)
from winclip_edge.line.opcua import OpcuaConfig, OpcuaError, start_opcua  # noqa: E402

EMPTY = ua.Variant([], ua.VariantType.Variant)  # the Parameters argument of StartSingleJob


class FakeStation:
    """A StationControl with two products; it records what the line asked for."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current = StationState(VisionState.READY)
        self.prepared = {"widget"}
        self.products = ("widget", "bolt")
        self.triggers: list[Trigger] = []
        self.commands: list[tuple[Command, str]] = []
        self.refuse = False

    def state(self) -> StationState:
        return self.current

    def recipes(self):
        with self.lock:
            return [Recipe(p, p in self.prepared, 1_767_225_600.0) for p in self.products]

    def prepare(self, recipe: str) -> None:
        if recipe not in self.products:
            raise KeyError(f"unknown product {recipe!r}")
        with self.lock:
            self.prepared = {recipe}

    def unprepare(self, recipe: str) -> None:
        with self.lock:
            self.prepared.discard(recipe)

    def trigger(self, trigger: Trigger) -> None:
        if self.refuse:
            raise ControlRefused("the trigger queue is full")
        self.triggers.append(trigger)

    def command(self, command: Command, cause: str) -> None:
        self.commands.append((command, cause))
        if command is Command.START_CONTINUOUS:
            raise ControlRefused("no free-running source")


@pytest.fixture
def station():
    return FakeStation()


@pytest.fixture
def face(station):
    face = start_opcua(OpcuaConfig(port=free_port(), poll_s=0.05), station)
    yield face
    face.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def vision_system(client: Client):
    idx = await client.get_namespace_index(NAMESPACE)
    return idx, await client.nodes.objects.get_child([f"{idx}:VisionSystem"])


async def names(node) -> list[str]:
    return [(await child.read_browse_name()).Name for child in await node.get_children()]


async def type_name(client: Client, node) -> str:
    return (await client.get_node(await node.read_type_definition()).read_browse_name()).Name


class Events:
    def __init__(self):
        self.received = []

    def event_notification(self, event):
        self.received.append(event)


def test_address_space_as_documented(face):
    async def main():
        async with Client(face.endpoint) as client:
            idx, system = await vision_system(client)
            assert await type_name(client, system) == "VisionSystemType"
            assert set(await names(system)) == {"VisionStateMachine", "RecipeManagement", "ResultManagement"}
            machine = await system.get_child([f"{idx}:VisionStateMachine"])
            assert await type_name(client, machine) == "VisionStateMachineType"
            auto = await machine.get_child([f"{idx}:AutomaticModeStateMachine"])
            assert await type_name(client, auto) == "VisionAutomaticModeStateMachineType"
            numbers = {}
            for parent, states in ((machine, ("Preoperational", "Halted", "Error", "Operational")),
                                   (auto, ("Initialized", "Ready", "SingleExecution", "ContinuousExecution"))):
                for state in states:
                    node = await parent.get_child([f"{idx}:{state}"])
                    assert await type_name(client, node) == "StateType"
                    numbers[state] = await (await node.get_child(["0:StateNumber"])).read_value()
            assert numbers == {"Preoperational": 1, "Halted": 2, "Error": 3, "Operational": 4, "Initialized": 5,
                               "Ready": 6, "SingleExecution": 7, "ContinuousExecution": 8}  # OPC 40100-1
            assert {"Halt", "Reset", "SelectModeAutomatic", "CurrentState", "StateReason"} <= set(await names(machine))
            assert {"StartSingleJob", "StartContinuous", "Stop", "Abort"} <= set(await names(auto))
            start = await auto.get_child([f"{idx}:StartSingleJob"])
            arguments = await (await start.get_child(["0:InputArguments"])).read_value()
            assert [a.Name for a in arguments] == ["MeasId", "PartId", "RecipeId", "ProductId", "Parameters"]
            current = await machine.get_child(["0:CurrentState"])
            assert (await current.read_value()).Text == "Operational"
            assert await (await current.get_child(["0:Number"])).read_value() == 4
            auto_current = await auto.get_child(["0:CurrentState"])
            assert (await auto_current.read_value()).Text == "Ready"
            assert await (await auto_current.get_child(["0:Id"])).read_value() == \
                (await auto.get_child([f"{idx}:Ready"])).nodeid
            recipes = await system.get_child([f"{idx}:RecipeManagement"])
            assert {"PrepareRecipe", "UnprepareRecipe", "PrepareProduct", "UnprepareProduct", "GetRecipeListFiltered",
                    "Recipes"} <= set(await names(recipes))
            folder = await recipes.get_child([f"{idx}:Recipes"])
            assert sorted(await names(folder)) == ["bolt", "widget"]
            widget = await folder.get_child([f"{idx}:widget"])
            assert await type_name(client, widget) == "RecipeType"
            assert await (await widget.get_child([f"{idx}:IsPrepared"])).read_value() is True
            last = await (await system.get_child([f"{idx}:ResultManagement"])).get_child([f"{idx}:LastResult"])
            assert {"PartId", "ResultId", "Decision", "Score", "Threshold", "ProductId", "OverlayUrl", "JobId"} <= \
                set(await names(last))
            event_type = await client.nodes.base_event_type.get_child([f"{idx}:ResultReadyEventType"])
            assert set(await names(event_type)) == {name for name, _ in RESULT_EVENT_FIELDS}

    run(main())


def test_recipe_methods_switch_the_product_through_the_station(face, station):
    async def main():
        async with Client(face.endpoint) as client:
            idx, system = await vision_system(client)
            recipes = await system.get_child([f"{idx}:RecipeManagement"])
            assert await recipes.call_method(f"{idx}:PrepareRecipe", "bolt", "") == ["bolt", True, OK]
            assert station.prepared == {"bolt"}
            bolt = await (await recipes.get_child([f"{idx}:Recipes"])).get_child([f"{idx}:bolt"])
            assert await (await bolt.get_child([f"{idx}:IsPrepared"])).read_value() is True  # updated at once
            assert await recipes.call_method(f"{idx}:PrepareRecipe", "nut", "") == ["", False, E_UNKNOWN_RECIPE]
            assert station.prepared == {"bolt"}  # a refused switch leaves the product as it was
            listed = await recipes.call_method(
                f"{idx}:GetRecipeListFiltered", "", "", ua.Variant(1, ua.VariantType.Int32),
                ua.Variant(0, ua.VariantType.UInt32), ua.Variant(0, ua.VariantType.UInt32),
                ua.Variant(0, ua.VariantType.Int32))
            assert listed == [True, 1, 0, ["bolt"], OK]
            assert await recipes.call_method(f"{idx}:PrepareProduct", "widget") == ["widget", True, OK]
            widget = await (await recipes.get_child([f"{idx}:Recipes"])).get_child([f"{idx}:widget"])
            assert await widget.call_method(f"{idx}:Unprepare") == OK
            assert station.prepared == set()
            assert await bolt.call_method(f"{idx}:Prepare") == [True, OK]
            assert station.prepared == {"bolt"}
            with pytest.raises(ua.UaStatusCodeError, match="BadInvalidArgument"):
                await recipes.call_method(f"{idx}:PrepareRecipe", 17, "")

    run(main())


def test_trigger_then_one_result_event_per_verdict_with_the_part_id(face, station):
    async def main():
        async with Client(face.endpoint) as client:
            idx, system = await vision_system(client)
            auto = await system.get_child([f"{idx}:VisionStateMachine", f"{idx}:AutomaticModeStateMachine"])
            event_type = await client.nodes.base_event_type.get_child([f"{idx}:ResultReadyEventType"])
            on_system, on_server = Events(), Events()
            for node, handler in ((system, on_system), (client.nodes.server, on_server)):
                subscription = await client.create_subscription(20, handler)
                await subscription.subscribe_events(node, event_type)

            job_id, error = await auto.call_method(f"{idx}:StartSingleJob", "run-1", "4711", "", "", EMPTY)
            assert error == OK and job_id
            assert station.triggers == [Trigger(part_id="4711", product=None, meas_id="run-1", job_id=job_id)]
            _, error = await auto.call_method(f"{idx}:StartSingleJob", "", "4712", "bolt", "")  # Parameters left out
            assert error == OK and station.triggers[-1].product == "bolt"
            assert (await auto.call_method(f"{idx}:StartSingleJob", "", "4713", "bolt", "widget", EMPTY))[1] == \
                E_UNKNOWN_RECIPE
            station.refuse = True
            assert (await auto.call_method(f"{idx}:StartSingleJob", "", "4714", "", "", EMPTY))[1] == E_REFUSED
            assert len(station.triggers) == 2

            # The station decides and hands each row to the face.
            face.publish({"id": "r-4711", "part_id": "4711", "job_id": job_id, "meas_id": "run-1",
                          "decision": "fail", "score": 0.8125, "threshold": 0.5, "product": "widget",
                          "overlay_url": "http://127.0.0.1:8080/results/r-4711/overlay",
                          "captured_at": "2026-01-01T00:00:00.000Z", "decided_at": "2026-01-01T00:00:00.120Z"})
            face.publish({"id": "r-4712", "part_id": "4712", "decision": "timeout", "score": None,
                          "threshold": 0.5, "product": "bolt"})
            await asyncio.wait_for(_until(lambda: len(on_system.received) == 2 and len(on_server.received) == 2), 20)
            await asyncio.sleep(0.3)
            assert len(on_system.received) == len(on_server.received) == 2  # one event per verdict, no more
            first, second = on_system.received
            assert (first.PartId, first.JobId, first.MeasId, first.ResultId, first.Decision, first.ResultState) == \
                ("4711", job_id, "run-1", "r-4711", "fail", 1)
            assert (first.Score, first.Threshold, first.ProductId) == (0.8125, 0.5, "widget")
            assert first.OverlayUrl.endswith("/r-4711/overlay")
            assert first.CreationTime.isoformat().startswith("2026-01-01T00:00:00.12")
            assert '"part_id": "4711"' in first.ResultContent[0].Value  # the whole row, as JSON
            assert (second.PartId, second.Decision, second.ResultState) == ("4712", "timeout", 3)  # Aborted
            assert second.SourceName == "VisionSystem"
            last = await system.get_child([f"{idx}:ResultManagement", f"{idx}:LastResult"])
            assert await (await last.get_child([f"{idx}:PartId"])).read_value() == "4712"
            assert await (await last.get_child([f"{idx}:Decision"])).read_value() == "timeout"

            machine = await system.get_child([f"{idx}:VisionStateMachine"])
            assert await machine.call_method(f"{idx}:Halt", ua.Variant(7, ua.VariantType.Int32), "shift end") == OK
            assert station.commands[-1] == (Command.HALT, "7 shift end")
            assert (await auto.call_method(f"{idx}:StartContinuous", "", "", "", "", EMPTY))[1] == E_REFUSED

    run(main())


async def _until(condition):
    while not condition():
        await asyncio.sleep(0.02)


def test_state_follows_the_station_into_error_with_the_reason_and_back(face, station):
    async def main():
        async with Client(face.endpoint) as client:
            idx, system = await vision_system(client)
            machine = await system.get_child([f"{idx}:VisionStateMachine"])
            auto = await machine.get_child([f"{idx}:AutomaticModeStateMachine"])
            current = await machine.get_child(["0:CurrentState"])
            transitions = Events()
            subscription = await client.create_subscription(20, transitions)
            await subscription.subscribe_events(system, ua.ObjectIds.TransitionEventType)

            async def state():
                return ((await current.read_value()).Text,
                        (await (await auto.get_child(["0:CurrentState"])).read_value()).Text,
                        await (await machine.get_child([f"{idx}:StateReason"])).read_value())

            station.current = StationState(VisionState.ERROR, "engine failed: CUDA out of memory")
            await asyncio.wait_for(_until_async(state, ("Error", "", "engine failed: CUDA out of memory")), 10)
            _, error = await auto.call_method(f"{idx}:StartSingleJob", "", "4711", "", "", EMPTY)
            assert error == E_STATE and station.triggers == []  # no trigger reaches a failed station
            station.current = StationState(VisionState.READY)
            await asyncio.wait_for(_until_async(state, ("Operational", "Ready", "")), 10)
            assert (await auto.call_method(f"{idx}:StartSingleJob", "", "4711", "", "", EMPTY))[1] == OK
            await asyncio.wait_for(_until(lambda: len(transitions.received) >= 2), 10)
            to_error, back = transitions.received[:2]
            assert (to_error.ToState.Text, to_error.Message.Text) == ("Error", "engine failed: CUDA out of memory")
            assert (back.FromState.Text, back.ToState.Text) == ("Error", "Ready")

    run(main())


async def _until_async(read, wanted):
    while await read() != wanted:
        await asyncio.sleep(0.02)


def test_server_restart_and_clients_reconnect_to_the_same_nodes(face, station):
    async def before():
        async with Client(face.endpoint) as client:
            idx, system = await vision_system(client)
            part = await system.get_child([f"{idx}:ResultManagement", f"{idx}:LastResult", f"{idx}:PartId"])
            return part.nodeid

    part_node = run(before())
    face.publish({"id": "r1", "part_id": "1", "decision": "pass", "score": 0.1})
    wait_for(lambda: face.published == 1, 10, "the first result")
    face.stop()
    assert not face.publish({"id": "r2", "part_id": "2", "decision": "pass"})  # not running: refused, not queued
    face.start()

    async def after():
        async with Client(face.endpoint) as client:
            node = client.get_node(part_node)  # the node id a client kept from before the restart
            face.publish({"id": "r3", "part_id": "3", "decision": "pass", "score": 0.1})
            await asyncio.wait_for(_until_async(node.read_value, "3"), 10)

    run(after())


def _client_certificate(folder, name="line-client"):
    key = cert_gen.generate_private_key()
    uri = f"urn:test:{name}"
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri)], extended=[ExtendedKeyUsageOID.CLIENT_AUTH])
    cert_path, key_path = folder / f"{name}.der", folder / f"{name}.pem"
    cert_path.write_bytes(uacrypto.der_from_x509(cert))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return uri, cert_path, key_path


async def _secure_client(endpoint, folder, name="line-client", user=None, password=None, certificate=None):
    uri, cert_path, key_path = certificate or _client_certificate(folder, name)
    client = Client(endpoint, timeout=10)
    client.application_uri = uri
    await client.set_security(SecurityPolicyBasic256Sha256, str(cert_path), str(key_path),
                              mode=ua.MessageSecurityMode.SignAndEncrypt)
    if user is not None:
        client.set_user(user)
        client.set_password(password)
    return client


def test_security_refuses_unsafe_binds_with_one_line():
    with pytest.raises(OpcuaError, match=r"--opcua 0.0.0.0:4840 is reachable from other machines: set "
                                         r"WINCLIP_OPCUA_USERNAME and WINCLIP_OPCUA_PASSWORD") as err:
        OpcuaConfig(host="0.0.0.0").check()
    assert "\n" not in str(err.value)
    with pytest.raises(OpcuaError, match="needs a server certificate"):
        OpcuaConfig(host="192.0.2.10", username="line", password="secret").check()
    with pytest.raises(OpcuaError, match="both a user and a password"):
        OpcuaConfig(username="line").check()
    OpcuaConfig(host="192.0.2.10", username="line", password="secret", certificate_dir="/tmp").check()  # accepted
    assert not OpcuaConfig().secure and OpcuaConfig(host="::1").endpoint == "opc.tcp://[::1]:4840"


def test_from_env_reads_the_credentials(monkeypatch):
    monkeypatch.setenv("WINCLIP_OPCUA_USERNAME", "line")
    monkeypatch.setenv("WINCLIP_OPCUA_PASSWORD", "s3cret")
    config = OpcuaConfig.from_env(host="0.0.0.0", certificate_dir="/tmp")
    assert (config.username, config.password, config.secure) == ("line", "s3cret", True)


def test_secure_endpoint_needs_the_password_and_signs_and_encrypts(station, tmp_path):
    config = OpcuaConfig(port=free_port(), username="line", password="s3cret", certificate_dir=str(tmp_path / "pki"),
                         poll_s=0.05)
    face = OpcuaFace(config, station).start()
    try:
        async def main():
            # No anonymous, unencrypted access at all.
            endpoints = await Client(face.endpoint).connect_and_get_server_endpoints()
            assert {(e.SecurityPolicyUri.rsplit("#", 1)[-1], e.SecurityMode) for e in endpoints} == \
                {("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt)}
            assert {t.TokenType for e in endpoints for t in e.UserIdentityTokens} == {ua.UserTokenType.UserName}
            with pytest.raises(ua.UaError, match="No matching endpoints"):  # the client finds no open endpoint
                async with Client(face.endpoint, timeout=5) as plain:
                    await vision_system(plain)
            # ... and a client that opens a channel without security anyway, with the right password in plain
            # text, is turned away by the server itself (asyncua alone would let it in)
            original = Client.find_endpoint
            Client.find_endpoint = staticmethod(lambda endpoints, mode, uri: endpoints[0])
            try:
                with pytest.raises(ua.UaStatusCodeError, match="BadSecurityModeRejected"):
                    plain = Client(face.endpoint, timeout=5)
                    plain.set_user("line")
                    plain.set_password("s3cret")
                    async with plain:
                        await vision_system(plain)
            finally:
                Client.find_endpoint = original
            certificate = _client_certificate(tmp_path)
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                async with await _secure_client(face.endpoint, tmp_path, user="line", password="wrong",
                                                certificate=certificate) as wrong:
                    await vision_system(wrong)
            with pytest.raises(ua.UaStatusCodeError, match="BadIdentityTokenRejected"):  # anonymous, encrypted
                async with await _secure_client(face.endpoint, tmp_path, certificate=certificate) as anonymous:
                    await vision_system(anonymous)
            async with await _secure_client(face.endpoint, tmp_path, user="line", password="s3cret",
                                            certificate=certificate) as client:
                idx, system = await vision_system(client)
                assert "VisionStateMachine" in await names(system)

        run(main())
        assert (tmp_path / "pki" / "server_cert.der").is_file()
        assert (tmp_path / "pki" / "server_key.pem").stat().st_mode & 0o077 == 0  # the key is private
        first = (tmp_path / "pki" / "server_cert.der").read_bytes()
        face.stop()
        face.start()  # a restart keeps the certificate that clients trusted
        assert (tmp_path / "pki" / "server_cert.der").read_bytes() == first
    finally:
        face.stop()


def test_certificate_only_access_admits_trusted_clients_only(station, tmp_path):
    trusted = _client_certificate(tmp_path, "trusted")
    stranger = _client_certificate(tmp_path, "stranger")
    config = OpcuaConfig(port=free_port(), trusted_clients=(str(trusted[1]),),
                         certificate_dir=str(tmp_path / "pki"), poll_s=0.05)
    face = OpcuaFace(config, station).start()
    try:
        async def main():
            client = await _secure_client(face.endpoint, tmp_path, certificate=trusted)
            client.user_certificate = await uacrypto.load_certificate(str(trusted[1]))
            client.user_private_key = await uacrypto.load_private_key(str(trusted[2]))
            async with client:
                assert "RecipeManagement" in await names((await vision_system(client))[1])
            with pytest.raises(ua.UaStatusCodeError, match="BadCertificateUntrusted"):
                other = await _secure_client(face.endpoint, tmp_path, certificate=stranger)
                other.user_certificate = await uacrypto.load_certificate(str(stranger[1]))
                other.user_private_key = await uacrypto.load_private_key(str(stranger[2]))
                async with other:
                    await vision_system(other)
            original = Client.find_endpoint  # a trusted certificate as the user token on a channel without security
            Client.find_endpoint = staticmethod(lambda endpoints, mode, uri: endpoints[0])
            try:
                with pytest.raises(ua.UaStatusCodeError, match="BadSecurityModeRejected"):
                    plain = Client(face.endpoint, timeout=5)
                    plain.user_certificate = await uacrypto.load_certificate(str(trusted[1]))
                    plain.user_private_key = await uacrypto.load_private_key(str(trusted[2]))
                    async with plain:
                        await vision_system(plain)
            finally:
                Client.find_endpoint = original

        run(main())
    finally:
        face.stop()


def test_a_port_in_use_is_a_one_line_error(station, face):
    other = OpcuaFace(OpcuaConfig(port=int(face.endpoint.rsplit(":", 1)[1]), poll_s=0.05), station)
    with pytest.raises(OpcuaError, match="cannot listen on opc.tcp://127.0.0.1"):
        other.start()
