"""Security basics (issue 8): loopback by default, the admin token, TLS and mutual TLS
for gRPC with certificates made at test time (openssl), MQTT credentials against a
real mosquitto with a password file."""
from __future__ import annotations

import asyncio
import getpass
import inspect
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from services import cli
from services.common.admin import ADMIN_METHODS
from services.common.errors import InvalidArgument
from services.common.mqtt import MqttCredentials, MqttLink, MqttUrl
from services.common import wire
from services.common.policy import Policy
from services.common.security import Security, is_loopback
from services.common.server import channel, start_server
from services.coordinator.service import CoordinatorNode
from services import launcher
from tests.harness import InProcessCluster
from tlbsim.v1 import (common_pb2, coordinator_pb2, coordinator_pb2_grpc, cpu_pb2, memory_pb2)

PAGE = 4096
SECURITY_VARS = ("TLBSIM_TOKEN", "TLBSIM_TOKEN_FILE", "TLBSIM_TLS_CERT", "TLBSIM_TLS_KEY",
                 "TLBSIM_TLS_CA", "TLBSIM_TLS_CLIENT_AUTH", "TLBSIM_TLS_SERVER_NAME",
                 "TLBSIM_MQTT_USERNAME", "TLBSIM_MQTT_PASSWORD", "TLBSIM_MQTT_PASSWORD_FILE",
                 "TLBSIM_LISTEN")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in SECURITY_VARS:
        monkeypatch.delenv(var, raising=False)


# --- defaults ---------------------------------------------------------------------------------
def test_services_listen_on_loopback_by_default():
    assert inspect.signature(start_server).parameters["listen"].default == "127.0.0.1:0"
    args = cli.build_parser().parse_args(["serve", "coordinator"])
    assert args.listen == "127.0.0.1:0"
    assert '"--listen", "127.0.0.1:0"' in inspect.getsource(launcher.processes)  # its children
    assert "listener {port} 127.0.0.1" in inspect.getsource(launcher.mosquitto_config)
    assert is_loopback("127.0.0.1:0") and is_loopback("[::1]:5") and is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:50051") and not is_loopback("[::]:1")
    assert not is_loopback("cpu-0:50051")


def test_every_reset_and_fault_injection_rpc_is_an_admin_call():
    from tlbsim.v1 import coordinator_pb2 as c, cpu_pb2 as p, memory_pb2 as m
    methods = {f"/{s.full_name}/{meth.name}" for f in (c, p, m)
               for s in f.DESCRIPTOR.services_by_name.values() for meth in s.methods}
    admin_like = {x for x in methods if re.search(r"/(Reset|Chaos|Reconfigure|Configure)", x)}
    assert admin_like <= ADMIN_METHODS
    assert ADMIN_METHODS <= methods  # no stale names


# --- the admin token ----------------------------------------------------------------------------
async def reset_call(address: str, security: Security):
    async with channel(address, security=security) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        await stub.ListCpus(coordinator_pb2.ListCpusRequest(), timeout=5)  # never needs it
        return await stub.Reset(coordinator_pb2.CoordinatorResetRequest(
            policy=wire.policy_to_proto(Policy())), timeout=5)


async def expect_unauthenticated(call, text):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
    assert text in e.value.details()


async def test_admin_calls_need_the_token_when_one_is_set():
    server = await start_server(CoordinatorNode(metrics=False),
                                security=Security(token="s3cret"))
    try:
        await expect_unauthenticated(reset_call(server.address, Security()), "missing token")
        await expect_unauthenticated(reset_call(server.address, Security(token="guess")),
                                     "wrong token")
        await reset_call(server.address, Security(token="s3cret"))
    finally:
        await server.stop(0)


async def test_beyond_loopback_admin_calls_are_refused_until_a_token_is_set():
    open_server = await start_server(CoordinatorNode(metrics=False), listen="0.0.0.0:0",
                                     security=Security())
    guarded = await start_server(CoordinatorNode(metrics=False), listen="0.0.0.0:0",
                                 security=Security(token="s3cret"))
    try:
        # Only loopback traffic here: a wildcard listener is reached at 127.0.0.1.
        assert open_server.address.startswith("127.0.0.1:")
        await expect_unauthenticated(reset_call(open_server.address, Security(token="x")),
                                     "without a token: set TLBSIM_TOKEN")
        await reset_call(guarded.address, Security(token="s3cret"))
    finally:
        await open_server.stop(0)
        await guarded.stop(0)


def test_the_cli_flags_set_the_variables_every_process_reads(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    args = cli.build_parser().parse_args(["--token-file", str(token), "--tls-client-auth",
                                          "serve", "coordinator"])
    try:
        cli.export_security(args)  # sets os.environ itself, as main() does
        assert os.environ["TLBSIM_TOKEN_FILE"] == str(token)
        assert os.environ["TLBSIM_TLS_CLIENT_AUTH"] == "1"
        with pytest.raises(InvalidArgument, match="TLBSIM_TLS_CLIENT_AUTH needs"):
            Security.from_env()  # no CA or certificate given
        del os.environ["TLBSIM_TLS_CLIENT_AUTH"]
        assert Security.from_env().token == "s3cret"
    finally:
        for var in SECURITY_VARS:
            os.environ.pop(var, None)


# --- TLS ----------------------------------------------------------------------------------------
def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, and a node certificate it signed for 127.0.0.1/localhost (server and client)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=tlbsim test CA", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "extendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("node", "stranger"):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=tlbsim {name}", cwd=d)
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "node.crt", "-days", "1", "-extfile", "ext.cnf", cwd=d)
    # A certificate no tlbsim CA signed: self-signed.
    openssl("x509", "-req", "-in", "stranger.csr", "-key", "stranger.key",
            "-out", "stranger.crt", "-days", "1", "-extfile", "ext.cnf", cwd=d)
    return d


def tls_env(monkeypatch, certs: Path, client_auth: bool = False) -> None:
    monkeypatch.setenv("TLBSIM_TLS_CERT", str(certs / "node.crt"))
    monkeypatch.setenv("TLBSIM_TLS_KEY", str(certs / "node.key"))
    monkeypatch.setenv("TLBSIM_TLS_CA", str(certs / "ca.crt"))
    if client_auth:
        monkeypatch.setenv("TLBSIM_TLS_CLIENT_AUTH", "1")


async def plaintext_fails(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ListCpus(coordinator_pb2.ListCpusRequest(), timeout=3)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("client_auth", [False, True], ids=["tls", "mutual-tls"])
async def test_a_tls_cluster_serves_and_plaintext_is_refused(certs, monkeypatch, client_auth):
    tls_env(monkeypatch, certs, client_auth)
    async with InProcessCluster(cpus=2) as c:
        cl = c.client
        await cl.reset(Policy(), 2)
        mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest())).mm
        cpus = [x.stub for x in cl.cpus]
        for cpu in cpus:
            await cpu.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
        base = (await cpus[0].Syscall(common_pb2.SyscallRequest(
            mmap=common_pb2.MmapArgs(pages=4, writable=True)))).address
        for cpu in cpus:
            await cpu.Access(cpu_pb2.AccessRequest(addresses=[base + i * PAGE for i in range(4)],
                                                 writes=b"\x01" * 4))
        r = await cpus[0].Syscall(common_pb2.SyscallRequest(
            munmap=common_pb2.RangeArgs(address=base, pages=4)))
        assert r.pages_freed == 4 and r.shootdowns >= 1  # CPU 1 was reached over TLS
        assert (await cl.memory.Stats(memory_pb2.MemoryStatsRequest())).stale_accesses == 0
        await plaintext_fails(c.coordinator.address)
        if client_auth:  # TLS, but a certificate the cluster's CA did not sign
            stranger = Security(tls_ca=(certs / "ca.crt").read_bytes(),
                                tls_cert=(certs / "stranger.crt").read_bytes(),
                                tls_key=(certs / "stranger.key").read_bytes())
            async with channel(c.coordinator.address, security=stranger) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await coordinator_pb2_grpc.CoordinatorServiceStub(ch).ListCpus(
                        coordinator_pb2.ListCpusRequest(), timeout=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# --- MQTT credentials ------------------------------------------------------------------------------
@pytest.fixture
def locked_broker(tmp_path):
    """mosquitto on a loopback port that only lets `tlbsim` (password `hunter2`) in."""
    binary = launcher.mosquitto_binary()
    if binary is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto is not installed (tools/setup-debian.sh installs it)")
    port = launcher.free_port()
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "tlbsim", "hunter2"],
                   check=True, capture_output=True)
    conf = tmp_path / "mosquitto.conf"
    # `user`: started by root, mosquitto would become `mosquitto`, who cannot read the
    # test's private temporary directory; as anyone else the line is ignored.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\n"
                    f"password_file {passwords}\nset_tcp_nodelay true\n"
                    f"user {getpass.getuser()}\n")
    log = open(tmp_path / "mosquitto.log", "wb")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log)
    try:
        assert launcher.wait_listening("127.0.0.1", port, time.monotonic() + 10, proc), \
            (tmp_path / "mosquitto.log").read_text()
        yield f"mqtt://127.0.0.1:{port}/tlbsim/test/creds"
    finally:
        proc.terminate()
        proc.wait(5)
        log.close()


async def link(url: str, credentials: MqttCredentials) -> MqttLink:
    async def ignore(message):
        pass
    m = MqttLink(MqttUrl.parse(url), "test", [], ignore, "nothing happens",
                 credentials=credentials)
    await m.start(wait_s=3)
    return m


async def test_mqtt_credentials_right_and_wrong(locked_broker, caplog):
    right = await link(locked_broker, MqttCredentials("tlbsim", "hunter2"))
    wrong = await link(locked_broker, MqttCredentials("tlbsim", "guess"))
    anonymous = await link(locked_broker, MqttCredentials())
    try:
        assert right.connected
        assert not wrong.connected and not anonymous.connected
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "refused the login of 'tlbsim'" in logged
        assert "refused an anonymous login (set TLBSIM_MQTT_USERNAME)" in logged
    finally:
        for m in (right, wrong, anonymous):
            await m.stop()


async def test_mqtt_credentials_come_from_the_environment(locked_broker, monkeypatch, tmp_path):
    secret = tmp_path / "mqtt-password"
    secret.write_text("hunter2\n")
    monkeypatch.setenv("TLBSIM_MQTT_USERNAME", "tlbsim")
    monkeypatch.setenv("TLBSIM_MQTT_PASSWORD_FILE", str(secret))
    async with InProcessCluster(cpus=2, mqtt_url=locked_broker) as c:
        assert await c.coordinator.node.mqtt.wait_connected(5)
        r = await c.client.coordinator.PingFanout(coordinator_pb2.PingFanoutRequest(
            targets=[0, 1], transport=common_pb2.TRANSPORT_MQTT, rounds=2), timeout=10)
        assert len(r.latency_s) == 2


async def test_wrong_mqtt_credentials_fall_back_to_grpc(locked_broker, monkeypatch, caplog):
    monkeypatch.setenv("TLBSIM_MQTT_USERNAME", "tlbsim")
    monkeypatch.setenv("TLBSIM_MQTT_PASSWORD", "guess")
    caplog.set_level(logging.WARNING)
    async with InProcessCluster(cpus=2, mqtt_url=locked_broker) as c:
        cl = c.client
        await cl.reset(Policy(transport="mqtt"), 2)
        mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest())).mm
        cpus = [x.stub for x in cl.cpus]
        for cpu in cpus:
            await cpu.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
        base = (await cpus[0].Syscall(common_pb2.SyscallRequest(
            mmap=common_pb2.MmapArgs(pages=2, writable=True)))).address
        for cpu in cpus:
            await cpu.Access(cpu_pb2.AccessRequest(addresses=[base, base + PAGE]))
        r = await cpus[0].Syscall(common_pb2.SyscallRequest(
            munmap=common_pb2.RangeArgs(address=base, pages=2)))
        assert r.shootdowns >= 1
        s = await cl.coordinator.Stats(coordinator_pb2.CoordinatorStatsRequest())
        assert s.broker_down >= 1 and s.deadline_misses == 0
        await asyncio.sleep(0)
    assert "refused the login of 'tlbsim'" in caplog.text
