"""The bandwidth caps on the trio paths: shard downloads (every worker pays before it asks;
trio's mock clock makes the total time exact) and the libp2p expert-RPC server (a real
``NetworkService`` and ``ClientNode`` on loopback, the cap set on the running server as the
daemon wires it: replies and requests keep to the cap within 10%)."""

from __future__ import annotations

import concurrent.futures as cf
import time
from types import SimpleNamespace

import pytest
import torch
import trio
import trio.testing

from tests.net.test_shard_download import FP, UID, FakeClient, Peer, assert_complete
from tests.net.test_shard_download import shard as shard  # the module-scoped fixture, reused
from tests.runtime.servers import make_backends
from volunteer.client.node import ClientNode
from volunteer.experts.shard_cache import ShardCache
from volunteer.net.rate_limit import TokenBucket, Traffic
from volunteer.net.service import NetworkService
from volunteer.net.shard_download import DownloadProgress, Source, download_shard
from volunteer.runtime.limits import ServingLimits
from volunteer.runtime.runtime import Runtime
from volunteer.wire.messages import decode_reply, encode_request

pytestmark = pytest.mark.timeout(120)


def test_a_capped_shard_download_takes_exactly_its_bytes_over_the_rate(tmp_path, shard):
    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    client = FakeClient(header, body, {"peer-a": Peer(), "peer-b": Peer()})
    progress = DownloadProgress(uid=UID, root_hex=header.root_hex)
    rate, burst = 10_000, 4096
    counted = [0]

    async def main() -> float:
        traffic = Traffic(down=TokenBucket(rate, burst, clock=trio.current_time),
                          meter=lambda i, o: counted.__setitem__(0, counted[0] + i))
        start = trio.current_time()
        await download_shard(client, cache, UID, FP, header.root, [Source("peer-a"), Source("peer-b")],
                             progress, traffic=traffic)
        return trio.current_time() - start

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert_complete(cache, header, body, progress)
    assert counted[0] == header.total_bytes
    assert elapsed == pytest.approx((header.total_bytes - burst) / rate, rel=1e-6)


H = 1024
ROWS = 256  # 1 MiB of activations per request and per reply
REQUESTS = 6
CAP = 1_500_000


@pytest.fixture
def served(tmp_path):
    runtime = Runtime(make_backends({"n.0": ("nop", H)}), ServingLimits())
    runtime.start()
    net = SimpleNamespace(bootstrap=(), relays=(), listen_port=0, announce_addrs=(), public="auto")
    svc = NetworkService(tmp_path / "home", "exp", net, submit=runtime.submit, zmq_endpoint=None,
                         listen_host="127.0.0.1")
    client = None
    try:
        svc.start()
        client = ClientNode("exp", svc.multiaddrs, listen_addrs=("/ip4/127.0.0.1/tcp/0",)).start()
        yield SimpleNamespace(svc=svc, client=client)
    finally:
        if client is not None:
            client.stop()
        svc.stop()
        runtime.stop()


def _rate_over_libp2p(served: SimpleNamespace, traffic: Traffic | None, direction: str) -> float:
    transport = served.client.transport(served.svc.peer_id, served.svc.multiaddrs)
    x = torch.ones(ROWS, H)

    def call(i: int) -> int:
        frames = encode_request("forward", "n.0", [x], request_id=i, timeout=60.0)
        reply = transport.request(frames, timeout=60.0)
        assert decode_reply(reply).request_id == i
        return sum(memoryview(f).nbytes for f in (frames if direction == "in" else reply))

    call(0)  # streams open and warm before the clock starts
    served.svc.rpc.traffic = traffic  # as the daemon wires it: on the running server
    start = time.monotonic()
    with cf.ThreadPoolExecutor(3) as pool:
        moved = sum(pool.map(call, range(1, REQUESTS + 1)))
    return moved / (time.monotonic() - start)


def test_the_upload_cap_holds_on_the_libp2p_rpc_server(served):
    rate = _rate_over_libp2p(served, Traffic.build(upload=CAP), "out")
    assert abs(rate - CAP) <= 0.1 * CAP, f"replies left at {rate / 1e6:.2f} MB/s, cap 1.5"


def test_the_download_cap_holds_on_the_libp2p_rpc_server(served):
    rate = _rate_over_libp2p(served, Traffic.build(download=CAP), "in")
    assert abs(rate - CAP) <= 0.1 * CAP, f"requests arrived at {rate / 1e6:.2f} MB/s, cap 1.5"
