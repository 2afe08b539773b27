"""Shared fixtures: real ``volunteer`` daemons as subprocesses with temporary homes.

``volunteer_daemon`` is a factory: ``start(home, *args)`` launches ``python -m volunteer join``
(default experiment ``demo``, self-benchmark off, peer network off unless ``network=True``;
on, it listens on loopback only), waits until the daemon has published its
control address (``control.json``) and answers ``ping``, and returns a ``DaemonProc``. Every
process started is terminated (SIGTERM, then SIGKILL) at teardown, also when a test fails.
``run_cli`` runs one CLI command to completion with a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PYTHON = sys.executable
STARTUP_TIMEOUT_S = 60.0


def cli_env(network: bool = False, **extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: no self-benchmark, no colour, no inherited home.

    The peer network is off unless ``network=True`` (tests where it is irrelevant stay fast);
    when on, libp2p listens on loopback only.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")}
    env.update({"VOLUNTEER_SELFBENCH": "false", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1",
                "VOLUNTEER_LISTEN_HOST": "127.0.0.1", "VOLUNTEER_NETWORK_ENABLED": "true" if network else "false"})
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m volunteer ARGS`` to completion and capture its output."""
    return subprocess.run([PYTHON, "-m", "volunteer", *args], capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), stdin=subprocess.DEVNULL)


class DaemonProc:
    """A ``volunteer join`` subprocess and what it published."""

    def __init__(self, proc: subprocess.Popen[bytes], home: Path, log_path: Path) -> None:
        self.proc = proc
        self.home = home
        self.log_path = log_path
        self.control: dict = {}

    @property
    def endpoint(self) -> str:
        return self.control["endpoint"]

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> DaemonProc:
        from volunteer.daemon.control_client import call

        deadline = time.monotonic() + timeout
        control_file = self.home / "control.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.output()}")
            if control_file.exists():
                self.control = json.loads(control_file.read_text())
                if self.control.get("pid") == self.proc.pid and call(self.home, "ping", wait_s=5.0):
                    return self
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready within {timeout}s:\n{self.output()}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class DaemonFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[DaemonProc] = []

    def spawn(self, home: Path, *args: str, experiment: str = "demo", env: dict[str, str] | None = None,
              network: bool = False) -> DaemonProc:
        """Launch a daemon without waiting for readiness (peer network on with ``network=True``)."""
        log_path = self.tmp_path / f"daemon-{len(self.procs)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([PYTHON, "-m", "volunteer", "join", experiment, "--home", str(home), *args],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env or cli_env(network=network))
        daemon = DaemonProc(proc, home, log_path)
        self.procs.append(daemon)
        return daemon

    def start(self, home: Path, *args: str, experiment: str = "demo", env: dict[str, str] | None = None,
              network: bool = False) -> DaemonProc:
        return self.spawn(home, *args, experiment=experiment, env=env, network=network).wait_ready()

    def cleanup(self) -> None:
        for daemon in self.procs:
            daemon.terminate()


@pytest.fixture
def volunteer_daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()
