"""A real mosquitto on a free loopback port with a generated config (the launcher's own,
with TCP_NODELAY); it can be killed and restarted on the same port. The `broker` fixture
(tests/conftest.py) starts one per test."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from services import launcher

BINARY = launcher.mosquitto_binary()


class Broker:
    def __init__(self, directory: Path):
        self.port = launcher.free_port()
        self.conf = directory / launcher.MOSQUITTO_CONF
        self.conf.write_text(launcher.mosquitto_config(self.port))
        self.log = directory / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        self.root = f"tlbsim/test/{os.getpid()}-{self.port}"
        self.url = f"mqtt://127.0.0.1:{self.port}/{self.root}"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:  # a second one would lose
            raise RuntimeError("the test broker is already running")  # track of the first
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([BINARY, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        if not launcher.wait_listening("127.0.0.1", self.port, time.monotonic() + 10, self.proc):
            raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without saying goodbye to anyone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
