"""The ZeroMQ frontend holds at most ``max_queued_bytes`` of requests, however many peers
send max-size messages at once: each request is answered or refused with a typed error.

Measured with the runtime's own counters (``Runtime.held_bytes``), not RSS or timing.
"""

from __future__ import annotations

import threading

import pytest
import torch
import zmq

from tests.runtime.servers import make_backends, running, wait_for
from volunteer.client.zmq_transport import ZmqTransport
from volunteer.runtime.limits import ServingLimits
from volunteer.wire.errors import OverloadedError
from volunteer.wire.messages import decode_reply, encode_request

H = 1024
ROWS = 64
MSG = ROWS * H * 4  # payload bytes of one max-size request (256 KiB)
ADMIT = 3
pytestmark = pytest.mark.timeout(120)


def request(i: int) -> list:
    x = torch.full((ROWS, H), float(i % 7))
    return encode_request("forward", "m.0", [x], request_id=i, timeout=60.0)


# the frontend reserves every byte of a message, its header included (ids < 128: same size)
FULL = MSG + len(request(0)[0])
LIMITS = ServingLimits(max_batch_size=ROWS, max_bytes=MSG, max_elements=ROWS * H,
                       max_queued_bytes=ADMIT * FULL)


@pytest.mark.parametrize("peers", [4, 24])
def test_many_peers_with_max_size_messages_stay_under_the_bound(peers):
    per_peer = 3
    total = peers * per_peer
    backends = make_backends({"m.0": ("nop", H)})
    with running(backends, LIMITS) as (rt, fe):
        ctx = zmq.Context.instance()
        socks = []
        try:
            for _ in range(peers):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(fe.endpoint)
                socks.append(s)
            with rt.exclusive():  # no compute: admitted requests stay held until we let go
                for p, s in enumerate(socks):
                    for k in range(per_peer):
                        s.send_multipart(request(p * per_peer + k), copy=False)
                # every request is either held or already refused, and no more than the bound
                wait_for(lambda: rt.held_bytes()["refused"] == total - ADMIT, 30.0,
                         "all requests beyond the bound refused")
                held = rt.held_bytes()
                assert held["held"] == ADMIT * FULL <= LIMITS.max_queued_bytes
            results, refused = 0, 0
            for s in socks:
                for _ in range(per_peer):
                    assert s.poll(30_000), "a request got no answer"
                    try:
                        reply = decode_reply(s.recv_multipart())
                    except OverloadedError:
                        refused += 1
                    else:
                        assert reply.tensors[0].shape == (ROWS, H)
                        results += 1
            assert (results, refused) == (ADMIT, total - ADMIT)
            after = rt.held_bytes()
            assert after["peak"] <= LIMITS.max_queued_bytes and after["held"] == 0
        finally:
            for s in socks:
                s.close()


def test_concurrent_clients_get_results_or_typed_refusals():
    backends = make_backends({"m.0": ("nop", H)})
    outcomes: list[str] = []
    lock = threading.Lock()
    with running(backends, LIMITS) as (rt, fe):

        def client(c: int) -> None:
            t = ZmqTransport(fe.endpoint)
            try:
                for k in range(6):
                    try:
                        reply = decode_reply(t.request(request(c * 100 + k), timeout=30.0))
                        what = "ok" if reply.tensors[0].shape == (ROWS, H) else "bad shape"
                    except OverloadedError:
                        what = "overloaded"
                    except Exception as e:  # anything else is a failure of the bound
                        what = f"{type(e).__name__}: {e}"
                    with lock:
                        outcomes.append(what)
            finally:
                t.close()

        threads = [threading.Thread(target=client, args=(c,)) for c in range(12)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert len(outcomes) == 72
        assert set(outcomes) <= {"ok", "overloaded"}, sorted(set(outcomes))
        assert "ok" in outcomes
        counters = rt.held_bytes()
        assert counters["peak"] <= LIMITS.max_queued_bytes and counters["held"] == 0
        # the node still serves normally afterwards
        t = ZmqTransport(fe.endpoint)
        try:
            assert decode_reply(t.request(request(1), timeout=30.0)).tensors[0].shape == (ROWS, H)
        finally:
            t.close()
