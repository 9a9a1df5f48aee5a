"""A plain MQTT client on a cluster's topics: what really went over the broker."""
from __future__ import annotations

import asyncio

import aiomqtt

from services.common.mqtt import NODELAY, MqttUrl
from tlbsim.v1 import common_pb2, coordinator_pb2


class Tap:
    """A plain MQTT client on the cluster's topics: what really went over the broker."""

    def __init__(self, url: str):
        self.url = MqttUrl.parse(url)
        self.shootdowns: list[aiomqtt.Message] = []
        self.acks: list[common_pb2.FlushAck] = []
        self._task: asyncio.Task | None = None
        self.client: aiomqtt.Client | None = None

    async def __aenter__(self) -> "Tap":
        ready = asyncio.Event()

        async def listen():
            async with aiomqtt.Client(self.url.host, self.url.port,
                                      socket_options=NODELAY) as client:
                self.client = client
                await client.subscribe(f"{self.url.root}/#", qos=1)
                ready.set()
                async for m in client.messages:
                    if m.topic.matches(self.url.shootdown_topic):
                        self.shootdowns.append(m)
                    elif m.topic.matches(self.url.ack_topic):
                        self.acks.append(common_pb2.FlushAck.FromString(m.payload))

        self._task = asyncio.create_task(listen())
        await asyncio.wait_for(ready.wait(), 5)
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def real_shootdowns(self) -> list[coordinator_pb2.ShootdownRequest]:
        out = [coordinator_pb2.ShootdownRequest.FromString(m.payload) for m in self.shootdowns]
        return [s for s in out if s.flush.mm != 0]

    async def settle(self, count: int, what: str = "acks", timeout: float = 5.0) -> None:
        for _ in range(int(timeout / 0.02)):
            if len(getattr(self, what)) >= count:
                return
            await asyncio.sleep(0.02)
