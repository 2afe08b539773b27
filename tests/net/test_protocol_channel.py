"""``ProtocolChannel`` between two real ``NetworkService`` hosts on loopback: the authenticated
peer id reaches the handler, an unserved channel answers ``overloaded``, the bounds of the
expert RPC hold (oversized message refused before its body is read), a handler that raises
still answers, and bad peers / a second channel of one protocol are typed errors."""

from __future__ import annotations

import threading

import msgpack
import pytest

from volunteer.net.config import NetworkConfig
from volunteer.net.protocol_channel import ChannelLimits
from volunteer.net.service import NetworkService
from volunteer.net.stream_io import PROTOCOL_ID
from volunteer.wire.errors import UnreachableError
from volunteer.wire.limits import WireLimits

PROTO = "/volunteer/test-channel/1.0.0"
LIMITS = ChannelLimits(limits=WireLimits(max_header_bytes=4096, max_tensors=4, max_elements=1 << 16,
                                         max_bytes=1 << 16),
                       reply_limits=WireLimits(max_header_bytes=4096, max_tensors=4, max_elements=1 << 16,
                                               max_bytes=1 << 16))


def _error_code(frames: list) -> str | None:
    if len(frames) != 1:
        return None
    header = msgpack.unpackb(frames[0], raw=False)
    return header.get("code") if isinstance(header, dict) and header.get("op") == "error" else None


@pytest.fixture
def pair(tmp_path):
    a = NetworkService(tmp_path / "a", "exp", NetworkConfig(), listen_host="127.0.0.1",
                       enable_nat=False).start()
    b = None
    try:
        b = NetworkService(tmp_path / "b", "exp", NetworkConfig(bootstrap=tuple(a.multiaddrs)),
                           listen_host="127.0.0.1", enable_nat=False).start()
        yield a, b
    finally:
        for s in (b, a):
            if s is not None:
                s.stop()


@pytest.mark.timeout(90)
def test_channel_carries_frames_with_the_authenticated_peer_id(pair):
    a, b = pair
    ca, cb = a.open_channel(PROTO, LIMITS), b.open_channel(PROTO, LIMITS)
    # Nothing served yet on b: the contract's "try later".
    assert _error_code(ca.request(b.peer_id, b.multiaddrs, [b"hello"], 20.0)) == "overloaded"

    seen: list[tuple[str, str]] = []

    def echo(peer: str, frames: list, reply) -> None:
        seen.append((peer, threading.current_thread().name))
        if bytes(frames[0]) == b"boom":
            raise RuntimeError("handler bug")
        threading.Thread(target=reply, args=([peer.encode(), *map(bytes, frames)],)).start()

    cb.serve(echo)
    assert ca.request(b.peer_id, b.multiaddrs, [b"hello", b"x"], 20.0) == [a.peer_id.encode(), b"hello", b"x"]
    assert seen[0][0] == a.peer_id  # from the connection, not from the message
    # A handler that raises is answered, and the stream goes on.
    assert _error_code(ca.request(b.peer_id, b.multiaddrs, [b"boom"], 20.0)) == "internal"
    # Over the channel's limits: refused by size before the body is read.
    assert _error_code(ca.request(b.peer_id, b.multiaddrs, [b"z" * (1 << 17)], 20.0)) == "too_large"
    # A refused body larger than the server skips (64 KiB) costs its stream: the server resets
    # it once the typed reply is out (rpc_server's rule). A call that races the reset fails
    # `unreachable` (seen in CI); the next one runs on a fresh stream.
    for _attempt in range(3):
        try:
            assert ca.request(b.peer_id, b.multiaddrs, [b"again"], 20.0)[1] == b"again"
            break
        except UnreachableError:
            continue
    else:
        pytest.fail("the channel did not recover after the server reset a stream")
    assert cb.snapshot()["server"]["requests"] >= 3 and ca.snapshot()["client"]["calls"] >= 5

    # The other way round, on the same connection.
    ca.serve(lambda peer, frames, reply: reply([b"pong"]))
    assert cb.request(a.peer_id, [], [b"ping"], 20.0) == [b"pong"]

    with pytest.raises(UnreachableError):
        ca.request("not-a-peer-id", [], [b"x"], 5.0)
    with pytest.raises(ValueError):
        a.open_channel(PROTO, LIMITS)
    with pytest.raises(ValueError):
        a.open_channel(PROTOCOL_ID, LIMITS)
    cb.serve(None)
    assert _error_code(ca.request(b.peer_id, b.multiaddrs, [b"x"], 20.0)) == "overloaded"


@pytest.mark.timeout(60)
def test_channel_after_stop_is_unreachable(tmp_path):
    a = NetworkService(tmp_path / "a", "exp", NetworkConfig(), listen_host="127.0.0.1",
                       enable_nat=False).start()
    ch = a.open_channel(PROTO, LIMITS)
    peer = a.peer_id
    a.stop()
    with pytest.raises(UnreachableError):
        ch.request(peer, [], [b"x"], 5.0)
