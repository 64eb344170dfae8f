"""Drift alerts over MQTT: every MQTT sink of a station also publishes the alerts of drift_watch.py, each to its
product's topic ``winclip/<station>/<product>/alert`` (QoS 1, through its own on-disk spool like every sink:
an alert raised while the broker is down is delivered when it is back).

The alert connection is the sink's broker, TLS and credentials with its own client id (``<client_id>-alerts``: a
broker drops the older of two connections with one id) and its own spool, ``OUT/spool/<sink>-alerts``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from ..names import topic
from .plugins import SinkContext
from .sinks import MqttSink, SpooledSink
from .spool import Spool

SUFFIX = "-alerts"


def alert_topic(station: str, product: str) -> str:
    """The MQTT topic of a product's alerts."""
    return topic("winclip", station, product, "alert")


class MqttAlertSink(MqttSink):
    """An MQTT sink whose messages are alerts (drift_watch.alert_message): each goes to its product's topic."""

    def topic_of(self, message: bytes) -> str:
        alert = json.loads(message)
        return alert_topic(alert["station"], alert["product"])


def mqtt_alert_sinks(sinks: Iterable, context: SinkContext, spool_root: Path, spool_max: int) -> list[SpooledSink]:
    """A spooled alert sink beside every ``mqtt`` sink spec of ``sinks`` (line/spec.py SinkSpec); started (their
    delivery threads connect) as they are made."""
    made = []
    for spec in sinks:
        if spec.kind != "mqtt":
            continue
        config = spec.options.config(context)
        sink = MqttAlertSink(replace(config, client_id=config.client_id + SUFFIX))
        sink.name = spec.name + SUFFIX
        made.append(SpooledSink(sink, Spool(Path(spool_root) / sink.name, spool_max)))
    return made


__all__ = ["MqttAlertSink", "alert_topic", "mqtt_alert_sinks"]
