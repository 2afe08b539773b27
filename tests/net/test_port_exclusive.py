"""A libp2p port is one node's: a second listener on it is refused, whoever holds it.

py-libp2p's TCP listener sets SO_REUSEPORT (hole punching dials from the listen port), so
without the checks in ``run_host`` a second host on the same fixed port listens silently and
the kernel splits incoming connections between the two. Real hosts on 127.0.0.1.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from volunteer.net.host import build_host, run_host
from volunteer.net.listen_error import ListenError, port_holder_error, shared_port_error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def reuseport_listeners(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` sockets listening on 127.0.0.1:port with SO_REUSEPORT, as py-libp2p's are."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


@pytest.mark.timeout(60)
def test_second_host_on_the_same_port_is_refused() -> None:
    port = free_port()
    seen: dict[str, object] = {}

    async def main() -> None:
        first, second = build_host(create_new_key_pair()), build_host(create_new_key_pair())
        async with run_host(first, [f"/ip4/127.0.0.1/tcp/{port}"]):
            seen["first"] = [str(a) for a in first.get_transport_addrs()]
            try:
                async with run_host(second, [f"/ip4/127.0.0.1/tcp/{port}"]):
                    seen["second"] = [str(a) for a in second.get_transport_addrs()]
            except ListenError as err:
                seen["error"] = err

    trio.run(main)
    assert seen["first"] == [f"/ip4/127.0.0.1/tcp/{port}"]
    assert "second" not in seen, f"the second host shares the port: {seen}"
    err = seen["error"]
    assert isinstance(err, ListenError) and err.in_use
    assert err.address == f"127.0.0.1:{port}" and "\n" not in str(err)


def test_a_reuseport_holder_makes_the_probe_fail_and_a_shared_port_is_seen() -> None:
    port = free_port()
    assert port_holder_error("127.0.0.1", port) is None
    with reuseport_listeners(port, 1):
        err = port_holder_error("127.0.0.1", port)
        assert err is not None and err.in_use and err.address == f"127.0.0.1:{port}"
        assert shared_port_error("127.0.0.1", port, own=1) is None  # ours alone
    with reuseport_listeners(port, 2):  # what a race between two daemons leaves behind
        shared = shared_port_error("127.0.0.1", port, own=1)
        assert shared is not None and shared.in_use and "SO_REUSEPORT" in shared.reason
        assert shared_port_error("127.0.0.1", port, own=2) is None
    assert port_holder_error("127.0.0.1", port) is None  # released again


def test_an_address_of_no_interface_is_not_called_in_use() -> None:
    err = port_holder_error("192.0.2.1", free_port())  # TEST-NET-1: not this machine's
    assert err is not None and not err.in_use
