"""The gRPC server skeleton every service shares: health, reflection, metrics,
error mapping and graceful shutdown (after grpc's examples/python servers:
`start_server` returns the bound port, `serve` waits for a signal)."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import signal
import sys
from typing import Any, Awaitable, Callable, Protocol, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from services.common.errors import Code, SimError

log = logging.getLogger("tlbsim")

MAX_MESSAGE_BYTES = 64 << 20  # explicit on every channel and server
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [("grpc.so_reuseport", 0)]  # a port clash fails loudly

STATUS = {c: getattr(grpc.StatusCode, c.value) for c in Code}


class Node(Protocol):
    """A service implementation: registers its servicers, starts and stops its tasks."""
    service_names: Sequence[str]
    registry: CollectorRegistry

    def add_to_server(self, server: grpc.aio.Server) -> None: ...
    async def start(self, address: str) -> None: ...
    async def stop(self) -> None: ...


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def rpc(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn domain errors into their status codes; pass a failed downstream call's
    status through. Anything else is a bug and surfaces as UNKNOWN."""
    @functools.wraps(fn)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await fn(self, request, context)
        except SimError as e:
            await context.abort(STATUS[e.code], e.message)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or e.code().name)
    return wrapper


def completes(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """For a handler whose work must not stop halfway (a system call, a fault, an access
    batch whose faults hand back flushes the CPU owes itself): the work runs in a task
    of its own, so a client that cancels or times out leaves it to finish, and the
    simulated machine is never left between clearing a PTE and flushing it."""
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        task = asyncio.ensure_future(fn(self, request, context))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # no stray warnings
        return await asyncio.shield(task)
    return wrapper


@dataclasses.dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    node: Node
    address: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()  # probes go NOT_SERVING first
        await self.node.stop()
        await self.server.stop(grace)


def advertised_address(listen: str, port: int, advertise: str | None = None) -> str:
    """The address other services reach this one at: `advertise` when given (HOST or
    HOST:PORT; HOST alone takes the bound port), else the listen host with the bound
    port, a wildcard host (0.0.0.0, ::) meaning loopback."""
    if advertise:
        host, sep, tail = advertise.rpartition(":")
        if sep and tail.isdigit() and not host.endswith(":"):
            return advertise
        return f"{advertise}:{port}"
    host = listen.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def bind_host(listen: str) -> str:
    """The host a side server (metrics) binds to: the gRPC listen host."""
    return listen.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"


async def start_server(node: Node, listen: str = "127.0.0.1:0",
                       advertise: str | None = None) -> RunningServer:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    node.add_to_server(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*node.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {listen}: {e}") from None
    await server.start()
    address = advertised_address(listen, port, advertise)
    await node.start(address)
    for name in (*node.service_names, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, health_servicer, node, address)


async def serve(node: Node, listen: str, metrics_port: int | None, ready: dict,
                advertise: str | None = None) -> None:
    """Run until SIGTERM/SIGINT; announce readiness as one JSON line on stdout."""
    running = await start_server(node, listen, advertise)
    info = dict(ready, event="ready", address=running.address)
    if metrics_port is not None:
        metrics_server, _ = start_http_server(metrics_port, addr=bind_host(listen),
                                              registry=node.registry)
        info["metrics_port"] = metrics_server.server_port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps(info), flush=True)
    log.info("%s serving on %s", ready.get("service"), running.address)
    await stop.wait()
    log.info("%s shutting down", ready.get("service"))
    await running.stop()
    sys.stdout.flush()
