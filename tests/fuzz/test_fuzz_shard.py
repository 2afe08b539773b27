"""Fuzzing shard header parsing (``volunteer.experts.shard.parse_header`` / ``decode_shard``).

Inputs: random bytes, byte-level mutations of a real header, and re-encoded headers whose
fields (tree, tensor references, chunk hashes, sizes) were replaced by hostile values.
Property: ``ShardError`` subclasses (``ShardFormatError``, ``ShardHashError``,
``ShardMismatchError``) or a header that is internally consistent (chunk count matches the
size, tensor spans tile the body); decoding a body for such a header again raises only
``ShardError`` or returns tensors whose bytes add up to the header's size.
"""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.profile import fuzz_settings
from tests.fuzz.strategies import msgpack_values, mutated
from volunteer.experts.shard import (
    MIN_CHUNK_BYTES,
    TENSOR_EXT,
    ShardError,
    decode_shard,
    encode_shard,
    parse_header,
)

pytestmark = pytest.mark.timeout(180)

STATE = {
    "model": {"w": torch.arange(1100, dtype=torch.float32).reshape(11, 100), "b": torch.zeros(3)},
    "opt": {"state": {0: {"step": torch.tensor(4.0), "m": torch.ones(5, dtype=torch.bfloat16)}},
            "param_groups": [{"lr": 0.001, "betas": [0.9, 0.999], "params": [0]}]},
    "updates_applied": 4,
}
HEADER, BODY = encode_shard("demo.ffn.1", "fp", STATE, chunk_bytes=MIN_CHUNK_BYTES)
RAW = HEADER.raw
DOC = msgpack.unpackb(RAW, raw=False, strict_map_key=False)
MAX_DECODE_BYTES = 1 << 16  # bodies the test is willing to build for a parsed header


def ext(dtype: object, shape: object, offset: object, length: object) -> msgpack.ExtType:
    return msgpack.ExtType(TENSOR_EXT, msgpack.packb([dtype, shape, offset, length]))


def nested(depth: int) -> list:
    """``depth`` lists, each holding the next (deep trees must be refused, not recursed)."""
    out: list = []
    for _ in range(depth - 1):
        out = [out]
    return out


hostile_refs = st.builds(
    ext,
    st.one_of(st.sampled_from(["float32", "bfloat16", "bool", "int64", "complex64", ""]),
              msgpack_values),
    st.one_of(st.lists(st.integers(-1, 2**41), max_size=10), msgpack_values),
    st.one_of(st.integers(-1, 2**64 - 1), msgpack_values),
    st.one_of(st.integers(-1, 2**64 - 1), msgpack_values),
)

hostile = st.one_of(
    msgpack_values,
    hostile_refs,
    st.builds(lambda code, data: msgpack.ExtType(code, data), st.integers(0, 127),
              st.binary(max_size=16)),
    st.recursive(hostile_refs, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
        max_leaves=6),
    st.integers(1, 40).map(nested),
    st.lists(st.binary(min_size=31, max_size=33), max_size=4),
    st.integers(-1, 2**64 - 1),
)


def set_path(doc: dict, path: list, value: object) -> None:
    """Set ``doc[path]`` when every container on the way is still there (an earlier edit
    may have replaced one)."""
    node = doc
    for k in path[:-1]:
        if not isinstance(node, dict) or k not in node:
            return
        node = node[k]
    if isinstance(node, dict):
        node[path[-1]] = value


PATHS = [["format"], ["uid"], ["fingerprint"], ["version"], ["total_bytes"], ["chunk_bytes"],
         ["chunk_hashes"], ["tree"], ["tree", "model"], ["tree", "model", "w"],
         ["tree", "model", "b"], ["tree", "opt", "state"], ["tree", "opt", "state", 0, "m"],
         ["tree", "opt", "param_groups"], ["tree", "updates_applied"], ["junk"]]


@st.composite
def hostile_headers(draw: st.DrawFn) -> bytes:
    doc = msgpack.unpackb(RAW, raw=False, strict_map_key=False)
    for _ in range(draw(st.integers(1, 3))):
        set_path(doc, draw(st.sampled_from(PATHS)), draw(hostile))
    return msgpack.packb(doc, use_bin_type=True)


def check(raw: bytes, body: bytes | None = None) -> None:
    try:
        header = parse_header(raw)
    except ShardError:
        return
    assert header.num_chunks == len(header.chunk_hashes) == -(-header.total_bytes // header.chunk_bytes)
    if header.total_bytes > MAX_DECODE_BYTES:
        return
    if body is None or len(body) != header.total_bytes:
        body = bytes(header.total_bytes)
    try:
        state = decode_shard(header, body)
    except ShardError:
        return
    sizes: list[int] = []

    def walk(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            sizes.append(obj.numel() * obj.element_size())
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(state)
    assert sum(sizes) == header.total_bytes


def test_the_valid_header_round_trips() -> None:
    check(RAW, BODY)
    assert decode_shard(parse_header(RAW, root=HEADER.root), BODY)["updates_applied"] == 4


@fuzz_settings()
@given(st.one_of(st.binary(max_size=200),
                 msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True))))
def test_shard_header_parser_on_random_bytes(raw: bytes) -> None:
    check(raw)


@fuzz_settings()
@given(st.data())
def test_shard_header_parser_on_mutated_headers(data: st.DataObject) -> None:
    check(data.draw(mutated(RAW)), data.draw(mutated(BODY)))


@fuzz_settings()
@given(hostile_headers(), st.binary(max_size=64))
def test_shard_header_parser_on_hostile_fields(raw: bytes, body: bytes) -> None:
    check(raw, body)
