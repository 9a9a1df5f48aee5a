"""A gRPC health probe for container health checks (grpc_health_probe's job, in Python,
so the image needs no extra binary):

    python -m services.common.healthcheck --addr 127.0.0.1:50051 [--service NAME]

One synchronous `grpc.health.v1.Health/Check`; exit 0 only if the answer is SERVING,
otherwise exit 1 with one line on stderr. `--service ""` (the default) asks for the
server as a whole; every tlbsim service also answers for its own service name
(tlbsim.v1.CpuService, …). Without --addr it probes the port of $TLBSIM_LISTEN on
127.0.0.1 (50051 when that is unset). A container hosting several CPUs (`serve cpu --ids`)
names each one's port, `--addr 127.0.0.1:50051,127.0.0.1:50052,...`: healthy only if
every one is SERVING (a crash takes them all, but one may wedge alone)."""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_address() -> str:
    listen = os.environ.get("TLBSIM_LISTEN") or "0.0.0.0:50051"
    return f"127.0.0.1:{listen.rsplit(':', 1)[-1]}"


def check(address: str, service: str = "", timeout: float = 1.0) -> str:
    """The serving status's name; raises grpc.RpcError when the call fails."""
    from services.common.server import sync_channel

    with sync_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.common.healthcheck",
                                description="Exit 0 if a gRPC server reports SERVING.")
    p.add_argument("--addr", default=None,
                   help="HOST:PORT to probe, or several comma-separated (every one must "
                        "serve) (default: 127.0.0.1 and the port of $TLBSIM_LISTEN)")
    p.add_argument("--service", default="", help="service name to check (default: the server)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds (default 1)")
    args = p.parse_args(argv)
    addresses = [a.strip() for a in (args.addr or default_address()).split(",")]
    if not all(addresses):
        p.error(f"--addr {args.addr!r}: an empty address in the list")
    return max(probe(address, args.service, args.timeout) for address in addresses)


def probe(address: str, service: str, timeout: float) -> int:
    """0 if `address` is SERVING, else 1 after one line on stderr."""
    what = f"{address} service {service!r}" if service else address
    try:
        status = check(address, service, timeout)
    except grpc.RpcError as e:
        code = e.code().name if hasattr(e, "code") else "UNKNOWN"
        detail = e.details() if hasattr(e, "details") else str(e)
        print(f"healthcheck: {what}: {code}: {(detail or '').splitlines()[0] if detail else code}",
              file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"healthcheck: {what}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
