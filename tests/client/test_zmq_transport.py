"""``ZmqTransport``: endpoint parsing, pooled connections reused across calls and threads,
and a pooled connection that the server closed is replaced instead of failing a call."""

from __future__ import annotations

import pytest

from tests.runtime.servers import wait_for
from tests.wire.test_zmtp import libzmq_router
from volunteer.client.zmq_transport import ZmqTransport, parse_endpoint
from volunteer.wire.errors import UnreachableError

pytestmark = pytest.mark.timeout(30)


def test_parse_endpoint():
    assert parse_endpoint("tcp://127.0.0.1:5555") == ("127.0.0.1", 5555)
    assert parse_endpoint("tcp://[::1]:80") == ("::1", 80)
    assert parse_endpoint("tcp://node.example:65535") == ("node.example", 65535)
    for bad in ("127.0.0.1:5555", "tcp://host", "tcp://:80", "tcp://h:0", "tcp://h:99999", "ipc:///x"):
        with pytest.raises(ValueError, match="tcp://host:port"):
            parse_endpoint(bad)


def test_a_bad_endpoint_fails_each_call_with_a_typed_error():
    transport = ZmqTransport("localhost:5555")
    with pytest.raises(UnreachableError, match="bad endpoint"):
        transport.request([b"x"], 1.0)
    transport.close()


def test_a_connection_is_reused_and_replaced_once_the_server_closed_it():
    with libzmq_router() as port:
        transport = ZmqTransport(f"tcp://127.0.0.1:{port}")
        assert transport.request([b"a"], 5.0) == [b"a"]
        first = transport._idle[0]
        assert transport.request([b"b"], 5.0) == [b"b"]
        assert transport._idle == [first]  # the same connection carried both calls
    with libzmq_router(port=port):  # a restarted server: the old connection went stale
        wait_for(first.stale, what="the closed connection to look stale")
        assert transport.request([b"c"], 5.0) == [b"c"]  # the stale one was dropped, not used
        assert first not in transport._idle and len(transport._idle) == 1
        transport.close()
        assert transport._idle == []
        with pytest.raises(UnreachableError, match="closed"):
            transport.request([b"d"], 1.0)
