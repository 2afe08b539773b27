"""The ZeroMQ frontend on real loopback sockets: typed errors for every bad-input class
(including random garbage from a raw socket), the server keeps serving afterwards, many
concurrent clients, requests from several clients merged into one batch."""

from __future__ import annotations

import random
import threading

import msgpack
import pytest
import torch
import zmq

from tests.runtime.servers import make_backends, running, wait_for
from volunteer.client.remote_expert import RemoteExpert
from volunteer.client.zmq_transport import ZmqTransport
from volunteer.runtime.limits import ServingLimits
from volunteer.wire.errors import BadRequestError, RemoteError, TooLargeError, UnknownExpertError
from volunteer.wire.messages import PROTOCOL_VERSION, decode_reply, encode_request

H = 16
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server():
    backends = make_backends({"t.ffn.0": ("ffn", H), "t.nop.0": ("nop", H)})
    limits = ServingLimits(
        max_batch_size=64,
        max_tensors=4,
        max_elements=4096,
        max_bytes=64 * 1024,
        max_header_bytes=1024,
    )
    with running(backends, limits) as (rt, fe):
        yield rt, fe


@pytest.fixture
def raw(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server[1].endpoint)
    yield sock
    sock.close()


def ask(sock: zmq.Socket, frames: list) -> list[bytes]:
    sock.send_multipart(frames)
    assert sock.poll(10_000), "no reply"
    return sock.recv_multipart()


def header(**fields) -> bytes:
    base = {"v": PROTOCOL_VERSION, "op": "forward", "uid": "t.ffn.0", "id": 7, "t": []}
    base.update(fields)
    return msgpack.packb(base)


def test_port_zero_is_reported(server):
    endpoint = server[1].endpoint
    assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")


def valid_request(uid: str = "t.ffn.0") -> list:
    return encode_request("forward", uid, [torch.randn(2, H)], request_id=99)


BAD_CASES = [
    ("garbage header", lambda: [b"\xc1\xff\x00garbage"], BadRequestError),
    ("not a map", lambda: [msgpack.packb([1, 2, 3])], BadRequestError),
    ("wrong version", lambda: [header(v=999)], BadRequestError),
    ("unknown op", lambda: [header(op="explode")], BadRequestError),
    (
        "unknown expert",
        lambda: encode_request("forward", "t.ffn.404", [torch.randn(2, H)], request_id=1),
        UnknownExpertError,
    ),
    (
        "wrong shape",
        lambda: encode_request("forward", "t.ffn.0", [torch.randn(2, H + 1)], request_id=1),
        BadRequestError,
    ),
    (
        "wrong arity",
        lambda: encode_request("forward", "t.ffn.0", [torch.randn(2, H)] * 2, request_id=1),
        BadRequestError,
    ),
    (
        "backward arity",
        lambda: encode_request("backward", "t.ffn.0", [torch.randn(2, H)], request_id=1),
        BadRequestError,
    ),
    (
        "grad shape",
        lambda: encode_request(
            "backward", "t.ffn.0", [torch.randn(2, H), torch.randn(3, H)], request_id=1
        ),
        BadRequestError,
    ),
    ("int dtype", lambda: [header(t=[["int64", [2, H], None]]), bytes(8 * 2 * H)], BadRequestError),
    (
        "frame size mismatch",
        lambda: [header(t=[["float32", [2, H], None]]), bytes(10)],
        BadRequestError,
    ),
    ("missing frame", lambda: [header(t=[["float32", [2, H], None]])], BadRequestError),
    ("negative dim", lambda: [header(t=[["float32", [-2, H], None]]), b""], BadRequestError),
    (
        "empty batch",
        lambda: encode_request("forward", "t.ffn.0", [torch.randn(0, H)], request_id=1),
        BadRequestError,
    ),
    ("header too large", lambda: [header(pad="x" * 2000)], TooLargeError),
    (
        "too many tensors",
        lambda: [header(t=[["float32", [1], None]] * 5), *[bytes(4)] * 5],
        TooLargeError,
    ),
    (
        "too many elements",
        lambda: [header(t=[["float32", [10**9, 10**9], None]]), b""],
        TooLargeError,
    ),
    (
        "batch too large",
        lambda: encode_request("forward", "t.nop.0", [torch.randn(65, H)], request_id=1),
        TooLargeError,
    ),
]


@pytest.mark.parametrize(("name", "make", "error"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_gets_typed_error_and_server_keeps_serving(raw, name, make, error):
    with pytest.raises(error) as info:
        decode_reply(ask(raw, make()))
    assert info.value.message
    reply = decode_reply(ask(raw, valid_request()))
    assert reply.op == "result" and reply.request_id == 99 and reply.tensors[0].shape == (2, H)


def test_random_garbage_frames_never_break_the_server(server, raw):
    rng = random.Random(1234)
    for _ in range(200):
        frames = [
            bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            for _ in range(rng.randint(1, 6))
        ]
        if rng.random() < 0.3:  # a valid-looking header with random tensors behind it
            frames[0] = header(t=[["float32", [rng.randint(0, 4), rng.randint(0, 4)], None]])
        try:
            decode_reply(ask(raw, frames))
        except RemoteError as e:
            assert e.code in ("bad_request", "too_large", "unknown_expert")
    assert decode_reply(ask(raw, valid_request())).tensors[0].shape == (2, H)
    rejected = server[0].rejected.snapshot(0, 0)["errors"]
    assert rejected.get("bad_request", 0) > 0


def test_thirty_two_threads_get_every_answer(server):
    transport = ZmqTransport(server[1].endpoint)
    expert = RemoteExpert("t.ffn.0", transport, timeout=30)
    module = server[0].backends["t.ffn.0"].module
    failures: list[BaseException] = []

    def client(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(10):
                x = torch.randn(3, H, generator=g)
                with torch.no_grad():
                    y = expert(x)
                    torch.testing.assert_close(y, module(x), rtol=1e-4, atol=1e-4)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    transport.close()
    assert not failures, failures[:3]
    assert server[0].stats()["t.ffn.0"]["requests"] == 320


def test_requests_from_several_clients_merge_into_one_batch(server):
    rt, fe = server
    experts = [RemoteExpert("t.ffn.0", fe.endpoint, timeout=30) for _ in range(4)]
    outs: dict[int, torch.Tensor] = {}
    xs = [torch.randn(5, H) for _ in range(4)]

    def call(i: int) -> None:
        with torch.no_grad():
            outs[i] = experts[i](xs[i])

    with rt.exclusive():
        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: rt.stats()["t.ffn.0"]["queue_depth"] == 4, what="4 queued requests")
    for t in threads:
        t.join(30)
    stats = rt.stats()["t.ffn.0"]
    assert (
        stats["requests"] == 4
        and stats["batch_size_histogram"] == {"<=32": 1}
        and stats["mean_batch_size"] == 20
    )
    with torch.no_grad():
        for i in range(4):
            torch.testing.assert_close(
                outs[i], rt.backends["t.ffn.0"].module(xs[i]), rtol=1e-5, atol=1e-5
            )
    for e in experts:
        e.transport.close()
