"""The gRPC server skeleton every service shares: health, reflection, metrics,
error mapping and graceful shutdown (after grpc's examples/python servers:
`start_server` returns the bound port, `serve` waits for a signal)."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import signal
import sys
from typing import Any, Awaitable, Callable, Protocol, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from services.common.admin import ADMIN_METHODS
from services.common.errors import REASON_KEY, Code, SimError
from services.common.security import TOKEN_HEADER, Security

log = logging.getLogger("tlbsim")

# 64 MiB, explicit on every channel and server (grpc's default receive limit is 4 MiB):
# the largest legitimate messages are an Access of MAX_ACCESSES (2^20) addresses, ~10 MiB
# packed, and a TLB dump or audit of a few hundred thousand entries; 64 MiB leaves room
# for those while one request still cannot make a service buffer more than that.
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [("grpc.so_reuseport", 0)]  # a port clash fails loudly
# Every unary call through `channel()` that names no timeout gets this one: generous,
# as a munmap of a large populated range or an Access of 2^20 addresses may take tens of
# seconds, yet finite, so a peer that never answers cannot hang its caller. Callers with
# a tighter bound pass their own. Streams (Attach) are long-lived and get none.
DEFAULT_DEADLINE_S = 300.0

STATUS = {c: getattr(grpc.StatusCode, c.value) for c in Code}


class Node(Protocol):
    """A service implementation: registers its servicers, starts and stops its tasks."""
    @property
    def service_names(self) -> Sequence[str]: ...
    @property
    def registry(self) -> CollectorRegistry: ...

    def add_to_server(self, server: grpc.aio.Server) -> None: ...
    async def start(self, address: str) -> None: ...
    async def stop(self) -> None: ...


class _DefaultDeadline:
    """A unary multicallable whose calls get a deadline (and, for admin methods, the
    token) unless the caller gave one: one Python call of overhead, no interceptor."""
    __slots__ = ("_call", "_timeout", "_metadata")

    def __init__(self, call, timeout: float, metadata: tuple | None):
        self._call, self._timeout, self._metadata = call, timeout, metadata

    def __call__(self, request, *, timeout=None, metadata=None, **kwargs):
        if self._metadata is not None:
            metadata = (*(metadata or ()), *self._metadata)
        return self._call(request, timeout=self._timeout if timeout is None else timeout,
                          metadata=metadata, **kwargs)


class Channel:
    """A grpc.aio channel (all its methods) whose unary calls always have a deadline."""

    def __init__(self, inner: grpc.aio.Channel, timeout: float, token: str):
        self._inner, self._timeout = inner, timeout
        self._token = ((TOKEN_HEADER, token),) if token else None

    def unary_unary(self, method: str, *args, **kwargs):
        metadata = self._token if method in ADMIN_METHODS else None
        return _DefaultDeadline(self._inner.unary_unary(method, *args, **kwargs),
                                self._timeout, metadata)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    async def __aenter__(self) -> "Channel":
        return self

    async def __aexit__(self, *exc) -> None:
        await self._inner.close()


def channel(address: str, default_timeout: float = DEFAULT_DEADLINE_S,
            security: Security | None = None, own_connection: bool = False) -> Channel:
    """The one way a tlbsim process opens a channel: message limits, a deadline on every
    unary call, TLS when a CA is configured, the admin token on admin calls.

    `own_connection`: grpc shares one connection per address among a process's channels,
    so a new channel to a peer that was down inherits the old connection's reconnect
    backoff (up to seconds) and fails UNAVAILABLE although the peer serves again. A
    caller that opens channels afresh to find restarted peers asks for its own."""
    security = Security.from_env() if security is None else security
    creds, options = _channel_settings(security)
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    inner = grpc.aio.insecure_channel(address, options=options) if creds is None else \
        grpc.aio.secure_channel(address, creds, options=options)
    return Channel(inner, default_timeout, security.token)


def sync_channel(address: str, security: Security | None = None) -> grpc.Channel:
    """A blocking channel (health probes in the launcher and the healthcheck command):
    TLS when configured, like `channel()`."""
    security = Security.from_env() if security is None else security
    creds, options = _channel_settings(security)
    return grpc.insecure_channel(address, options=options) if creds is None else \
        grpc.secure_channel(address, creds, options=options)


def _channel_settings(security: Security) -> tuple[grpc.ChannelCredentials | None, list]:
    """Credentials (None: plaintext) and options, the same for both kinds of channel."""
    creds = security.channel_credentials()
    options: list[tuple[str, str | int]] = list(CHANNEL_OPTIONS)
    if creds is not None and security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
    return creds, options


class _Undecodable:
    """What a request that fails to parse becomes, so the handler can answer
    INVALID_ARGUMENT (grpc itself would answer INTERNAL)."""
    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


class Guard:
    """Every call's gate: requests that do not parse get INVALID_ARGUMENT, admin calls
    without the right token UNAUTHENTICATED. It wraps each method's handler once, as the
    node registers it (see `_Registrar`): no interceptor runs per call."""

    def __init__(self, token: str, token_required: bool, listen: str):
        self._token = token.encode()
        self._required = token_required
        self._listen = listen

    def wrap(self, method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if h.request_streaming or h.response_streaming:
            return h  # streams (Attach) as grpc handles them; no stream is an admin call
        decode, behavior = h.request_deserializer, h.unary_unary
        admin = method in ADMIN_METHODS and self._required

        def safe_decode(data: bytes):
            try:
                return decode(data) if decode else data
            except Exception as e:  # protobuf's DecodeError and friends
                return _Undecodable(f"{type(e).__name__}: {e}")

        async def guarded(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{method}: the request does not parse ({request.error})")
            if admin:
                await self._check_token(method, context)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=safe_decode,
            response_serializer=h.response_serializer)

    async def _check_token(self, method: str, context) -> None:
        if not self._token:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method} is an admin call and this service listens on "
                                f"{self._listen} without a token: set TLBSIM_TOKEN")
        given = dict(context.invocation_metadata() or ()).get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method} is an admin call: "
                                f"{'wrong' if given else 'missing'} token")


class _Registrar:
    """What a node's `add_to_server` sees: the server, but the handlers that the
    generated `add_*Servicer_to_server` registers go through the Guard first. (The
    generated code registers one dict twice, as registered methods and as a generic
    handler; both get the wrapped handlers.)"""

    def __init__(self, server: grpc.aio.Server, guard: Guard):
        self._server, self._guard = server, guard

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        wrapped = {name: self._guard.wrap(f"/{service}/{name}", h)
                   for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)

    def add_generic_rpc_handlers(self, handlers) -> None:
        """The generated code's second registration of the same methods: already done,
        wrapped, by add_registered_method_handlers."""


def rpc(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn domain errors into their status codes (and their reason, as trailing
    metadata); pass a failed downstream call's status and reason through. Anything else
    is a bug and surfaces as UNKNOWN."""
    @functools.wraps(fn)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await fn(self, request, context)
        except SimError as e:
            await context.abort(STATUS[e.code], e.message, _reason_metadata(e.reason))
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or e.code().name,
                                _reason_metadata(reason_of(e)))
    return wrapper


def _reason_metadata(reason: str) -> tuple:
    return ((REASON_KEY, reason),) if reason else ()


def reason_of(e: grpc.RpcError) -> str:
    """The machine-readable reason a tlbsim service attached to a failed call, or ""."""
    try:
        metadata = e.trailing_metadata() or ()
    except Exception:  # a locally made error may carry none
        return ""
    for key, value in metadata:
        if key == REASON_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return ""


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
                       advertise: str | None = None,
                       security: Security | None = None) -> RunningServer:
    security = Security.from_env() if security is None else security
    guard = Guard(security.token, security.token_required(listen), listen)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    node.add_to_server(_Registrar(server, guard))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*node.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    try:
        creds = security.server_credentials()
        port = (server.add_insecure_port(listen) if creds is None
                else server.add_secure_port(listen, creds))
    except RuntimeError as e:
        raise OSError(f"cannot listen on {listen}: {e}") from None
    await server.start()
    address = advertised_address(listen, port, advertise)
    await node.start(address)
    for name in (*node.service_names, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, health_servicer, node, address)


@dataclasses.dataclass
class Hosted:
    """One node a process serves: where it listens, its metrics port (None: no metrics),
    the address it advertises, and what its ready line says about it."""
    node: Node
    listen: str
    metrics_port: int | None
    advertise: str | None
    ready: dict


async def serve(node: Node, listen: str, metrics_port: int | None, ready: dict,
                advertise: str | None = None) -> None:
    """Run one node until SIGTERM/SIGINT; announce readiness as one JSON line on stdout
    (its fields, address and metrics_port)."""
    await serve_all([Hosted(node, listen, metrics_port, advertise, {})], ready)


async def serve_all(hosted: Sequence[Hosted], ready: dict) -> None:
    """Run several nodes in this process, each its own gRPC server on its own port with
    its own metrics server, until SIGTERM/SIGINT; then stop them all. When every one
    serves, print one JSON line: `ready`'s fields and `nodes`, each node's ready fields
    with its address and metrics_port; a single node's are also at the top level (the
    line one service always printed)."""
    running: list[RunningServer] = []
    lines: list[dict] = []
    try:
        for h in hosted:
            server = await start_server(h.node, h.listen, h.advertise)
            running.append(server)
            line = dict(h.ready, address=server.address)
            if h.metrics_port is not None:
                try:
                    metrics_server, _ = start_http_server(
                        h.metrics_port, addr=bind_host(h.listen), registry=h.node.registry)
                except OSError as e:
                    raise OSError(e.errno, f"metrics port {h.metrics_port}: "
                                           f"{e.strerror}") from None
                line["metrics_port"] = metrics_server.server_port
            lines.append(line)
    except BaseException:  # a busy port: stop what started, inside the loop, then say so
        await asyncio.gather(*(r.stop() for r in running), return_exceptions=True)
        raise
    info = dict(ready, event="ready")
    if len(lines) == 1:
        info.update(lines[0])
    info["nodes"] = lines
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps(info), flush=True)
    log.info("%s serving on %s", ready.get("service"),
             ", ".join(r.address for r in running))
    await stop.wait()
    log.info("%s shutting down", ready.get("service"))
    await asyncio.gather(*(r.stop() for r in running))
    sys.stdout.flush()
