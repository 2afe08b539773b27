"""Expert shards: bitwise round trip without pickle, deterministic roots, chunk hashes, and a
hostile-header parser that only ever raises ShardError."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import msgpack
import pytest
import torch

from volunteer.experts.backend import ExpertBackend, OptimizerSpec
from volunteer.experts.shard import (
    MAX_HEADER_BYTES,
    ShardError,
    ShardFormatError,
    ShardHashError,
    ShardHeader,
    ShardMismatchError,
    decode_shard,
    encode_shard,
    parse_header,
    verify_chunk,
)

UID = "t.ffn.0.0"
FP = "fp-1"
CHUNK = 4096


def trained_backend(optimizer: OptimizerSpec | None = None, steps: int = 3, seed: int = 0) -> ExpertBackend:
    torch.manual_seed(seed)
    backend = ExpertBackend(UID, "ffn", 16, optimizer)
    for _ in range(steps):
        graph = backend.forward_graph([torch.randn(4, 16)])
        _, grads = backend.gradients(graph, torch.randn(4, 16))
        backend.apply_gradients([grads])
    return backend


def assert_same(a: Any, b: Any) -> None:
    """Bitwise equality of two state trees (tuples compare equal to lists)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(
            a.view(torch.uint8) if a.dtype == torch.bool else a, b.view(torch.uint8) if b.dtype == torch.bool else b
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        assert all(type(k) is type(next(kb for kb in b if kb == k)) for k in a)  # int keys stay ints
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


def mixed_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "module": {
            "w": torch.randn(33, 17, generator=g),
            "half": torch.randn(5, 3, generator=g).half(),
            "bf": torch.randn(7, generator=g).bfloat16(),
            "f64": torch.randn(2, 2, generator=g).double(),
            "idx": torch.arange(-5, 6, dtype=torch.int64),
            "i32": torch.tensor([1, -2], dtype=torch.int32),
            "i16": torch.tensor([3], dtype=torch.int16),
            "i8": torch.tensor([-4], dtype=torch.int8),
            "u8": torch.tensor([250, 0, 7], dtype=torch.uint8),
            "mask": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 4),
            "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        },
        "optimizer": {
            "state": {0: {"step": torch.tensor(2.0)}, 7: {}},
            "param_groups": [
                {"betas": (0.9, 0.999), "eps": 1e-8, "flag": True, "none": None, "params": [0, 7], "name": "g"}
            ],
        },
        "updates_applied": 42,
    }


def test_round_trip_is_bitwise_for_every_dtype_and_int_keys() -> None:
    state = mixed_state()
    header, body = encode_shard(UID, FP, state, chunk_bytes=CHUNK)
    assert header.version == 42 and header.total_bytes == len(body) and header.uid == UID and header.fingerprint == FP
    assert header.root == hashlib.sha256(header.raw).digest() and header.root_hex == header.root.hex()
    assert parse_header(header.raw, root=header.root, uid=UID, fingerprint=FP) == header
    out = decode_shard(header, body)
    assert_same(state, out)
    assert list(out["optimizer"]["state"]) == [0, 7]
    assert out["module"]["w"].is_contiguous() and not out["module"]["w"].requires_grad
    out["module"]["w"].add_(1)  # fresh writable tensors, no aliasing of the body
    assert decode_shard(header, bytearray(body))["module"]["w"].equal(state["module"]["w"])


@pytest.mark.parametrize("spec", [OptimizerSpec(name="adam", lr=0.01), OptimizerSpec(name="sgd", lr=0.1, momentum=0.9)])
def test_backend_state_round_trips_into_a_fresh_backend(spec: OptimizerSpec) -> None:
    src = trained_backend(spec)
    header, body = encode_shard(UID, FP, src.state_dict(), chunk_bytes=CHUNK)
    dst = ExpertBackend(UID, "ffn", 16, spec)
    dst.load_state_dict(decode_shard(header, body))  # list betas are accepted by torch
    assert dst.updates_applied == 3
    assert_same(src.state_dict(), dst.state_dict())
    # both take the same next step: optimizer state restored exactly
    x, gy = torch.randn(4, 16), torch.randn(4, 16)
    for b in (src, dst):
        b.apply_gradients([b.gradients(b.forward_graph([x]), gy)[1]])
    assert_same(src.module.state_dict(), dst.module.state_dict())
    # a decoded-then-loaded state re-encodes to the same root
    assert (
        encode_shard(UID, FP, dst.state_dict(), CHUNK)[0].root == encode_shard(UID, FP, src.state_dict(), CHUNK)[0].root
    )


def test_decoded_optimizer_state_loads_into_plain_adam_and_sgd() -> None:
    for opt_cls, kwargs in (
        (torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99)}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    ):
        p = torch.nn.Parameter(torch.randn(5))
        opt = opt_cls([p], **kwargs)
        p.grad = torch.randn(5)
        opt.step()
        header, body = encode_shard(UID, FP, {"optimizer": opt.state_dict()}, CHUNK)
        fresh = opt_cls([torch.nn.Parameter(p.detach().clone())], **kwargs)
        fresh.load_state_dict(decode_shard(header, body)["optimizer"])
        assert_same(opt.state_dict(), fresh.state_dict())


def test_encoding_is_deterministic_and_changes_only_the_touched_chunk() -> None:
    a, b = trained_backend(), trained_backend()
    ha, body_a = encode_shard(UID, FP, a.state_dict(), CHUNK)
    hb, _ = encode_shard(UID, FP, b.state_dict(), CHUNK)
    assert ha.raw == hb.raw and ha.root == hb.root
    reordered = dict(reversed(list(a.state_dict().items())))  # key order does not matter
    assert encode_shard(UID, FP, reordered, CHUNK)[0].root == ha.root
    with torch.no_grad():
        b.module.fc2.weight[3, 5] += 1.0
    hc, body_c = encode_shard(UID, FP, b.state_dict(), CHUNK)
    assert hc.root != ha.root and ha.num_chunks == hc.num_chunks > 3
    changed = [i for i in range(ha.num_chunks) if ha.chunk_hashes[i] != hc.chunk_hashes[i]]
    diff = [i for i in range(len(body_a)) if body_a[i] != body_c[i]]
    assert len(changed) == 1 and {d // CHUNK for d in diff} == set(changed)
    assert encode_shard("other", FP, a.state_dict(), CHUNK)[0].root != ha.root


@pytest.mark.parametrize(("nbytes", "chunks", "last"), [(0, 0, None), (2 * CHUNK, 2, CHUNK), (2 * CHUNK + 12, 3, 12)])
def test_chunking_edge_cases(nbytes: int, chunks: int, last: int | None) -> None:
    state = {"b": torch.arange(nbytes, dtype=torch.int64).to(torch.uint8), "updates_applied": 1}
    header, body = encode_shard(UID, FP, state, CHUNK)
    assert header.total_bytes == nbytes and header.num_chunks == chunks
    if chunks:
        assert header.chunk_span(chunks - 1) == (CHUNK * (chunks - 1), nbytes) and header.chunk_size(chunks - 1) == last
        for i in range(chunks):
            start, end = header.chunk_span(i)
            verify_chunk(header, i, body[start:end])
            verify_chunk(header, i, memoryview(body)[start:end])
    with pytest.raises(ShardFormatError):
        header.chunk_span(chunks)
    assert_same(state, decode_shard(header, body))


def test_verify_chunk_and_decode_reject_corruption() -> None:
    header, body = encode_shard(UID, FP, trained_backend().state_dict(), CHUNK)
    start, end = header.chunk_span(2)
    bad = bytearray(body)
    bad[start + 17] ^= 0x40
    with pytest.raises(ShardHashError) as err:
        verify_chunk(header, 2, bytes(bad[start:end]))
    assert err.value.chunk == 2
    with pytest.raises(ShardFormatError, match="bytes, expected"):
        verify_chunk(header, 2, body[start : end - 1])
    for i in (-1, header.num_chunks, True, "0"):
        with pytest.raises(ShardFormatError):
            verify_chunk(header, i, body[:CHUNK])  # type: ignore[arg-type]
    with pytest.raises(ShardHashError) as err:
        decode_shard(header, bad)
    assert err.value.chunk == 2
    with pytest.raises(ShardFormatError, match="body has"):
        decode_shard(header, body + b"\0")


def rebuild(header: ShardHeader, **changes: Any) -> bytes:
    obj = msgpack.unpackb(header.raw, raw=False, strict_map_key=False)
    obj.update(changes)
    return msgpack.packb(obj, use_bin_type=True)


def ext(dtype: str, shape: list, offset: int, length: int) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([dtype, shape, offset, length]))


def test_hostile_headers_are_refused_with_typed_errors() -> None:
    state = {"a": torch.zeros(4, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.int64)}
    header, _ = encode_shard(UID, FP, state, CHUNK)  # a: [0, 16), b: [16, 32)
    hashes = list(header.chunk_hashes)
    with pytest.raises(ShardHashError) as err:
        parse_header(header.raw, root=b"\0" * 32)
    assert err.value.chunk is None
    with pytest.raises(ShardMismatchError, match=r"uid 't\.ffn\.0\.0', expected 'other'"):
        parse_header(header.raw, uid="other")
    with pytest.raises(ShardMismatchError, match="fingerprint 'fp-1', expected 'fp-2'"):
        parse_header(header.raw, fingerprint="fp-2")
    cases: list[tuple[bytes, str]] = [
        (b"\0" * (MAX_HEADER_BYTES + 1), "exceeds"),
        (b"\xc1", "not msgpack"),
        (msgpack.packb([1, 2]), "exactly the keys"),
        (rebuild(header, extra=1), "exactly the keys"),
        (rebuild(header, format=2), "format"),
        (rebuild(header, uid=b"x"), "uid"),
        (rebuild(header, version=-1), "version"),
        (rebuild(header, version=True), "version"),
        (rebuild(header, total_bytes=17 << 30), "total_bytes"),
        (rebuild(header, chunk_bytes=1024), "chunk_bytes"),
        (rebuild(header, chunk_hashes=[*hashes, b"\0" * 32]), "list of 1 hashes"),
        (rebuild(header, chunk_hashes=[b"\0" * 31]), "32 bytes"),
        (rebuild(header, tree=[]), "tree must be a map"),
        (rebuild(header, tree={"a": ext("float32", [4], 0, 16), "b": ext("int64", [2], 8, 16)}), "overlaps"),
        (rebuild(header, tree={"a": ext("float32", [4], 0, 16), "b": ext("int64", [1], 24, 8)}), "gap"),
        (rebuild(header, tree={"a": ext("float32", [4], 0, 16)}), "cover 16 bytes"),
        (rebuild(header, tree={"a": ext("complex64", [2], 0, 16), "b": ext("int64", [2], 16, 16)}), "dtype"),
        (rebuild(header, tree={"a": ext("float32", [-4], 0, 16), "b": ext("int64", [2], 16, 16)}), "shape"),
        (rebuild(header, tree={"a": ext("float32", [1] * 9, 0, 4)}), "shape"),
        (rebuild(header, tree={"a": ext("float32", [0, 2**64 - 1], 0, 0), "b": ext("int64", [4], 0, 32)}), "too large"),
        (rebuild(header, tree={"a": ext("float32", [3], 0, 16), "b": ext("int64", [2], 16, 16)}), "numel"),
        (rebuild(header, tree={"a": ext("float32", [4], 0, 16), "b": ext("int64", [2], 16, 17)}), "length"),
        (rebuild(header, tree={"a": msgpack.ExtType(5, b"")}), "ext type"),
        (rebuild(header, tree={"a": b"bytes"}), "type bytes"),
        (rebuild(header, tree={1.5: 1}), "key"),
        (rebuild(header, tree={"a": [[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]]}), "deeper"),
        (rebuild(header, tree={"a": [0] * 70000}), "container items"),
    ]
    for raw, match in cases:
        with pytest.raises(ShardFormatError, match=match):
            parse_header(raw)
    many = rebuild(header, total_bytes=0, chunk_hashes=[], tree={"a": [ext("uint8", [0], 0, 0)] * 65537})
    assert len(many) < MAX_HEADER_BYTES
    with pytest.raises(ShardFormatError, match="container items"):  # also bounds the tensor count
        parse_header(many)
    with pytest.raises(ShardFormatError, match="total_bytes"):
        parse_header(header.raw, max_total_bytes=31)


def test_fuzzed_headers_only_raise_shard_errors() -> None:
    rng = random.Random(1234)
    for state in (trained_backend(steps=1).state_dict(), mixed_state()):
        header, body = encode_shard(UID, FP, state, CHUNK)
        accepted = 0
        for _ in range(300):
            data = bytearray(header.raw)
            kind = rng.randrange(3)
            if kind == 0:  # flip bytes
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind == 1:  # truncate
                data = data[: rng.randrange(len(data))]
            else:  # insert
                pos = rng.randrange(len(data))
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            try:
                parsed = parse_header(bytes(data))
            except ShardError:
                continue
            accepted += 1  # e.g. a flip inside a float or a hash: decoding must fail typed or succeed
            try:
                decode_shard(parsed, body)
            except ShardError:
                pass
        assert accepted < 150


def test_encode_refuses_what_a_shard_cannot_hold() -> None:
    with pytest.raises(ShardFormatError, match="complex64"):
        encode_shard(UID, FP, {"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ShardFormatError, match="map key"):
        encode_shard(UID, FP, {"x": {(1, 2): 0}})
    with pytest.raises(ShardFormatError, match="type object"):
        encode_shard(UID, FP, {"x": object()})
    with pytest.raises(ShardFormatError, match="chunk_bytes"):
        encode_shard(UID, FP, {}, chunk_bytes=100)
    with pytest.raises(ShardFormatError, match="updates_applied"):
        encode_shard(UID, FP, {"updates_applied": -1})
