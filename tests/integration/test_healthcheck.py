"""The container health probe (`python -m services.common.healthcheck`), run as the container
runs it, against real health servers: with several addresses (a container hosting several
CPUs) it is healthy only while every one of them serves."""
from __future__ import annotations

import asyncio
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.processes import ROOT


async def _health_server() -> tuple[grpc.aio.Server, health.aio.HealthServicer, str]:
    server, servicer = grpc.aio.server(), health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


async def _probe(*args: str) -> tuple[int, str]:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.common.healthcheck", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(p.communicate(), 60)
    return p.returncode, err.decode()


async def test_a_probe_of_several_cpus_fails_when_any_one_does_not_serve():
    (s1, _, a1), (s2, h2, a2) = await _health_server(), await _health_server()
    try:
        assert await _probe("--addr", f"{a1},{a2}") == (0, "")
        await h2.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        rc, err = await _probe("--addr", f"{a1},{a2}")
        assert rc == 1 and err.strip() == f"healthcheck: {a2}: NOT_SERVING"
        assert await _probe("--addr", a1) == (0, "")  # the first alone still serves
    finally:
        await s1.stop(0)
        await s2.stop(0)
