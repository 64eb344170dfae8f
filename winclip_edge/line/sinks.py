"""Where decisions go besides results.jsonl: MQTT (paho-mqtt, QoS 1) and webhooks (HTTP POST of JSON), the
built-in sinks (:data:`BUILTIN_SINKS`; the Sink protocol and other packages' sinks: plugins.py, registry.py).

Every message passes through its sink's on-disk :class:`~winclip_edge.line.spool.Spool` and one delivery
thread sends them one at a time, oldest first, removing each only when the sink confirmed it (MQTT PUBACK,
HTTP 2xx). A sink that is down therefore never blocks inspection and never loses a decision: messages wait
(bounded; overflow counted and logged) and go out in order when it is back, also after a restart.
Delivery is at least once: a confirmation lost on the way can repeat a message; ``id`` identifies it.
"""
from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import WinclipError
from ..names import check_topic, topic
from .plugins import Sink, SinkContext, SinkPlugin
from .spool import Spool

log = logging.getLogger("winclip_edge.line")

MQTT_USERNAME_ENV = "WINCLIP_MQTT_USERNAME"
MQTT_PASSWORD_ENV = "WINCLIP_MQTT_PASSWORD"
SEND_TIMEOUT_S = 5.0  # one delivery attempt; the spool keeps the message either way
CONNECT_WAIT_S = 1.0  # an MQTT attempt waits this long for a (re)connection before it counts as failed


class SinkUnavailable(WinclipError, RuntimeError):
    """A delivery attempt failed (not connected, no confirmation, HTTP error); the message stays spooled."""


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int = 1883
    topic: str = "winclip/station/product/result"
    tls: bool = False
    ca_file: str | None = None  # PEM bundle for TLS (default: the system's)
    client_id: str = ""  # "" = paho makes one
    keepalive_s: int = 30

    def __post_init__(self) -> None:
        check_topic(self.topic, "topic")

    def client(self, mqtt: Any, suffix: str = "", clean_session: bool | None = None) -> Any:
        """A paho client for this broker: the user and password from the environment, TLS when asked, paho's own
        reconnect; ``suffix`` keeps a second client of the station (the trigger subscriber) off this one's id."""
        client_id = f"{self.client_id}{suffix}" if self.client_id else ""
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
        user = os.environ.get(MQTT_USERNAME_ENV)
        if user:
            client.username_pw_set(user, os.environ.get(MQTT_PASSWORD_ENV))
        if self.tls:
            client.tls_set(ca_certs=self.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        return client


class MqttSink:
    """QoS 1 publishing with paho-mqtt's network thread, which reconnects by itself. A message whose PUBACK
    did not come is not published again: paho re-sends it after the reconnect and we keep waiting for it.

    User and password come from the environment (``WINCLIP_MQTT_USERNAME`` / ``WINCLIP_MQTT_PASSWORD``), never
    from the command line (which other users can read)."""

    name = "mqtt"

    def __init__(self, config: MqttConfig):
        import paho.mqtt.client as mqtt

        self._mqtt = mqtt
        self.config = config
        self._cond = threading.Condition()
        self._connected = False
        self._acked: set[int] = set()
        self._inflight: tuple[int, int] | None = None  # (message key, paho mid) awaiting PUBACK
        client = config.client(mqtt)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client

    def open(self) -> None:
        """Connect in paho's network thread (it keeps reconnecting by itself)."""
        self._client.connect_async(self.config.host, self.config.port, self.config.keepalive_s)
        self._client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        ok = not reason.is_failure
        if not ok:
            log.warning("mqtt %s:%d refused the connection: %s", self.config.host, self.config.port, reason)
        with self._cond:
            self._connected = ok
            self._cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any = None, properties: Any = None) -> None:
        with self._cond:
            self._acked.add(mid)
            self._cond.notify_all()

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def topic_of(self, message: bytes) -> str:
        """The topic ``message`` is published to: the configured one (line/alerts.py picks one per message)."""
        return self.config.topic

    def deliver(self, key: int, message: bytes, timeout: float) -> None:
        where = f"{self.config.host}:{self.config.port}"
        if self._inflight is None or self._inflight[0] != key:
            if not self._wait(lambda: self._connected, min(timeout, CONNECT_WAIT_S)):
                raise SinkUnavailable(f"mqtt: not connected to {where}")
            info = self._client.publish(self.topic_of(message), message, qos=1)  # not under _cond: paho calls back
            if info.rc not in (self._mqtt.MQTT_ERR_SUCCESS, self._mqtt.MQTT_ERR_NO_CONN):
                raise SinkUnavailable(f"mqtt: publish to {where} failed: {self._mqtt.error_string(info.rc)}")
            self._inflight = (key, info.mid)  # NO_CONN: queued by paho, sent on reconnect
        mid = self._inflight[1]
        if not self._wait(lambda: mid in self._acked or not self._connected, timeout) or mid not in self._acked:
            raise SinkUnavailable(f"mqtt: no PUBACK from {where} (connection lost or over {timeout:.0f} s)")
        with self._cond:
            self._acked.discard(mid)
        self._inflight = None

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def check_webhook_url(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise WinclipError(f"--webhook needs an http:// or https:// URL, got {url!r}")


class WebhookSink:
    """POSTs each message as ``application/json``; any 2xx answer confirms it."""

    name = "webhook"

    def __init__(self, url: str):
        check_webhook_url(url)
        self.url = url

    def open(self) -> None:
        pass

    def deliver(self, key: int, message: bytes, timeout: float) -> None:
        request = urllib.request.Request(self.url, data=message, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
        except urllib.error.HTTPError as err:
            raise SinkUnavailable(f"webhook {self.url} answered HTTP {err.code}") from None
        except (OSError, ValueError) as err:  # URLError, timeouts, refused connections
            raise SinkUnavailable(f"webhook {self.url}: {getattr(err, 'reason', err)}") from None

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class SinkStats:
    name: str
    delivered: int
    pending: int  # waiting in the spool
    overflow: int  # refused by a full spool (this run)
    failures: int  # failed delivery attempts
    up: bool


class SpooledSink:
    """A sink behind its spool, with the delivery thread (see the module docstring)."""

    def __init__(self, sink: Sink, spool: Spool, retry_min_s: float = 0.5, retry_max_s: float = 30.0):
        self.sink, self.spool = sink, spool
        self.name = sink.name
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self.delivered = self.failures = 0
        self._up = True
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name=f"winclip-sink-{self.name}", daemon=True)
        if spool.recovered:
            log.info("sink %s: %d messages from an earlier run are delivered first", self.name, spool.recovered)
        self._thread.start()

    def put(self, message: dict[str, Any]) -> bool:
        """Spool ``message``; False (counted, logged) when the spool is full."""
        if self.spool.put(json.dumps(message).encode()) is None:
            log.error("sink %s: spool full (%d messages): decision %s is NOT sent there (it is in results.jsonl); "
                      "%d refused so far", self.name, self.spool.max_messages, message.get("id"), self.spool.overflow)
            return False
        self._wake.set()
        return True

    def stats(self) -> SinkStats:
        return SinkStats(self.name, self.delivered, len(self.spool), self.spool.overflow, self.failures, self._up)

    def _run(self) -> None:
        self.sink.open()
        delay = self.retry_min_s
        while True:
            item = self.spool.peek()
            if item is None:
                if self._closing.is_set():
                    return
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            key, message = item
            try:
                self.sink.deliver(key, message, min(SEND_TIMEOUT_S, max(self._deadline - time.monotonic(), 0.1)))
            except Exception as err:  # any failure: the message stays first in the spool
                self.failures += 1
                if self._up:
                    log.warning("sink %s down (%s); decisions wait in %s", self.name, err, self.spool.folder)
                    self._up = False
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    return
                pause = min(delay, remaining)
                if self._closing.is_set():
                    time.sleep(pause)  # flushing before exit: keep trying until the deadline
                else:
                    self._closing.wait(pause)
                delay = min(delay * 2, self.retry_max_s)
                continue
            waiting = len(self.spool)  # this one included: it waited too
            self.spool.pop(key)
            self.delivered += 1
            delay = self.retry_min_s
            if not self._up:
                log.warning("sink %s is back; delivering the spooled decisions (%d waiting)", self.name, waiting)
                self._up = True

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is spooled for at most ``timeout`` seconds; the rest stays on disk for the next start."""
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout + SEND_TIMEOUT_S + 1)
        left = len(self.spool)
        if left:
            log.warning("sink %s: %d decisions stay spooled in %s and are sent at the next start", self.name, left,
                        self.spool.folder)
        self.sink.close()


# ---------------------------------------------------------------- the built-in kinds (registry.py)
@dataclass(frozen=True)
class MqttOptions:
    """An MQTT sink in a station file. ``port`` None: 8883 with TLS, else 1883; ``topic`` None:
    ``winclip/<station>/<first product>/result``; ``client_id`` None: ``winclip-edge-<station>``."""

    host: str
    port: Optional[int] = None
    topic: Optional[str] = None
    tls: bool = False
    ca_file: Optional[str] = None
    client_id: Optional[str] = None
    keepalive_s: int = 30

    def __post_init__(self) -> None:
        if not self.host:
            raise WinclipError("an mqtt sink needs a host")
        if self.port is not None and not 0 < self.port < 65536:
            raise WinclipError(f"mqtt port must be in 1-65535, got {self.port}")
        if self.topic is not None:
            check_topic(self.topic, "--mqtt-topic")  # a topic one can publish to: no wildcard, no $, no NUL

    def config(self, context: SinkContext) -> MqttConfig:
        return MqttConfig(host=self.host, port=self.port or (8883 if self.tls else 1883),
                          topic=self.topic or topic("winclip", context.station, context.products[0], "result"), tls=self.tls,
                          ca_file=self.ca_file, client_id=self.client_id or f"winclip-edge-{context.station}",
                          keepalive_s=self.keepalive_s)


@dataclass(frozen=True)
class WebhookOptions:
    url: str

    def __post_init__(self) -> None:
        check_webhook_url(self.url)


def _mqtt(name: str, options: MqttOptions, context: SinkContext) -> MqttSink:
    sink = MqttSink(options.config(context))
    sink.name = name
    return sink


def _webhook(name: str, options: WebhookOptions, context: SinkContext) -> WebhookSink:
    sink = WebhookSink(options.url)
    sink.name = name
    return sink


BUILTIN_SINKS = (
    SinkPlugin("mqtt", MqttOptions, _mqtt, requires=("paho.mqtt.client",), install='pip install "winclip-edge[line]"'),
    SinkPlugin("webhook", WebhookOptions, _webhook),
)
