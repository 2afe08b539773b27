"""Expert RPC over libp2p streams into a real Runtime; the DHT directory end to end."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest
import torch

from volunteer.client.node import ClientNode
from volunteer.client.remote_expert import RemoteExpert
from volunteer.experts.backend import ExpertBackend, OptimizerSpec
from volunteer.net.service import NetworkService
from volunteer.net.stream_io import (
    PROTOCOL_ID,
    BufferedStreamReader,
    StreamClosedError,
    encode_message,
    read_body,
    read_call_id,
)
from volunteer.runtime.limits import ServingLimits
from volunteer.runtime.runtime import Runtime
from volunteer.runtime.zmq_frontend import ZmqFrontend
from volunteer.wire.errors import (
    BadRequestError,
    TooLargeError,
    UnknownExpertError,
    UnreachableError,
)
from volunteer.wire.messages import decode_reply, encode_request

HIDDEN = 16
UIDS = ["ffn.0.0", "ffn.0.1", "ffn.1.1"]


@pytest.fixture
def served(tmp_path):
    """A Runtime hosting three ffn experts behind a NetworkService, and a ClientNode."""
    torch.manual_seed(0)
    backends = {u: ExpertBackend(u, "ffn", HIDDEN, OptimizerSpec(lr=0.0)) for u in UIDS}
    runtime = Runtime(backends, ServingLimits())
    runtime.start()
    frontend = ZmqFrontend(runtime, bind="tcp://127.0.0.1:0")
    frontend.start()
    net = SimpleNamespace(bootstrap=(), relays=(), listen_port=0, announce_addrs=(), public="auto")
    svc = NetworkService(tmp_path / "home", "exp", net, submit=runtime.submit,
                         zmq_endpoint=frontend.endpoint, listen_host="127.0.0.1")
    client = None
    try:
        svc.start()
        client = ClientNode("exp", svc.multiaddrs, listen_addrs=("/ip4/127.0.0.1/tcp/0",)).start()
        yield SimpleNamespace(svc=svc, client=client, runtime=runtime, backends=backends,
                              zmq=frontend.endpoint)
    finally:
        if client is not None:
            client.stop()
        svc.stop()
        frontend.stop()
        runtime.stop()


def forward(transport, uid, x, request_id=1):
    frames = encode_request("forward", uid, [x], request_id=request_id, timeout=30.0)
    reply = decode_reply(transport.request(frames, timeout=30.0))
    return reply.tensors[0]


@pytest.mark.timeout(90)
def test_forward_over_stream_matches_local_and_errors_are_typed(served):
    t = served.client.transport(served.svc.peer_id, served.svc.multiaddrs)
    x = torch.randn(5, HIDDEN)
    with torch.no_grad():
        want = served.backends["ffn.0.1"].module(x)
    got = forward(t, "ffn.0.1", x)
    torch.testing.assert_close(got, want)
    with pytest.raises(UnknownExpertError):
        forward(t, "nope.1", x)
    # Several requests in flight at once on the reused streams.
    import concurrent.futures as cf
    xs = [torch.randn(3, HIDDEN) for _ in range(16)]
    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: forward(t, UIDS[i % 3], xs[i], request_id=i), range(16)))
    with torch.no_grad():
        for i, out in enumerate(outs):
            torch.testing.assert_close(out, served.backends[UIDS[i % 3]].module(xs[i]))
    assert served.client.rpc.stats.streams_opened <= 2


@pytest.mark.timeout(90)
def test_remote_expert_over_libp2p_equals_zmq(served):
    x = torch.randn(4, HIDDEN)
    results = []
    for endpoint in (served.zmq, served.client.transport(served.svc.peer_id, served.svc.multiaddrs)):
        expert = RemoteExpert("ffn.1.1", endpoint, timeout=30.0)
        xi = x.clone().requires_grad_(True)
        out = expert(xi)
        (out * torch.arange(HIDDEN, dtype=out.dtype)).sum().backward()
        results.append((out.detach(), xi.grad.clone()))
    (out_z, grad_z), (out_p, grad_p) = results
    torch.testing.assert_close(out_p, out_z)
    torch.testing.assert_close(grad_p, grad_z)
    assert grad_p.abs().sum() > 0


@pytest.mark.timeout(90)
def test_bad_frames_get_typed_errors_and_service_keeps_serving(served):
    host = served.client.node.host
    from libp2p.peer.id import ID
    pid = ID.from_base58(served.svc.peer_id)

    async def raw_exchange():
        stream = await host.new_stream(pid, [PROTOCOL_ID])
        reader = BufferedStreamReader(stream)
        # 1) well framed, garbage header: bad_request, the stream stays usable
        await stream.write(encode_message(7, [b"\xc1garbage"]))
        assert await read_call_id(reader) == 7
        with pytest.raises(BadRequestError):
            decode_reply(await read_body(reader))
        await stream.write(encode_message(8, encode_request("forward", "ffn.0.0", [torch.ones(1, HIDDEN)],
                                                             request_id=8)))
        assert await read_call_id(reader) == 8
        assert decode_reply(await read_body(reader)).tensors[0].shape == (1, HIDDEN)
        # 2) framing beyond limits (10**6 frames): too_large, then the server closes it
        await stream.write(struct.pack("<QI", 9, 10**6))
        assert await read_call_id(reader) == 9
        with pytest.raises(TooLargeError):
            decode_reply(await read_body(reader))
        with pytest.raises(StreamClosedError):
            await read_call_id(reader)
        # 3) a stream cut mid-message
        s2 = await host.new_stream(pid, [PROTOCOL_ID])
        await s2.write(struct.pack("<QII", 10, 1, 1000) + b"abc")
        await s2.close()

    served.client._thread.call(raw_exchange)
    t = served.client.transport(served.svc.peer_id, served.svc.multiaddrs)
    assert forward(t, "ffn.0.0", torch.ones(2, HIDDEN)).shape == (2, HIDDEN)
    stats = served.svc.snapshot()["rpc"]
    assert stats["framing_errors"] >= 1 and stats["errors"].get("too_large", 0) >= 1


@pytest.mark.timeout(90)
def test_unreachable_peer_is_typed(served):
    from volunteer.net.host import load_or_create_identity, peer_id_of
    ghost = peer_id_of(load_or_create_identity(served.svc.home / "ghost")).to_base58()
    t = served.client.transport(ghost, ["/ip4/127.0.0.1/tcp/9/p2p/" + ghost])
    with pytest.raises(UnreachableError):
        t.request(encode_request("info", "", (), request_id=1), timeout=15.0)


@pytest.mark.timeout(90)
def test_dht_directory_resolves_and_sees_draining(served):
    rep = served.svc.announce(UIDS, "serving", load=0.0)
    assert rep.ok
    d = served.client.directory(cache_ttl=0.0)
    assert d.children(["ffn.", "ffn.0.", "ffn.1.", "ffn.2."]) == {
        "ffn.": [0, 1], "ffn.0.": [0, 1], "ffn.1.": [1], "ffn.2.": []}
    transports = d.resolve(["ffn.0.1", "ffn.1.1", "ffn.5.5"])
    assert set(transports) == {"ffn.0.1", "ffn.1.1"}
    # reachability is not public here (no one to dial back): libp2p, not zmq
    x = torch.randn(2, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(forward(transports["ffn.1.1"], "ffn.1.1", x),
                                   served.backends["ffn.1.1"].module(x))
    served.svc.set_draining()
    assert d.children(["ffn."]) == {"ffn.": []}
    assert d.resolve(["ffn.0.1"]) == {}
    snap = served.svc.snapshot()
    assert snap["records_announced"] >= 6 and snap["state"] == "draining"
    assert snap["peer_id"] == served.svc.peer_id and snap["peers"]["direct"] >= 1


@pytest.mark.timeout(90)
def test_client_with_nat_traversal_connects_through_it(served):
    client = ClientNode("exp", served.svc.multiaddrs, listen_addrs=("/ip4/127.0.0.1/tcp/0",),
                        nat=True)
    try:
        client.start()
        assert client.nat is not None
        t = client.transport(served.svc.peer_id, served.svc.multiaddrs)
        assert forward(t, "ffn.0.0", torch.ones(1, HIDDEN)).shape == (1, HIDDEN)
    finally:
        client.stop()
