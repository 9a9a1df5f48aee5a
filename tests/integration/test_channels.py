"""`channel(own_connection=True)`: a channel opened after a peer came back reaches it at once,
though the process's earlier channel to it is still in reconnect backoff (grpc shares one
connection per address unless told otherwise). Loadgen's `Cluster.discover` relies on it to
find a restarted CPU where it was."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.security import Security
from services.common.server import channel


async def health_server(port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


async def check(ch) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


async def test_a_new_own_connection_reaches_a_restarted_peer_at_once() -> None:
    server, port = await health_server(0)
    address = f"127.0.0.1:{port}"
    old = channel(address, security=Security(), own_connection=True)
    fresh = None
    try:
        assert await check(old) == grpc.StatusCode.OK
        await server.stop(0)
        assert await check(old) == grpc.StatusCode.UNAVAILABLE  # now in reconnect backoff
        server, _ = await health_server(port)  # back where it was
        fresh = channel(address, security=Security(), own_connection=True)
        assert await check(fresh) == grpc.StatusCode.OK
    finally:
        await server.stop(0)
        await old.close()
        if fresh is not None:
            await fresh.close()
