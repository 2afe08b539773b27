"""Expert *shards*: an expert's state as hashed chunks that any holder can serve, without pickle.

A shard is a *header* plus a *body*:

- The body is the raw bytes of every tensor of the state (``ExpertBackend.state_dict()``:
  module weights, optimizer state, ``updates_applied``), each tensor contiguous, CPU,
  little-endian, concatenated in the order of the header's tree walk.
- The header is one msgpack map ``{"format", "uid", "fingerprint", "version", "total_bytes",
  "chunk_bytes", "chunk_hashes", "tree"}``: ``version`` is ``updates_applied``,
  ``chunk_hashes`` the sha256 of every fixed-size ``chunk_bytes`` chunk of the body (the last
  one may be shorter; an empty body has none), and ``tree`` the state's structure with each
  tensor replaced by a msgpack ExtType (code ``TENSOR_EXT``) holding ``[dtype, shape, offset,
  length]`` in the body. Containers are maps with str or int keys (int keys stay ints:
  optimizer ``state``) and lists (tuples such as Adam's betas become lists, which torch's
  ``load_state_dict`` accepts); scalars are int, float, bool, None and str.
- The *root* is ``sha256(header)``; the header holds every chunk hash, so the root commits
  to the whole shard: knowing the root (from a signed announcement), a downloader fetches the
  header, then each chunk from any holder, verifying each on arrival, BitTorrent-style.

Encoding is deterministic (map keys sorted: ints, then strs; no timestamps; floats always
float64), so two volunteers holding bitwise-equal states announce the same root, and a state
decoded, loaded and re-encoded hashes the same. Everything received is hostile:
``parse_header`` bounds the header size, every field's exact type, the tree's depth and size,
every tensor reference (allowed dtype, shape, span inside the body; spans tile the body
exactly) before anything is allocated, and ``decode_shard`` checks the body length and every
chunk hash before building a single tensor. Bad input only ever raises ``ShardError``
subclasses. bfloat16 has no numpy dtype, so bytes move through ``tensor.view(torch.uint8)``.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import numpy as np
import torch

SHARD_FORMAT = 1
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 64 << 20
MAX_HEADER_BYTES = 1 << 20
MAX_SHARD_BYTES = 16 << 30
MAX_TREE_DEPTH = 16
MAX_TENSORS = 65536
MAX_CONTAINER_ITEMS = 65536
MAX_NDIM = 8
MAX_EXTENT = 1 << 40  # product of a shape's dims, zeros counted as 1
MAX_NAME_CHARS = 1024  # uid and fingerprint
TENSOR_EXT = 1
HASH_BYTES = 32

_DTYPE_LIST = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in _DTYPE_LIST}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_HEADER_KEYS = frozenset(
    ("format", "uid", "fingerprint", "version", "total_bytes", "chunk_bytes", "chunk_hashes", "tree")
)

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("volunteer.experts.shard needs a little-endian host")


class ShardError(Exception):
    """A shard (header, chunk or body) that cannot be used."""


class ShardFormatError(ShardError):
    """Undecodable, out of bounds or of the wrong type."""


class ShardHashError(ShardError):
    """A chunk (``chunk`` = its index) or the header (``chunk`` = None) does not match its hash."""

    def __init__(self, message: str, chunk: int | None = None) -> None:
        super().__init__(message)
        self.chunk = chunk


class ShardMismatchError(ShardError):
    """A well-formed shard of another expert uid or another manifest fingerprint."""

    def __init__(self, field_name: str, found: str, expected: str) -> None:
        super().__init__(f"shard is for {field_name} {found!r}, expected {expected!r}")
        self.field = field_name
        self.found = found
        self.expected = expected


class TensorRef(NamedTuple):
    """Where one tensor of the tree lies in the body."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True, repr=False)
class ShardHeader:
    """A parsed, validated header; ``raw`` is what was hashed into ``root``."""

    raw: bytes
    root: bytes
    uid: str
    fingerprint: str
    version: int
    total_bytes: int
    chunk_bytes: int
    chunk_hashes: tuple[bytes, ...]
    tree: Any = field(compare=False)  # the state's structure, tensors as TensorRef

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_hashes)

    def chunk_span(self, i: int) -> tuple[int, int]:
        """``[start, end)`` of chunk ``i`` in the body; ShardFormatError for a bad index."""
        if type(i) is not int or not 0 <= i < len(self.chunk_hashes):
            raise ShardFormatError(f"chunk index {i!r} out of range (shard has {self.num_chunks} chunks)")
        start = i * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.total_bytes)

    def chunk_size(self, i: int) -> int:
        start, end = self.chunk_span(i)
        return end - start

    @property
    def root_hex(self) -> str:
        return self.root.hex()

    def __repr__(self) -> str:
        return (
            f"ShardHeader(root={self.root_hex[:16]}, uid={self.uid!r}, version={self.version}, "
            f"total_bytes={self.total_bytes}, chunks={self.num_chunks})"
        )


def _sort_key(key: int | str) -> tuple[int, int | str]:
    return (0, key) if type(key) is int else (1, key)


def _encode_tree(obj: Any, tensors: list[torch.Tensor], offset: list[int]) -> Any:
    """The msgpack-ready tree of ``obj``; appends tensors (contiguous CPU) in walk order."""
    if isinstance(obj, torch.Tensor):
        name = DTYPE_NAMES.get(obj.dtype)
        if name is None or obj.layout != torch.strided:
            raise ShardFormatError(f"cannot encode a {obj.dtype} {obj.layout} tensor; use one of {sorted(DTYPES)}")
        t = obj.detach().to("cpu").contiguous()
        length = t.numel() * t.element_size()
        ref = [name, list(t.shape), offset[0], length]
        offset[0] += length
        tensors.append(t)
        return msgpack.ExtType(TENSOR_EXT, msgpack.packb(ref, use_bin_type=True))
    if isinstance(obj, Mapping):
        for k in obj:
            if type(k) not in (int, str):
                raise ShardFormatError(f"cannot encode a map key of type {type(k).__name__}: {k!r}")
        return {k: _encode_tree(obj[k], tensors, offset) for k in sorted(obj, key=_sort_key)}
    if isinstance(obj, (list, tuple)):
        return [_encode_tree(v, tensors, offset) for v in obj]
    if obj is None or type(obj) in (bool, str):
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    raise ShardFormatError(f"cannot encode a value of type {type(obj).__name__}")


def _chunk_hashes(body: memoryview, chunk_bytes: int) -> list[bytes]:
    return [hashlib.sha256(body[s : s + chunk_bytes]).digest() for s in range(0, len(body), chunk_bytes)]


def encode_shard(
    uid: str, fingerprint: str, state: Mapping[str, Any], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[ShardHeader, bytes]:
    """The header and body of ``state``; ShardFormatError when it cannot be a shard."""
    if type(chunk_bytes) is not int or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ShardFormatError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {chunk_bytes!r}")
    version = state.get("updates_applied", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ShardFormatError(f"updates_applied must be an int >= 0, got {version!r}")
    tensors: list[torch.Tensor] = []
    tree = _encode_tree(state, tensors, [0])
    body = b"".join(memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in tensors if t.numel())
    header = {
        "format": SHARD_FORMAT,
        "uid": uid,
        "fingerprint": fingerprint,
        "version": int(version),
        "total_bytes": len(body),
        "chunk_bytes": chunk_bytes,
        "chunk_hashes": _chunk_hashes(memoryview(body), chunk_bytes),
        "tree": tree,
    }
    raw = msgpack.packb(header, use_bin_type=True)
    # re-parse our own output: whatever we announce, every peer's parse_header accepts
    return parse_header(raw, uid=uid, fingerprint=fingerprint), body


def _int(obj: Any, name: str, lo: int = 0, hi: int | None = None) -> int:
    if type(obj) is not int or obj < lo or (hi is not None and obj > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ShardFormatError(f"header field {name} must be an int {bound}, got {obj!r:.80}")
    return obj


def _str(obj: Any, name: str) -> str:
    if type(obj) is not str or len(obj) > MAX_NAME_CHARS:
        raise ShardFormatError(f"header field {name} must be a str of <= {MAX_NAME_CHARS} chars")
    return obj


class _TreeParser:
    """Validates the decoded tree; collects tensor refs and enforces the size bounds."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.refs: list[TensorRef] = []
        self.items = 0

    def parse(self, obj: Any, depth: int) -> Any:
        if obj is None or type(obj) in (bool, int, float, str):
            return obj
        if type(obj) is msgpack.ExtType:
            return self._tensor(obj)
        if type(obj) not in (dict, list):
            raise ShardFormatError(f"tree holds a value of type {type(obj).__name__}")
        if depth >= MAX_TREE_DEPTH:
            raise ShardFormatError(f"tree deeper than {MAX_TREE_DEPTH}")
        self.items += len(obj)
        if self.items > MAX_CONTAINER_ITEMS:
            raise ShardFormatError(f"tree has more than {MAX_CONTAINER_ITEMS} container items")
        if type(obj) is list:
            return [self.parse(v, depth + 1) for v in obj]
        out = {}
        for k, v in obj.items():
            if type(k) not in (int, str):
                raise ShardFormatError(f"tree map key of type {type(k).__name__}")
            out[k] = self.parse(v, depth + 1)
        return out

    def _tensor(self, ext: msgpack.ExtType) -> TensorRef:
        if ext.code != TENSOR_EXT or len(ext.data) > 256:
            raise ShardFormatError(f"tree holds an unknown ext type {ext.code} ({len(ext.data)} bytes)")
        if len(self.refs) >= MAX_TENSORS:
            raise ShardFormatError(f"more than {MAX_TENSORS} tensors")
        try:
            spec = msgpack.unpackb(ext.data, raw=False, use_list=True, strict_map_key=True)
        except Exception as exc:  # msgpack raises many types for malformed bytes
            raise ShardFormatError(f"undecodable tensor reference ({type(exc).__name__})") from None
        if type(spec) is not list or len(spec) != 4:
            raise ShardFormatError("tensor reference must be [dtype, shape, offset, length]")
        name, shape, offset, length = spec
        dtype = DTYPES.get(name) if type(name) is str else None
        if dtype is None:
            raise ShardFormatError(f"tensor dtype {name!r:.40} is not one of {sorted(DTYPES)}")
        if type(shape) is not list or len(shape) > MAX_NDIM or any(type(d) is not int or d < 0 for d in shape):
            raise ShardFormatError(f"tensor shape {shape!r:.80} must be a list of <= {MAX_NDIM} ints >= 0")
        offset = _int(offset, "tensor offset", 0, self.total_bytes)
        length = _int(length, "tensor length", 0, self.total_bytes - offset)
        numel, extent = 1, 1
        for d in shape:
            numel *= d
            extent *= max(d, 1)
        if extent > MAX_EXTENT:  # bounds empty tensors' dims too, e.g. [0, 2**64 - 1]
            raise ShardFormatError(f"tensor shape {shape!r:.80} is too large")
        if length != numel * dtype.itemsize:
            raise ShardFormatError(f"tensor length {length} != numel {numel} * itemsize {dtype.itemsize}")
        ref = TensorRef(name, tuple(shape), offset, length)
        self.refs.append(ref)
        return ref

    def check_tiling(self) -> None:
        pos = 0
        for ref in sorted(self.refs, key=lambda r: (r.offset, r.length)):
            if ref.offset != pos:
                what = "overlaps the previous one" if ref.offset < pos else "leaves a gap"
                raise ShardFormatError(f"tensor span at offset {ref.offset} {what} (expected offset {pos})")
            pos += ref.length
        if pos != self.total_bytes:
            raise ShardFormatError(f"tensors cover {pos} bytes, body has {self.total_bytes}")


def parse_header(
    raw: bytes,
    *,
    root: bytes | None = None,
    uid: str | None = None,
    fingerprint: str | None = None,
    max_total_bytes: int = MAX_SHARD_BYTES,
) -> ShardHeader:
    """Validate a header received from anyone; raises only ShardError subclasses."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ShardFormatError(f"header must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) > MAX_HEADER_BYTES:
        raise ShardFormatError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    digest = hashlib.sha256(raw).digest()
    if root is not None and digest != root:
        raise ShardHashError(f"header hashes to {digest.hex()}, expected root {bytes(root).hex()}", None)
    try:
        obj = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # msgpack raises many types (ExtraData, ValueError, TypeError, StackError...)
        raise ShardFormatError(f"header is not msgpack ({type(exc).__name__})") from None
    if type(obj) is not dict or set(obj) != _HEADER_KEYS:
        raise ShardFormatError(f"header must be a map with exactly the keys {sorted(_HEADER_KEYS)}")
    if obj["format"] != SHARD_FORMAT or type(obj["format"]) is not int:
        raise ShardFormatError(f"shard format {obj['format']!r:.40} is not {SHARD_FORMAT}")
    got_uid = _str(obj["uid"], "uid")
    got_fp = _str(obj["fingerprint"], "fingerprint")
    if uid is not None and got_uid != uid:
        raise ShardMismatchError("uid", got_uid, uid)
    if fingerprint is not None and got_fp != fingerprint:
        raise ShardMismatchError("fingerprint", got_fp, fingerprint)
    version = _int(obj["version"], "version")
    total = _int(obj["total_bytes"], "total_bytes", 0, max_total_bytes)
    chunk_bytes = _int(obj["chunk_bytes"], "chunk_bytes", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
    hashes = obj["chunk_hashes"]
    expected = -(-total // chunk_bytes)
    if type(hashes) is not list or len(hashes) != expected:
        raise ShardFormatError(f"chunk_hashes must be a list of {expected} hashes")
    if any(type(h) is not bytes or len(h) != HASH_BYTES for h in hashes):
        raise ShardFormatError(f"every chunk hash must be {HASH_BYTES} bytes")
    if type(obj["tree"]) is not dict:
        raise ShardFormatError("tree must be a map")
    parser = _TreeParser(total)
    tree = parser.parse(obj["tree"], 0)
    parser.check_tiling()
    return ShardHeader(raw, digest, got_uid, got_fp, version, total, chunk_bytes, tuple(hashes), tree)


def verify_chunk(header: ShardHeader, i: int, data: bytes | memoryview) -> None:
    """ShardHashError unless ``data`` is exactly chunk ``i``; ShardFormatError for a bad index/length."""
    size = header.chunk_size(i)
    try:
        view = memoryview(data)
        nbytes = view.nbytes
        digest = hashlib.sha256(view).digest() if nbytes == size else b""
    except (TypeError, ValueError, BufferError) as exc:
        raise ShardFormatError(f"chunk {i} is not a contiguous byte buffer ({exc})") from None
    if nbytes != size:
        raise ShardFormatError(f"chunk {i} has {nbytes} bytes, expected {size}")
    if digest != header.chunk_hashes[i]:
        raise ShardHashError(f"chunk {i} does not match its hash in shard {header.root_hex}", i)


def _build(obj: Any, body: memoryview) -> Any:
    if type(obj) is TensorRef:
        dtype = DTYPES[obj.dtype]
        out = torch.empty(obj.shape, dtype=dtype)
        if obj.length:
            dst = out.reshape(-1).view(torch.uint8)
            dst.numpy()[:] = np.frombuffer(body, dtype=np.uint8, count=obj.length, offset=obj.offset)
            if dtype == torch.bool:  # only 0/1 are valid bools: normalise any other byte
                dst.ne_(0)
        return out
    if type(obj) is dict:
        return {k: _build(v, body) for k, v in obj.items()}
    if type(obj) is list:
        return [_build(v, body) for v in obj]
    return obj


def decode_shard(header: ShardHeader, body: bytes | memoryview | bytearray) -> dict[str, Any]:
    """The state dict of a shard (fresh writable CPU tensors), after checking every chunk hash."""
    try:
        view = memoryview(body).cast("B")
    except (TypeError, ValueError, BufferError) as exc:
        raise ShardFormatError(f"body is not a contiguous byte buffer ({exc})") from None
    if len(view) != header.total_bytes:
        raise ShardFormatError(f"body has {len(view)} bytes, header says {header.total_bytes}")
    for i in range(header.num_chunks):
        start, end = header.chunk_span(i)
        verify_chunk(header, i, view[start:end])
    return _build(header.tree, view)
