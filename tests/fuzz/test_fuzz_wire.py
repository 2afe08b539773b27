"""Fuzzing the wire decoders (``volunteer.wire``): messages, tensors and stream framing.

Property: whatever the frames, a decoder either returns a message within the limits it was
given or raises one of the wire's typed errors (``RemoteError`` subclasses:
``BadRequestError``, ``TooLargeError``, and for replies the error a server reported);
never ``TypeError``, ``KeyError``, ``OverflowError``, ``MemoryError`` or a numpy/torch error.
Small limits make the success paths (a message that fits) as reachable as the refusals.
"""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.profile import fuzz_settings
from tests.fuzz.strategies import msgpack_values, mutated, reader, run_sync
from volunteer.wire import COMPRESSIONS
from volunteer.wire.errors import BadRequestError, RemoteError, TooLargeError
from volunteer.wire.framing import frame_budget, pack_frames, read_frames
from volunteer.wire.limits import WireLimits
from volunteer.wire.messages import (
    MAX_UID_LEN,
    PROTOCOL_VERSION,
    REQUEST_OPS,
    decode_reply,
    decode_request,
    encode_request,
    encode_result,
)
from volunteer.wire.ops import decode_info_reply
from volunteer.wire.tensors import ITEMSIZE, frames_to_tensors

pytestmark = pytest.mark.timeout(120)

LIMITS = WireLimits(max_header_bytes=512, max_tensors=3, max_elements=64, max_bytes=256)
DECODE_ERRORS = (BadRequestError, TooLargeError)  # what a request decoder may raise

raw_frames = st.lists(st.binary(max_size=80), max_size=6)

specs = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["float32", "float16", "bfloat16", "int8", ""]),
                  st.lists(st.integers(-2, 2**40), max_size=10),
                  st.sampled_from([None, "float32", "float16", "bfloat16", "int8"])).map(list),
        msgpack_values,
    ),
    max_size=5,
)

valid_specs = st.lists(
    st.tuples(st.sampled_from(["float32", "float16", "bfloat16"]),
              st.lists(st.integers(0, 6), max_size=3),
              st.sampled_from([None, "float32"])).map(list),
    max_size=4,
)


@st.composite
def plausible_header(draw: st.DrawFn) -> dict:
    """A valid request header with a few fields replaced by hostile values or removed."""
    header = {"v": PROTOCOL_VERSION, "op": draw(st.sampled_from(REQUEST_OPS)), "uid": "demo.ffn.1",
              "id": draw(st.integers(0, 2**64 - 1)), "ttl": 5.0, "t": draw(valid_specs)}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["v", "op", "uid", "id", "ttl", "t", "wb", "fid", "c", "xi",
                                    "k", "info", "code", "msg", "junk"]))
        if draw(st.integers(0, 4)) == 0:
            header.pop(key, None)
        elif key == "t":
            header[key] = draw(st.one_of(specs, msgpack_values))
        else:
            header[key] = draw(st.one_of(msgpack_values, st.integers(-1, 2**64 - 1),
                                         st.text(min_size=MAX_UID_LEN - 1, max_size=MAX_UID_LEN + 2)))
    return header


@st.composite
def structured_frames(draw: st.DrawFn) -> list[bytes]:
    """A msgpack header map (fields valid or not) and payload frames whose sizes often
    match what the header's specs describe."""
    header = draw(plausible_header())
    frames = [msgpack.packb(header, use_bin_type=True)]
    tensor_specs = header.get("t")
    if isinstance(tensor_specs, list) and draw(st.booleans()):
        for spec in tensor_specs:
            size = 0
            if isinstance(spec, list) and len(spec) == 3 and isinstance(spec[1], list):
                size = 2 if spec[0] != "float32" else 4
                for d in spec[1]:
                    size *= d if isinstance(d, int) and 0 <= d < 64 else 1
            frames.append(bytes(max(0, min(size + draw(st.sampled_from((0, 0, -1, 1))), 300))))
    else:
        frames += draw(st.lists(st.binary(max_size=64), max_size=4))
    return frames


def check_tensors_within(tensors: list[torch.Tensor], limits: WireLimits) -> None:
    assert len(tensors) <= limits.max_tensors
    assert sum(t.numel() for t in tensors) <= limits.max_elements
    assert all(t.dtype in ITEMSIZE for t in tensors)


def check_request(frames: list[bytes]) -> None:
    try:
        req = decode_request(frames, LIMITS)
    except DECODE_ERRORS:
        return
    assert req.op in REQUEST_OPS and isinstance(req.uid, str) and len(req.uid) <= MAX_UID_LEN
    assert isinstance(req.request_id, int) and 0 <= req.request_id < 2**64
    assert req.ttl is None or isinstance(req.ttl, float)
    assert req.compression in COMPRESSIONS and isinstance(req.will_backward, bool)
    check_tensors_within(req.tensors, LIMITS)


def check_reply(frames: list[bytes]) -> None:
    try:
        reply = decode_reply(frames, LIMITS)
    except RemoteError:  # includes the typed error a (hostile) server chose to report
        return
    assert reply.op in ("result", "info") and 0 <= reply.request_id < 2**64
    assert reply.info is None or isinstance(reply.info, dict)
    check_tensors_within(reply.tensors, LIMITS)
    try:
        table = decode_info_reply(frames, LIMITS)
    except RemoteError:
        return
    assert all(isinstance(uid, str) and isinstance(e, dict) for uid, e in table.items())


@fuzz_settings()
@given(raw_frames)
def test_request_decoder_on_random_frames(frames: list[bytes]) -> None:
    check_request(frames)


@fuzz_settings()
@given(structured_frames())
def test_request_decoder_on_plausible_headers(frames: list[bytes]) -> None:
    check_request(frames)


@fuzz_settings()
@given(st.data())
def test_request_decoder_on_mutated_valid_requests(data: st.DataObject) -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    op = data.draw(st.sampled_from(["forward", "backward"]))
    valid = [bytes(memoryview(f).cast("B")) for f in encode_request(
        op, "demo.ffn.1.2", [x, x][: data.draw(st.integers(0, 2))], request_id=7, timeout=3.0,
        forward_id=6 if op == "backward" else None,
        compression=data.draw(st.sampled_from(list(COMPRESSIONS))))]
    frames = [data.draw(mutated(f)) for f in valid]
    frames = data.draw(st.permutations(frames)) if data.draw(st.booleans()) else frames
    check_request(frames)


@fuzz_settings()
@given(st.one_of(raw_frames, structured_frames()))
def test_reply_decoders_on_random_frames(frames: list[bytes]) -> None:
    header = msgpack.packb({"v": PROTOCOL_VERSION, "op": "error", "id": 1, "code": "x", "msg": 2})
    check_reply(frames)
    check_reply([header, *frames[1:]])


@fuzz_settings()
@given(st.data())
def test_reply_decoder_on_mutated_valid_results(data: st.DataObject) -> None:
    x = torch.ones(2, 8, dtype=torch.float16)
    valid = [bytes(memoryview(f).cast("B")) for f in encode_result(9, [x], cached=True)]
    check_reply([data.draw(mutated(f)) for f in valid])


@fuzz_settings()
@given(specs, st.lists(st.binary(max_size=300), max_size=5))
def test_tensor_specs_against_frames(tensor_specs: list, frames: list[bytes]) -> None:
    try:
        tensors = frames_to_tensors(tensor_specs, frames, LIMITS)
    except DECODE_ERRORS:
        return
    check_tensors_within(tensors, LIMITS)
    assert sum(t.numel() * t.element_size() for t in tensors) <= LIMITS.max_bytes  # restored sizes are counted too


class StreamEnded(Exception):
    """The fuzz reader ran out of bytes (a real stream's EOF)."""


def check_framing(stream: bytes) -> None:
    asked: list[int] = []
    max_frames, max_total = frame_budget(LIMITS)
    try:
        frames = run_sync(read_frames(reader(stream, StreamEnded, asked), LIMITS))
    except (*DECODE_ERRORS, StreamEnded):
        pass
    else:
        assert 1 <= len(frames) <= max_frames
        assert len(frames[0]) <= LIMITS.max_header_bytes and sum(map(len, frames)) <= max_total
    # nothing was ever asked of the stream (so allocated) beyond the limits
    assert all(n <= max(4 * max_frames, max_total) for n in asked), asked


@fuzz_settings()
@given(st.binary(max_size=200))
def test_stream_framing_on_random_bytes(stream: bytes) -> None:
    check_framing(stream)


@fuzz_settings()
@given(st.data())
def test_stream_framing_on_mutated_valid_streams(data: st.DataObject) -> None:
    frames = data.draw(st.lists(st.binary(max_size=60), min_size=1, max_size=5))
    stream = data.draw(mutated(pack_frames(frames)))
    check_framing(stream + data.draw(st.binary(max_size=8)))
