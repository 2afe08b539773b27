"""Wire messages: round trips for every dtype and compression, limits checked before
allocation, validation of every header field, typed error replies."""

from __future__ import annotations

import msgpack
import pytest
import torch

from volunteer.wire.errors import (
    ERROR_CLASSES,
    BadRequestError,
    DrainingError,
    OverloadedError,
    RemoteError,
    TooLargeError,
    error_from_code,
)
from volunteer.wire.limits import WireLimits
from volunteer.wire.messages import (
    PROTOCOL_VERSION,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
)
from volunteer.wire.ops import decode_info_reply, encode_info_request
from volunteer.wire.tensors import tensor_to_frame


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_request_round_trip_keeps_values_dtype_and_fields(dtype):
    x = torch.randn(3, 5).to(dtype)
    g = torch.randn(3, 5).to(dtype)
    frames = encode_request(
        "backward", "demo.ffn.1.2", [x, g], request_id=2**64 - 1, timeout=2.5, forward_id=42
    )
    req = decode_request([bytes(memoryview(f).cast("B")) for f in frames])
    assert (req.op, req.uid, req.request_id, req.ttl, req.forward_id) == (
        "backward",
        "demo.ffn.1.2",
        2**64 - 1,
        2.5,
        42,
    )
    assert not req.will_backward and req.compression is None
    for sent, got in zip([x, g], req.tensors, strict=True):
        assert got.dtype == dtype
        assert torch.equal(got, sent)


def test_fp16_compression_halves_bytes_and_restores_float32():
    x = torch.randn(4, 8)
    plain = encode_request("forward", "u", [x], request_id=1)
    small = encode_request(
        "forward", "u", [x], request_id=1, compression="fp16", will_backward=True
    )
    assert memoryview(small[1]).nbytes * 2 == memoryview(plain[1]).nbytes
    req = decode_request(small)
    assert req.will_backward and req.compression == "fp16"
    assert req.tensors[0].dtype == torch.float32
    torch.testing.assert_close(req.tensors[0], x, rtol=1e-3, atol=1e-3)


def test_zero_copy_on_writable_buffers_and_private_copy_of_bytes():
    x = torch.randn(2, 3)
    spec, buf = tensor_to_frame(x)
    assert spec == ["float32", [2, 3], None]
    writable = bytearray(memoryview(buf).cast("B"))
    hdr = encode_request("forward", "u", [x], request_id=1)[0]
    shared = decode_request([hdr, memoryview(writable)]).tensors[0]
    writable[:4] = b"\x00\x00\x00\x00"
    assert shared[0, 0].item() == 0.0  # aliases the received buffer
    immutable = bytes(memoryview(buf).cast("B"))
    private = decode_request([hdr, immutable]).tensors[0]
    private.add_(1.0)  # must not write into the bytes object
    assert bytes(memoryview(buf).cast("B")) == immutable


@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 4), (0, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensors_of_any_rank_and_layout_round_trip(shape, dtype):
    x = torch.randn(shape).to(dtype)
    t = torch.randn(5, 3).to(dtype).t()  # not contiguous: sent as a contiguous copy
    frames = encode_result(9, [x, t])
    received = [bytes(memoryview(frames[0]).cast("B"))]  # header: bytes, as any peer may send
    received += [memoryview(bytearray(memoryview(f).cast("B"))) for f in frames[1:]]
    got = decode_reply(received).tensors
    assert [g.shape for g in got] == [x.shape, t.shape]
    assert all(g.dtype == dtype for g in got)
    assert torch.equal(got[0], x) and torch.equal(got[1], t)


def header(**fields) -> bytes:
    base = {"v": PROTOCOL_VERSION, "op": "forward", "uid": "u", "id": 3, "t": []}
    base.update(fields)
    return msgpack.packb(base)


LIMITS = WireLimits(max_header_bytes=512, max_tensors=3, max_elements=100, max_bytes=256)


@pytest.mark.parametrize(
    ("frames", "error", "match"),
    [
        ([], BadRequestError, "empty"),
        ([b"\x93\x01"], BadRequestError, "msgpack"),
        ([msgpack.packb("hello")], BadRequestError, "map"),
        ([header(v=2)], BadRequestError, "version"),
        ([header(op="train")], BadRequestError, "unknown op"),
        ([header(id=-1)], BadRequestError, "id"),
        ([header(id="x")], BadRequestError, "id"),
        ([header(uid=5)], BadRequestError, "uid"),
        ([header(ttl="soon")], BadRequestError, "ttl"),
        ([header(wb="yes")], BadRequestError, "wb"),
        ([header(c="zstd")], BadRequestError, "compression"),
        ([header(t="nope")], BadRequestError, "list"),
        ([header(t=[["float64", [1], None]]), bytes(8)], BadRequestError, "dtype"),
        ([header(t=[["float32", [1.5], None]]), bytes(4)], BadRequestError, "shape"),
        ([header(t=[["float32", [1] * 9, None]]), bytes(4)], BadRequestError, "shape"),
        ([header(t=[["float32", [2], None]]), bytes(4)], BadRequestError, "does not match"),
        ([header(t=[["float32", [1], None]] * 2), bytes(4)], BadRequestError, "frames"),
        ([header(pad="x" * 600)], TooLargeError, "header"),
        (
            [header(t=[["float32", [1], None]] * 4), *[bytes(4)] * 4],
            TooLargeError,
            "frames|tensors",
        ),
        ([header(t=[["float32", [101], None]]), bytes(404)], TooLargeError, "elements"),
        ([header(t=[["float32", [2**40, 2**40], None]]), b""], TooLargeError, "elements"),
        ([header(t=[["float32", [0, 2**64 - 1], None]]), b""], TooLargeError, "dimension"),
        (
            [header(t=[["float32", [60], None], ["float32", [10], None]]), bytes(240), bytes(40)],
            TooLargeError,
            "bytes",
        ),
    ],
)
def test_decode_rejects_bad_requests_with_typed_errors(frames, error, match):
    with pytest.raises(error, match=match):
        decode_request(frames, LIMITS)


def test_decode_error_carries_the_request_id_when_readable():
    with pytest.raises(BadRequestError) as info:
        decode_request([header(id=77, op="nope")])
    assert info.value.request_id == 77


def test_result_and_error_replies():
    y = torch.randn(2, 2)
    reply = decode_reply(encode_result(9, [y]))
    assert reply.op == "result" and reply.request_id == 9 and torch.equal(reply.tensors[0], y)
    with pytest.raises(OverloadedError, match="queue full") as info:
        decode_reply(encode_error(9, "overloaded", "queue full"))
    assert info.value.code == "overloaded" and info.value.message == "queue full"
    with pytest.raises(RemoteError) as unknown:
        decode_reply(encode_error(9, "martian", "??"))
    assert unknown.value.code == "martian"


def test_every_error_code_maps_to_its_class():
    assert set(ERROR_CLASSES) == {
        "unknown_expert",
        "bad_request",
        "too_large",
        "deadline_expired",
        "overloaded",
        "draining",
        "paused",
        "internal",
        "timeout",
        "unreachable",
        "cache_miss",
        "non_finite",
        "grad_norm",
    }
    for code, cls in ERROR_CLASSES.items():
        err = error_from_code(code, "msg")
        assert type(err) is cls and err.code == code and err.message == "msg" and "msg" in str(err)
    assert isinstance(error_from_code("draining", "x"), DrainingError)


def test_info_request_and_reply():
    from volunteer.wire.messages import encode_info_reply

    req = decode_request(encode_info_request(5))
    assert req.op == "info" and req.request_id == 5
    table = {"a.0": {"kind": "ffn", "input_shapes": [[4]], "dtype": "float32", "state": "serving"}}
    assert decode_info_reply(encode_info_reply(5, table)) == table
    with pytest.raises(BadRequestError):
        decode_info_reply(encode_info_reply(5, {"a.0": {"kind": "ffn", "state": "on fire"}}))
