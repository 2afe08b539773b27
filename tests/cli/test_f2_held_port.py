"""A held port is reported before torch and the experts load, in one plain line (issue 12
review, F2 #11): a real ``volunteer join`` subprocess against a socket this test holds, run
with ``-X importtime`` so the test sees that torch was never imported."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env


def _join(home: Path, *args: str, network: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "volunteer", "join", "demo",
                           "--home", str(home), *args], capture_output=True, text=True, timeout=120,
                          env=cli_env(network=network), stdin=subprocess.DEVNULL)


def _error_line(out: str) -> str:
    return next((ln for ln in out.splitlines() if "cannot start:" in ln), "")


def _imported(out: str, module: str) -> bool:
    return any(ln.startswith("import time:") and ln.rsplit("|", 1)[-1].strip() == module
               for ln in out.splitlines())


@pytest.fixture()
def held() -> socket.socket:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


@pytest.mark.timeout(150)
def test_a_held_libp2p_port_fails_before_torch_loads(tmp_path: Path, held: socket.socket) -> None:
    port = held.getsockname()[1]
    out = _join(tmp_path / "h", "--listen-port", str(port), network=True)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    line = _error_line(text)
    assert f"the libp2p port 127.0.0.1:{port} is in use by pid {os.getpid()} (" in line, text[-3000:]
    assert "pick another with --listen-port N (0 = any free port) or stop what holds it" in line
    assert "the setting listen_port" not in line and "(set by --listen-port" not in line
    assert not _imported(text, "torch")  # the experts (and torch) were never loaded


@pytest.mark.timeout(150)
def test_a_held_zeromq_port_fails_before_torch_loads(tmp_path: Path, held: socket.socket) -> None:
    port = held.getsockname()[1]
    out = _join(tmp_path / "h", "--port", str(port), network=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    line = _error_line(text)
    assert f"the ZeroMQ port 127.0.0.1:{port} is in use by pid {os.getpid()} (" in line, text[-3000:]
    assert "pick another with --port N" in line
    assert not _imported(text, "torch")
