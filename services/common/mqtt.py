"""MQTT for the `mqtt` shootdown transport (DESIGN.md §4): the broker's URL, the
cluster's topics, and a client that stays connected.

    mqtt://HOST:PORT[/ROOT]      ROOT: the cluster's topic root (default tlbsim/v1/cluster)

    ROOT/shootdown   coordinator -> every CPU: a ShootdownRequest (the flush and its
                     target set); a CPU not in the set ignores it. Never retained.
    ROOT/ack         CPU -> coordinator: a FlushAck carrying the shootdown id.

Nagle is off on the client side (TCP_NODELAY) and must be off in the broker
(`set_tcp_nodelay true`): with it on, a broadcast plus its acks took ~88 ms on
loopback instead of ~1.7 ms (shared reference, python-ecosystem.md §2.2).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from typing import Awaitable, Callable
from urllib.parse import urlsplit

import aiomqtt

from services.common.errors import InvalidArgument

NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
DEFAULT_ROOT = "tlbsim/v1/cluster"
DEFAULT_PORT = 1883
KEEPALIVE_S = 5
CONNECT_TIMEOUT_S = 2.0
BACKOFF_S = (0.05, 1.0)  # reconnect: first retry, largest wait
MAX_QUEUED_IN = 100_000  # messages received, not yet handled: aiomqtt drops past this
MAX_PENDING_OUT = 10_000  # publish_soon messages not yet sent (acks)

log = logging.getLogger("tlbsim.mqtt")


@dataclasses.dataclass(frozen=True)
class MqttUrl:
    host: str
    port: int
    root: str = DEFAULT_ROOT

    @classmethod
    def parse(cls, url: str) -> "MqttUrl":
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise InvalidArgument(f"MQTT URL {url!r}: expected mqtt://HOST[:PORT][/TOPIC-ROOT]")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise InvalidArgument(f"MQTT URL {url!r}: bad port") from None
        root = parts.path.strip("/") or DEFAULT_ROOT
        if any(c in root for c in "+#"):
            raise InvalidArgument(f"MQTT URL {url!r}: the topic root may not hold + or #")
        return cls(parts.hostname, port, root)

    @property
    def shootdown_topic(self) -> str:
        return f"{self.root}/shootdown"

    @property
    def ack_topic(self) -> str:
        return f"{self.root}/ack"

    def __str__(self) -> str:
        return f"mqtt://{self.host}:{self.port}/{self.root}"


@dataclasses.dataclass(frozen=True)
class MqttCredentials:
    """The broker login, from TLBSIM_MQTT_USERNAME and TLBSIM_MQTT_PASSWORD (or
    TLBSIM_MQTT_PASSWORD_FILE, which keeps it out of the environment of `ps e`)."""
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_env(cls, env=os.environ) -> "MqttCredentials":
        password = env.get("TLBSIM_MQTT_PASSWORD")
        path = env.get("TLBSIM_MQTT_PASSWORD_FILE")
        if password is None and path:
            try:
                with open(path, encoding="utf-8") as f:
                    password = f.read().strip()
            except OSError as e:
                raise InvalidArgument(f"TLBSIM_MQTT_PASSWORD_FILE={path}: {e.strerror}") from None
        return cls(env.get("TLBSIM_MQTT_USERNAME") or None, password)


def refused_login(error: Exception) -> bool:
    """Did the broker turn the client's credentials down (MQTT 3.1.1 codes 4/5, MQTT 5
    codes 134/135)?"""
    text = str(error).lower()
    return any(s in text for s in ("not authori", "bad user", "code:4]", "code:5]",
                                   "code:134", "code:135"))


class Outages:
    """How long a link has been without its broker, in seconds (an injected clock): down
    from the start until the first connection, and from every disconnection until the
    next connection."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._since: float | None = None  # when the current outage began
        self._total = 0.0
        self.count = 0  # outages begun

    def down(self) -> None:
        if self._since is None:
            self._since = self._clock()
            self.count += 1

    def up(self) -> None:
        if self._since is not None:
            self._total += self._clock() - self._since
            self._since = None

    def seconds(self) -> float:
        ongoing = self._clock() - self._since if self._since is not None else 0.0
        return self._total + ongoing


class MqttUnavailable(Exception):
    """The broker is not connected (or the connection broke while publishing)."""


OnMessage = Callable[[aiomqtt.Message], Awaitable[None]]


class MqttLink:
    """One client kept connected to the broker: (re)subscribes to `topics`, hands every
    message to `on_message`, and reconnects with backoff when the broker goes away.
    Each outage is logged once, with `while_down` saying what happens meanwhile."""

    def __init__(self, url: MqttUrl, name: str, topics: list[str], on_message: OnMessage,
                 while_down: str, credentials: MqttCredentials | None = None):
        self.credentials = MqttCredentials.from_env() if credentials is None else credentials
        self.url = url
        self.name = name
        self.topics = topics
        self.on_message = on_message
        self.while_down = while_down
        self.outages = Outages()  # time without the broker (a metric of the coordinator)
        self._client: aiomqtt.Client | None = None
        self._up = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._said_down = False
        self._pending: set[asyncio.Task] = set()

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def start(self, wait_s: float = 5.0) -> None:
        """Start the connection loop; wait up to wait_s for the first connection
        (not an error if the broker is not there yet: the loop keeps trying)."""
        self.outages.down()  # until the first connection
        self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.name}")
        try:
            await asyncio.wait_for(self._up.wait(), wait_s)
        except asyncio.TimeoutError:
            pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for t in list(self._pending):
            t.cancel()

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def publish(self, topic: str, payload: bytes, qos: int, timeout: float) -> None:
        client = self._client
        if client is None:
            raise MqttUnavailable(f"not connected to {self.url}")
        try:
            await client.publish(topic, payload, qos=qos, timeout=max(timeout, 0.001))
        except aiomqtt.MqttError as e:
            raise MqttUnavailable(str(e)) from None

    def publish_soon(self, topic: str, payload: bytes, qos: int, timeout: float = 5.0) -> None:
        """Publish without waiting (an ack); a failure only loses this message. At most
        MAX_PENDING_OUT wait at once: past that the message is dropped (the sender's
        shootdown falls back to gRPC), so a stalled broker cannot grow memory."""
        if len(self._pending) >= MAX_PENDING_OUT:
            log.debug("%s: %d publishes pending; dropping one to %s", self.name,
                      len(self._pending), topic)
            return
        async def go():
            try:
                await self.publish(topic, payload, qos, timeout)
            except MqttUnavailable as e:
                log.debug("%s: publish to %s failed: %s", self.name, topic, e)
        task = asyncio.create_task(go())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _run(self) -> None:
        backoff = BACKOFF_S[0]
        while True:
            client = aiomqtt.Client(
                self.url.host, self.url.port, identifier=f"tlbsim-{self.name}-{os.urandom(4).hex()}",
                socket_options=NODELAY, keepalive=KEEPALIVE_S, clean_session=True,
                timeout=CONNECT_TIMEOUT_S, max_queued_incoming_messages=MAX_QUEUED_IN,
                username=self.credentials.username, password=self.credentials.password)
            try:
                async with client:
                    for topic in self.topics:
                        await client.subscribe(topic, qos=1)
                    self._client = client
                    self.outages.up()
                    self._up.set()
                    backoff = BACKOFF_S[0]
                    if self._said_down:
                        log.warning("%s: MQTT broker %s is back; using it again", self.name,
                                    self.url)
                        self._said_down = False
                    else:
                        log.info("%s: connected to MQTT broker %s", self.name, self.url)
                    async for message in client.messages:
                        try:
                            await self.on_message(message)
                        except Exception:  # one bad message must not end the link
                            log.exception("%s: handling a message on %s failed", self.name,
                                          message.topic)
            except aiomqtt.MqttError as e:
                if not self._said_down:
                    who = self.credentials.username
                    what = "unreachable"
                    if refused_login(e):
                        what = f"refused the login of {who!r}" if who else \
                            "refused an anonymous login (set TLBSIM_MQTT_USERNAME)"
                    log.warning("%s: MQTT broker %s %s (%s); %s", self.name, self.url, what,
                                e, self.while_down)
                    self._said_down = True
            finally:
                self._client = None
                self.outages.down()
                self._up.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_S[1])
