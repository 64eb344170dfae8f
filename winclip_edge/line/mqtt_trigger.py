"""Triggers over MQTT: the station subscribes to ``winclip/<station>/trigger`` (QoS 1) on the broker of its MQTT sink
(the same host, port, TLS and user) and takes each message ``{"part_id": ..., "product": ..., "meas_id": ...}`` as
a trigger (docs/line.md, "Triggered parts"). A bad message (not JSON, no part id, wrong types) is logged and
counted, never fatal; a refused trigger (its part in flight or decided already, e.g. a QoS 1 repeat) too.

A clean session: triggers published while the station is down are not kept for it (their parts have passed)."""
from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any, Callable

from ..names import topic
from ..control import ControlRefused, Trigger, check_part_id
from .sinks import MqttConfig

log = logging.getLogger("winclip_edge.line")


def trigger_topic(station: str) -> str:
    return topic("winclip", station, "trigger")


def parse_trigger(payload: bytes) -> Trigger:
    """The trigger a message asks for; ValueError saying what is wrong with it."""
    try:
        message = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    if "part_id" not in message:
        raise ValueError("no part_id")
    try:
        part_id = check_part_id(message["part_id"])
    except ControlRefused as err:
        raise ValueError(str(err)) from None
    product, meas_id = message.get("product"), message.get("meas_id", "")
    if product is not None and not isinstance(product, str):
        raise ValueError(f"product must be a string, got {product!r}")
    if not isinstance(meas_id, str):
        raise ValueError(f"meas_id must be a string, got {meas_id!r}")
    return Trigger(part_id=part_id, product=product or None, meas_id=meas_id, job_id=uuid.uuid4().hex, source="mqtt")


class MqttTriggers:
    """The trigger subscriber (see the module docstring); ``on_trigger`` is the station's ``trigger``."""

    def __init__(self, config: MqttConfig, station: str, on_trigger: Callable[[Trigger], Any]):
        import paho.mqtt.client as mqtt

        self.config, self.topic, self.on_trigger = config, trigger_topic(station), on_trigger
        self.counts = {"received": 0, "accepted": 0, "bad": 0, "refused": 0}
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        client = config.client(mqtt, suffix="-trigger", clean_session=True)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *args: self.subscribed.set()
        client.on_disconnect = lambda *args: self.subscribed.clear()
        client.on_message = self._on_message
        self._client = client

    def start(self) -> None:
        self._client.connect_async(self.config.host, self.config.port, self.config.keepalive_s)
        self._client.loop_start()
        log.info("mqtt: triggers on %s at %s:%d", self.topic, self.config.host, self.config.port)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        if reason.is_failure:
            log.warning("mqtt triggers: %s:%d refused the connection: %s", self.config.host, self.config.port, reason)
            return
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.handle(message.payload)

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def handle(self, payload: bytes) -> bool:
        """Take one message; True when its trigger was accepted."""
        self._count("received")
        try:
            trigger = parse_trigger(payload)
        except ValueError as err:
            self._count("bad")
            log.warning("mqtt trigger on %s ignored: %s (%d bad so far): %r", self.topic, err, self.counts["bad"],
                        payload[:200])
            return False
        try:
            self.on_trigger(trigger)
        except (ControlRefused, KeyError) as err:
            self._count("refused")
            log.warning("mqtt trigger for part %s refused: %s", trigger.part_id, err)
            return False
        except Exception:  # the station failed on it: logged, the subscriber goes on
            self._count("refused")
            log.exception("mqtt trigger for part %s failed", trigger.part_id)
            return False
        self._count("accepted")
        return True

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
