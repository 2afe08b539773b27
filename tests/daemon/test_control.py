"""Control API: round trips, typed errors, bounded messages, owner-only socket."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from volunteer.daemon.control_client import ControlError, DaemonNotRunningError, call
from volunteer.daemon.control_protocol import MAX_REPLY_BYTES, recv_message
from volunteer.daemon.control_server import ControlRequestError, ControlServer
from volunteer.daemon.home import NodeHome


def _handlers() -> dict[str, Any]:
    def refuse(req: dict[str, Any]) -> Any:
        raise ControlRequestError("not_serving", "nope")

    def crash(req: dict[str, Any]) -> Any:
        raise RuntimeError("boom")

    return {"echo": lambda req: {"got": req.get("value")}, "refuse": refuse, "crash": crash}


@pytest.fixture
def served_home(tmp_path: Path) -> Iterator[NodeHome]:
    node = NodeHome(tmp_path / "home")
    node.create()
    server = ControlServer(node.run_dir, _handlers())
    server.start()
    node.write_control_file({"socket": server.path, "pid": os.getpid()})
    try:
        yield node
    finally:
        server.stop()


def _raw(path: str, payload: bytes) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
        sock.sendall(payload)
        return recv_message(sock, MAX_REPLY_BYTES)
    finally:
        sock.close()


def test_round_trip_and_typed_errors(served_home: NodeHome) -> None:
    assert call(served_home.root, "echo", value=[1, "x"]) == {"got": [1, "x"]}
    with pytest.raises(ControlError) as info:
        call(served_home.root, "refuse")
    assert info.value.code == "not_serving"
    with pytest.raises(ControlError) as info:
        call(served_home.root, "crash")
    assert info.value.code == "internal" and "boom" in info.value.message
    with pytest.raises(ControlError) as info:
        call(served_home.root, "launch_missiles")
    assert info.value.code == "unknown_op" and "echo" in info.value.message


@pytest.mark.timeout(30)
def test_bad_input_is_answered_and_server_keeps_serving(served_home: NodeHome) -> None:
    path = served_home.read_control_file()["socket"]  # type: ignore[index]
    huge = _raw(path, struct.pack(">I", 2**31))
    assert huge["error"]["code"] == "bad_request" and "exceeds the limit" in huge["error"]["message"]
    garbage = _raw(path, struct.pack(">I", 5) + b"\xff{{{x")
    assert garbage["error"]["code"] == "bad_request"
    not_object = _raw(path, struct.pack(">I", 7) + b"[1,2,3]")
    assert not_object["error"]["code"] == "bad_request"
    truncated = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    truncated.connect(path)
    truncated.sendall(struct.pack(">I", 100) + b"{")
    truncated.close()
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(path)  # sends nothing: must not block other clients
    try:
        assert call(served_home.root, "echo", value=1) == {"got": 1}
    finally:
        stalled.close()


def test_not_running_messages(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunningError, match=r"daemon not running.*volunteer join demo --home"):
        call(tmp_path, "status")
    node = NodeHome(tmp_path)
    node.write_control_file({"socket": str(tmp_path / "gone.sock"), "pid": 1})  # stale file of a killed daemon
    with pytest.raises(DaemonNotRunningError):
        call(tmp_path, "status")


def test_socket_is_owner_only(served_home: NodeHome) -> None:
    path = Path(served_home.read_control_file()["socket"])  # type: ignore[index]
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_long_home_uses_private_socket_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / ("x" * 120) / "run"
    run_dir.mkdir(parents=True)
    server = ControlServer(run_dir, _handlers())
    server.start()
    try:
        private = Path(server.path).parent
        assert len(server.path) < 108 and private != run_dir
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        NodeHome(tmp_path).write_control_file({"socket": server.path})
        assert call(tmp_path, "echo", value=2) == {"got": 2}
    finally:
        server.stop()
    assert not private.exists()


NOBODY = 65534
CONNECT = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_UNIX)\n"
    "try:\n s.connect(sys.argv[1]); print('connected')\n"
    "except PermissionError: print('denied')\n"
)


def _world_usable_python() -> str | None:
    """A python interpreter that user nobody can execute (every path component o+x)."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        path = Path(os.path.realpath(candidate))
        if path.exists() and all(p.stat().st_mode & 0o001 for p in (path, *path.parents)):
            return str(path)
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_other_users_cannot_connect() -> None:
    python = _world_usable_python()
    if python is None:
        pytest.skip("no python interpreter executable by user nobody")
    base = Path(tempfile.mkdtemp(prefix="vol-perm-"))
    try:
        os.chmod(base, 0o755)
        node = NodeHome(base / "home")
        node.create()
        server = ControlServer(node.run_dir, _handlers())
        server.start()
        try:
            os.chmod(node.root, 0o755)  # even with the directories opened up, the 0600 socket refuses
            os.chmod(node.run_dir, 0o755)

            def as_nobody() -> str:
                out = subprocess.run([python, "-c", CONNECT, server.path], user=NOBODY,
                                     group=NOBODY, capture_output=True, text=True, timeout=30, cwd="/")
                return out.stdout.strip()

            assert as_nobody() == "denied"
            os.chmod(server.path, 0o666)  # control: the same probe succeeds when the socket is open
            assert as_nobody() == "connected"
        finally:
            server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
