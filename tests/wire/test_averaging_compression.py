"""The averaging wire (``volunteer.client.averaging.wire``) and the wire's compression list:
bf16 works both ways (overflowing tensors go uncompressed), int8 is refused on both sides
with errors that say why (parameters must not take 8-bit noise at every exchange)."""

from __future__ import annotations

import msgpack
import pytest
import torch

from volunteer.client.averaging.group import Exchange
from volunteer.client.averaging.wire import (
    AVERAGING_COMPRESSIONS,
    BF16_MAX,
    decode_answer,
    decode_exchange_message,
    encode_answer,
    encode_exchange,
)
from volunteer.wire import COMPRESSIONS
from volunteer.wire.errors import BadRequestError
from volunteer.wire.messages import encode_result


def _wire(frames: list) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) for f in frames]


def test_averaging_takes_every_float_compression_and_not_int8() -> None:
    assert tuple(c for c in COMPRESSIONS if c != "int8") == AVERAGING_COMPRESSIONS
    assert "bf16" in AVERAGING_COMPRESSIONS


def test_bf16_halves_the_bytes_and_keeps_overflowing_tensors_exact() -> None:
    small = torch.randn(64, 64)
    huge = torch.tensor([3.4e38, -1.0])  # rounds to inf as bfloat16
    assert torch.isinf(huge.bfloat16()).any() and BF16_MAX < 3.4e38
    plain = encode_exchange("g", Exchange("elastic", 1, [small]))
    packed = encode_exchange("g", Exchange("elastic", 1, [small, huge]), compression="bf16")
    assert memoryview(packed[1]).nbytes * 2 == memoryview(plain[1]).nbytes
    msg = decode_exchange_message(_wire(packed))
    assert msg.compression == "bf16"
    got_small, got_huge = msg.exchange.tensors
    assert got_small.dtype == torch.float32 and torch.equal(got_small, small.bfloat16().float())
    assert torch.equal(got_huge, huge)
    answer = decode_answer(_wire(encode_answer([small, huge], compression="bf16")))
    assert torch.equal(answer[0], small.bfloat16().float()) and torch.equal(answer[1], huge)


def test_int8_is_refused_when_encoding_with_the_reason() -> None:
    with pytest.raises(ValueError, match="not parameters"):
        encode_exchange("g", Exchange("elastic", 1, [torch.ones(4)]), compression="int8")
    with pytest.raises(ValueError, match="not parameters"):
        encode_answer([torch.ones(4)], compression="int8")


def test_int8_headers_and_tensors_are_refused_when_decoding() -> None:
    header = {"v": 1, "op": "exchange", "g": "g", "k": "elastic", "r": 1, "a": 0.5, "t": [],
              "c": "int8"}
    with pytest.raises(BadRequestError, match="not supported"):
        decode_exchange_message([msgpack.packb(header)])
    # a hostile peer's int8 tensor under a float header, in a request and in an answer
    quantised = encode_result(0, [torch.ones(64)], "int8")
    spec = msgpack.unpackb(quantised[0])["t"]
    header.update(c="bf16", t=spec)
    with pytest.raises(BadRequestError, match="int8"):
        decode_exchange_message([msgpack.packb(header), bytes(quantised[1])])
    with pytest.raises(BadRequestError, match="int8"):
        decode_answer(_wire(quantised))
