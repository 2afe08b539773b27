"""Averaging wire messages: round trips, fp16, and hostile frames refused typed, early."""

from __future__ import annotations

import msgpack
import pytest
import torch

from volunteer.client.averaging.group import Exchange
from volunteer.client.averaging.wire import (
    AVERAGING_LIMITS,
    decode_answer,
    decode_exchange,
    decode_exchange_message,
    encode_answer,
    encode_exchange,
    encode_refusal,
)
from volunteer.wire.errors import (
    BadRequestError,
    NonFiniteError,
    OverloadedError,
    RemoteError,
    TooLargeError,
)
from volunteer.wire.limits import WireLimits
from volunteer.wire.messages import encode_error


def _wire(frames: list) -> list[bytes]:
    """What a peer receives: plain bytes, one per frame."""
    return [bytes(f) for f in frames]


def _header(**fields: object) -> bytes:
    base = {"v": 1, "op": "exchange", "g": "_avg.run", "k": "elastic", "r": 1, "a": 0.5,
            "t": []}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not ...}, use_bin_type=True)


def test_exchange_round_trip_keeps_every_field() -> None:
    tensors = [torch.randn(3, 4), torch.arange(5, dtype=torch.float32), torch.zeros(0)]
    req = Exchange("gossip_push", 2**40, tensors, alpha=0.25)
    msg = decode_exchange_message(_wire(encode_exchange("_avg.run-1", req)))
    assert msg.group == "_avg.run-1" and msg.compression is None
    assert (msg.exchange.kind, msg.exchange.round, msg.exchange.alpha) == ("gossip_push",
                                                                           2**40, 0.25)
    for got, want in zip(msg.exchange.tensors, tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    group, ex = decode_exchange(_wire(encode_exchange("g", Exchange("grads", 0))))
    assert group == "g" and ex.kind == "grads" and ex.tensors == []


def test_fp16_halves_the_bytes_and_keeps_overflowing_tensors_exact() -> None:
    small, huge = torch.randn(64, 64), torch.tensor([1e6, -3.0])
    plain = encode_exchange("g", Exchange("elastic", 1, [small]))
    packed = encode_exchange("g", Exchange("elastic", 1, [small, huge]), compression="fp16")
    assert memoryview(packed[1]).nbytes * 2 == memoryview(plain[1]).nbytes
    msg = decode_exchange_message(_wire(packed))
    assert msg.compression == "fp16"
    got_small, got_huge = msg.exchange.tensors
    assert got_small.dtype == torch.float32 and torch.allclose(got_small, small, atol=1e-2)
    assert torch.equal(got_huge, huge)  # would be inf as float16: sent uncompressed

    answer = decode_answer(_wire(encode_answer([small, huge], compression="fp16")))
    assert torch.allclose(answer[0], small, atol=1e-2) and torch.equal(answer[1], huge)


def test_refusals_come_back_typed_including_rpc_servers_own() -> None:
    with pytest.raises(OverloadedError, match="busy"):
        decode_answer(_wire(encode_refusal(OverloadedError("busy"))))
    with pytest.raises(NonFiniteError):
        decode_answer(_wire(encode_refusal(NonFiniteError("nan"))))
    with pytest.raises(TooLargeError):  # RpcServer answers an over-budget message like this
        decode_answer(_wire(encode_error(None, "too_large", "message too big")))
    with pytest.raises(RemoteError) as info:
        decode_answer(_wire(encode_error(None, "something_new", "?")))
    assert info.value.code == "something_new"


@pytest.mark.parametrize("frames, error", [
    ([], BadRequestError),
    ([b"\xc1garbage"], BadRequestError),
    ([msgpack.packb([1, 2])], BadRequestError),
    ([_header(v=2)], BadRequestError),
    ([_header(op="forward")], BadRequestError),
    ([_header(g="")], BadRequestError),
    ([_header(g=7)], BadRequestError),
    ([_header(g="x" * 201)], BadRequestError),
    ([_header(g="bad\nname")], BadRequestError),
    ([_header(k="steal")], BadRequestError),
    ([_header(r=-1)], BadRequestError),
    ([_header(r=True)], BadRequestError),
    ([_header(r=2**63)], BadRequestError),
    ([_header(a=0.0)], BadRequestError),
    ([_header(a=1.5)], BadRequestError),
    ([_header(a=float("nan"))], BadRequestError),
    ([_header(a="half")], BadRequestError),
    ([_header(c="zstd")], BadRequestError),
    ([_header(t="not a list")], BadRequestError),
    ([_header(t=[["float64", [2], None]]), b"\0" * 16], BadRequestError),
    ([_header(t=[["float32", [2], None]])], BadRequestError),  # spec without its frame
    ([_header(t=[]), b"\0" * 8], BadRequestError),  # frame without its spec
    ([_header(t=[["float32", [3], None]]), b"\0" * 8], BadRequestError),  # wrong frame size
    ([_header(t=[["float32", [2**20, 2**20], None]]), b""], TooLargeError),
    ([_header(t=[["float32", [1], None]] * 2000)], TooLargeError),
    ([_header()] + [b""] * 1100, TooLargeError),
    ([b"\x80" * (AVERAGING_LIMITS.max_header_bytes + 1)], TooLargeError),
])
def test_hostile_requests_are_refused_typed(frames: list, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_exchange(frames)


def test_limits_are_checked_before_the_payload_is_touched() -> None:
    """A spec claiming more bytes than the limits allow is refused by its header alone:
    the frame it points at (far too short here) is never read or wrapped."""
    small = WireLimits(max_header_bytes=4096, max_tensors=4, max_elements=1000,
                       max_bytes=4000)
    with pytest.raises(TooLargeError):
        decode_exchange([_header(t=[["float32", [1001], None]]), b""], small)
    with pytest.raises(TooLargeError):
        decode_exchange([_header(t=[["float32", [600], None]] * 2), b"\0" * 2400, b""],
                        small)
    with pytest.raises(TooLargeError):
        decode_answer([msgpack.packb({"v": 1, "op": "result", "id": 0,
                                      "t": [["float32", [10**6], None]]}), b""], small)


def test_non_finite_tensors_are_refused_both_ways() -> None:
    bad = torch.tensor([1.0, float("nan")])
    with pytest.raises(NonFiniteError):
        decode_exchange(_wire(encode_exchange("g", Exchange("elastic", 1, [bad]))))
    with pytest.raises(NonFiniteError):
        decode_answer(_wire(encode_answer([torch.ones(2), torch.tensor([float("inf")])])))


def test_malformed_answers_are_typed() -> None:
    with pytest.raises(BadRequestError):
        decode_answer([])
    with pytest.raises(BadRequestError):
        decode_answer([b"\xc1"])
    with pytest.raises(BadRequestError):
        decode_answer([msgpack.packb({"v": 1, "op": "info", "id": 0, "info": {}})])
    with pytest.raises(BadRequestError):
        decode_answer([msgpack.packb({"v": 1, "op": "error", "id": 0, "code": 3})])
    with pytest.raises(TooLargeError):
        decode_answer([b"\x80" * (AVERAGING_LIMITS.max_header_bytes + 1)])


def test_encoder_refuses_what_a_decoder_would_refuse() -> None:
    with pytest.raises(ValueError):
        encode_exchange("", Exchange("elastic", 1))
    with pytest.raises(ValueError):
        encode_exchange("g", Exchange("elastic", 1), compression="zstd")
