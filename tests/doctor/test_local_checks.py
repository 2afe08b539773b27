"""Local checks on real files and sockets: the home (a file where a directory is expected, an
unwritable directory, an identity key others can replace), ports (a held one names its
holder), a bootstrap address whose port is closed (refused, in plain words)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from volunteer.doctor.bootstrap import check_bootstrap, probe
from volunteer.doctor.local import check_disk, check_home
from volunteer.doctor.ports import check_port
from volunteer.doctor.report import FAIL, OK, SKIP, WARN

PEER = "12D3KooWJik9SDvQrdNggBWJZTXzTskZdQ2AKc63QrK74iMwMbEx"


def _verdicts(checks: list) -> dict[str, str]:
    return {c.name: c.verdict for c in checks}


def test_a_fresh_home_is_ok_and_a_private_one_too(tmp_path: Path) -> None:
    assert _verdicts(check_home(tmp_path / "new" / "home")) == {"home": OK}
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    assert _verdicts(check_home(home)) == {"home": OK, "identity": OK}


def test_a_file_where_the_home_should_be_fails(tmp_path: Path) -> None:
    # Works as root too (root may write anywhere, but not below a regular file).
    (tmp_path / "file").write_text("x")
    checks = check_home(tmp_path / "file" / "home")
    assert checks[0].verdict == FAIL and "is a file, not a directory" in checks[0].detail
    checks = check_home(tmp_path / "file")
    assert checks[0].verdict == FAIL and "is not a directory" in checks[0].detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a 0500 directory anyway (the file case covers root)")
def test_an_unwritable_home_fails(tmp_path: Path) -> None:
    home = tmp_path / "ro"
    home.mkdir()
    home.chmod(0o500)
    try:
        checks = check_home(home)
    finally:
        home.chmod(0o700)
    assert checks[0].verdict == FAIL and "not writable" in checks[0].detail and "chmod" in checks[0].fix


def test_identity_key_that_others_can_replace_fails(tmp_path: Path) -> None:
    home = tmp_path / "h"
    (home / "identity").mkdir(parents=True, mode=0o700)
    home.chmod(0o700)
    key = home / "identity" / "identity.key"
    key.write_bytes(b"\0" * 32)
    key.chmod(0o666)
    check = {c.name: c for c in check_home(home)}["identity"]
    assert check.verdict == FAIL and "others can replace it" in check.detail and "chmod 600" in check.fix
    key.chmod(0o640)
    assert {c.name: c for c in check_home(home)}["identity"].verdict == FAIL  # the daemon refuses it
    key.chmod(0o600)
    assert {c.name: c for c in check_home(home)}["identity"].verdict == OK
    home.chmod(0o755)
    assert {c.name: c for c in check_home(home)}["home"].verdict == WARN


def test_disk_against_the_shard_cache_cap(tmp_path: Path) -> None:
    assert check_disk(tmp_path, 64 * 2**20).verdict == OK
    huge = check_disk(tmp_path, 2**50)
    assert huge.verdict == WARN and "shard_cache_bytes=" in huge.fix


FIX = "pick another port: join --port N"


def test_a_held_port_fails_and_names_its_holder() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        check = check_port("zmq port", "127.0.0.1", port, "ZeroMQ frontend", FIX)
        assert check.verdict == FAIL and f"127.0.0.1:{port} is already in use" in check.detail
        assert f"pid {os.getpid()}" in check.detail and check.fix == FIX
        assert check_port("zmq port", "127.0.0.1", port, "ZeroMQ frontend", FIX,
                          frozenset({port})).verdict == OK  # this home's own daemon holds it
        moved = check_port("libp2p port", "127.0.0.1", port, "libp2p listener", FIX, movable=True)
        assert moved.verdict == WARN and "will listen on a new one" in moved.detail  # a kept port moves
    assert check_port("zmq port", "127.0.0.1", port, "ZeroMQ frontend", FIX).verdict == OK
    assert check_port("p", "127.0.0.1", 0, "x", FIX).verdict == OK


def test_a_held_port_with_so_reuseport_still_counts_as_held() -> None:
    # libp2p listeners set SO_REUSEPORT: a second one would share the port silently.
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        assert check_port("p", "127.0.0.1", held.getsockname()[1], "x", FIX).verdict == FAIL


def test_a_closed_bootstrap_port_is_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connects are refused
        results = probe([f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER}"], 2.0)
    assert results[0].problem.startswith(f"connection refused at 127.0.0.1:{port}")
    checks = check_bootstrap(results, lambda addr: "the manifest's network.bootstrap (demo)")
    assert [c.verdict for c in checks] == [WARN, FAIL] and "network.bootstrap" in checks[-1].fix
    assert "(address from the manifest's network.bootstrap (demo)" in checks[0].detail
    assert check_bootstrap([], str)[0].verdict == SKIP
