"""Wire compressions through the request/reply messages: fp16, bf16 and int8 both ways, byte
ratios, dtype restored, old 3-element specs still read, zero-copy kept for unquantised
tensors, and hostile int8 specs refused before anything is allocated."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from volunteer.wire import COMPRESSIONS, quant
from volunteer.wire.errors import BadRequestError, NonFiniteError, TooLargeError
from volunteer.wire.limits import WireLimits
from volunteer.wire.messages import (
    PROTOCOL_VERSION,
    decode_reply,
    decode_request,
    encode_request,
    encode_result,
    encode_result_or_error,
    frames_nbytes,
)
from volunteer.wire.tensors import COMPRESSIONS as TENSOR_COMPRESSIONS
from volunteer.wire.tensors import frames_to_tensors, tensor_to_frame


def writable(frames: list) -> list[memoryview]:
    """Frames as a zmq receiver holds them: private, writable buffers."""
    return [memoryview(bytearray(memoryview(f).cast("B"))) for f in frames]


def test_one_list_of_compressions() -> None:
    assert TENSOR_COMPRESSIONS is COMPRESSIONS
    assert COMPRESSIONS == (None, "fp16", "bf16", "int8")


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_requests_and_replies_round_trip_in_every_compression(compression, dtype) -> None:
    x = (torch.randn(32, 100) * 3).to(dtype)
    g = torch.randn(32, 100).to(dtype)
    frames = encode_request("backward", "u", [x, g], request_id=5, forward_id=4,
                            compression=compression)
    req = decode_request(writable(frames))
    assert req.compression == compression and req.wire_nbytes == frames_nbytes(frames)
    reply = decode_reply(writable(encode_result(5, [x], compression, cached=True)))
    assert reply.cached
    for sent, got in [(x, req.tensors[0]), (g, req.tensors[1]), (x, reply.tensors[0])]:
        assert got.dtype == dtype and got.shape == sent.shape
        s, r = sent.double(), got.double()
        if compression is None or (dtype != torch.float32 and compression in ("fp16", "bf16")):
            assert torch.equal(got, sent)
        elif compression == "fp16":
            assert torch.equal(got, sent.half().float())
        elif compression == "bf16":
            assert torch.equal(got, sent.bfloat16().float())
        else:  # int8: the bound of quant.py (plus the dtype's own rounding when not float32)
            absmax = s.reshape(-1, 4, quant.BLOCK // 4).abs().amax(dim=(1, 2))
            bound = absmax.repeat_interleave(quant.BLOCK).view_as(s) / 254 * (1 + 2**-12)
            if dtype != torch.float32:
                bound = bound + s.abs() * 2.0 ** -(8 if dtype == torch.bfloat16 else 11) * 2
            assert bool(((s - r).abs() <= bound + 2.0**-149).all())


def test_byte_ratios_against_float32() -> None:
    x = torch.randn(256, 1024)
    sizes = {c: memoryview(tensor_to_frame(x, c)[1]).nbytes for c in COMPRESSIONS}
    assert sizes[None] == 4 * x.numel()
    assert sizes["fp16"] == sizes["bf16"] == 2 * x.numel()
    assert sizes["int8"] == x.numel() + 4 * x.numel() // quant.BLOCK  # 1.0625 bytes per value
    assert sizes["int8"] / sizes[None] == pytest.approx(0.265625)


def test_unquantised_floats_stay_zero_copy_and_old_specs_still_read() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    spec, buf = tensor_to_frame(x, None)
    assert spec == ["float32", [3, 4], None]  # the 3-element spec older peers send and read
    frame = memoryview(bytearray(buf))
    (got,) = frames_to_tensors([spec], [frame], WireLimits())
    frame[0:4] = np.float32(7).tobytes()
    assert got[0, 0] == 7  # wraps the received buffer
    bf_spec, bf_buf = tensor_to_frame(x.bfloat16(), None)
    (got,) = frames_to_tensors([bf_spec], [memoryview(bytearray(bf_buf))], WireLimits())
    assert got.dtype == torch.bfloat16 and torch.equal(got, x.bfloat16())


def test_empty_tensors_travel_unquantised() -> None:
    spec, buf = tensor_to_frame(torch.empty(0, 8), "int8")
    assert spec == ["float32", [0, 8], None] and buf.nbytes == 0


def test_int8_spec_layout() -> None:
    spec, buf = tensor_to_frame(torch.ones(2, 3, dtype=torch.float16), "int8")
    assert spec == ["int8", [2, 3], "float16", quant.BLOCK]
    assert buf.nbytes == quant.frame_nbytes(6, quant.BLOCK)


def test_non_finite_values_cannot_be_sent_as_int8() -> None:
    bad = torch.tensor([[1.0, float("nan")]])
    with pytest.raises(NonFiniteError):
        encode_request("forward", "u", [bad], request_id=1, compression="int8")
    err = encode_result_or_error(3, [bad], "int8")
    assert isinstance(err, NonFiniteError)
    ok = encode_result_or_error(3, [bad], None)  # uncompressed NaN goes as is (as before)
    assert isinstance(ok, list) and torch.isnan(decode_reply(ok).tensors[0]).any()


def test_unknown_compressions_are_refused() -> None:
    with pytest.raises(ValueError, match="int8"):
        tensor_to_frame(torch.ones(2), "int4")
    header = {"v": PROTOCOL_VERSION, "op": "forward", "uid": "u", "id": 1, "t": [], "c": "int4"}
    with pytest.raises(BadRequestError, match="compression"):
        decode_request([msgpack.packb(header)])


def int8_frame(values: list[float] | None = None, scales: list[float] | None = None,
               numel: int = 64) -> bytes:
    if scales is None:
        return bytes(quant.quantize(torch.tensor(values or [1.0] * numel)).numpy())
    return np.asarray(scales, "<f4").tobytes() + bytes(numel)


BAD_SPECS = [
    (["int8", [64], "float32", 64], int8_frame(scales=[float("nan")]), NonFiniteError, "non-finite"),
    (["int8", [64], "float32", 64], int8_frame(scales=[float("inf")]), NonFiniteError, "non-finite"),
    (["int8", [64], "float32", 64], int8_frame(scales=[-2.0]), BadRequestError, "negative"),
    (["int8", [64], "float32", 64], int8_frame()[:-1], BadRequestError, "does not match"),
    (["int8", [64], "float32", 32], int8_frame(), BadRequestError, "does not match"),  # scales
    (["int8", [64], "float32", 48], int8_frame(), BadRequestError, "block"),
    (["int8", [64], "float32", True], int8_frame(), BadRequestError, "block"),
    (["int8", [64], "float32", 64.0], int8_frame(), BadRequestError, "block"),
    (["int8", [64], None, 64], int8_frame(), BadRequestError, "restores"),
    (["int8", [64], "int8", 64], int8_frame(), BadRequestError, "restore dtype"),
    (["int8", [64], "float32"], int8_frame(), BadRequestError, "unsupported dtype"),
    (["float32", [16], None, 64], bytes(64), BadRequestError, "4-element"),
    (["int8", [64], "float32", 64, 1], int8_frame(), BadRequestError, "spec must be"),
]


@pytest.mark.parametrize(("spec", "frame", "error", "match"), BAD_SPECS)
def test_hostile_int8_specs_get_typed_errors(spec, frame, error, match) -> None:
    with pytest.raises(error, match=match):
        frames_to_tensors([spec], [frame], WireLimits())


def test_restored_float32_size_is_counted_before_allocation(monkeypatch) -> None:
    """An int8 frame of 4 Ki values is 4.25 KiB on the wire but 16 KiB once restored: the
    restored size is what meets max_bytes, before dequantize allocates anything."""
    numel = 4096
    frame = int8_frame([1.0] * numel)
    spec = ["int8", [numel], "float32", 64]
    fits = WireLimits(max_bytes=4 * numel, max_elements=numel)
    assert frames_to_tensors([spec], [frame], fits)[0].shape == (numel,)
    monkeypatch.setattr(quant, "dequantize", lambda *a: pytest.fail("allocated before the check"))
    with pytest.raises(TooLargeError, match="payload too large"):
        frames_to_tensors([spec], [frame], WireLimits(max_bytes=4 * numel - 1))
    with pytest.raises(TooLargeError, match=r"max_elements|too many elements"):
        frames_to_tensors([spec], [frame], WireLimits(max_elements=numel - 1))
    huge = ["int8", [2**40], "float32", 64]  # a tiny frame claiming 2**40 values
    with pytest.raises(TooLargeError):
        frames_to_tensors([huge], [frame], WireLimits())


def test_fp16_restore_counts_the_float32_it_allocates() -> None:
    spec, buf = tensor_to_frame(torch.ones(1024), "fp16")
    with pytest.raises(TooLargeError):
        frames_to_tensors([spec], [bytes(buf)], WireLimits(max_bytes=4 * 1024 - 1))


FUZZ_LIMITS = WireLimits(max_header_bytes=512, max_tensors=3, max_elements=200, max_bytes=600)
valid_int8_spec = st.tuples(
    st.just("int8"), st.lists(st.integers(1, 12), min_size=1, max_size=2),
    st.sampled_from(["float32", "float16", "bfloat16"]), st.sampled_from([8, 16, 64])).map(list)
hostile_int8_spec = st.tuples(
    st.sampled_from(["int8", "float32", "int4"]),
    st.lists(st.integers(-1, 300), max_size=3),
    st.sampled_from([None, "float32", "int8", 7]),
    st.one_of(st.sampled_from([8, 64]), st.integers(-1, 2**17), st.floats(), st.booleans()),
).map(list)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(valid_int8_spec, hostile_int8_spec), max_size=3), st.data())
def test_hostile_int8_frames_decode_within_limits_or_raise_typed(specs, data) -> None:
    frames = []
    for spec in specs:  # honest frames, random bytes of the claimed size, or any bytes
        numel = 1
        for d in spec[1]:
            numel *= max(d, 0)
        sized = quant.valid_block(spec[3]) and numel <= 2000
        how = data.draw(st.sampled_from(["honest", "random", "any"] if sized else ["any"]))
        if how == "honest":
            frames.append(bytes(quant.quantize(torch.randn(numel) * 3, spec[3]).numpy()))
        elif how == "random":
            size = quant.frame_nbytes(numel, spec[3])
            frames.append(data.draw(st.binary(min_size=size, max_size=size)))
        else:
            frames.append(data.draw(st.binary(max_size=700)))
    if frames and data.draw(st.integers(0, 4)) == 4:
        frames.pop()  # one frame short of the header's count
    try:
        tensors = frames_to_tensors(specs, frames, FUZZ_LIMITS)
    except (BadRequestError, TooLargeError):
        return
    assert sum(t.numel() for t in tensors) <= FUZZ_LIMITS.max_elements
    assert sum(4 * t.numel() for t in tensors) <= FUZZ_LIMITS.max_bytes
    assert all(bool(torch.isfinite(t).all()) for t in tensors)
