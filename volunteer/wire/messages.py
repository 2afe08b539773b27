"""Request and reply messages: a msgpack header frame followed by one raw frame per tensor.

Header keys (protocol version 1):

- requests: ``v`` version, ``op`` ("forward" | "backward" | "info"), ``uid`` expert uid,
  ``id`` request id (uint64, echoed in the reply), ``ttl`` seconds the caller will wait
  (relative, so that clocks need not agree; the server turns it into a local deadline on
  arrival), ``t`` tensor specs (see ``tensors.py``), ``wb`` "will backward" (forward only:
  the server may cache activations), ``fid`` the forward's request id (backward only: the
  activation-cache key), ``c`` compression of the request's tensors and of the reply (one of
  ``volunteer.wire.COMPRESSIONS``: None | "fp16" | "bf16" | "int8"; see ``tensors.py``).
  A backward carries the forward's inputs followed by the gradients of the outputs.
- replies: ``v``, ``op`` ("result" | "error" | "info"), ``id``, then ``t`` (result; plus
  ``k`` true when the server cached the forward's graph for a backward),
  ``code`` + ``msg`` (error) or ``info`` (info).

Decoding checks the header size before unpacking, bounds msgpack containers, validates
every field's type, and raises ``BadRequestError`` / ``TooLargeError``; a decoding error
carries the request id (when it could be read) in ``.request_id`` so the reply can echo it.
``Request.wire_nbytes`` is the size of the message as received (header + tensor frames), what
the node counts as an expert's bytes in; :func:`frames_nbytes` measures a reply the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack
import torch

from volunteer.wire.errors import BadRequestError, RemoteError, TooLargeError, error_from_code
from volunteer.wire.limits import DEFAULT_LIMITS, WireLimits
from volunteer.wire.tensors import COMPRESSIONS, frames_to_tensors, tensor_to_frame

PROTOCOL_VERSION = 1
REQUEST_OPS = ("forward", "backward", "info")
REPLY_OPS = ("result", "error", "info")
MAX_UID_LEN = 256
MAX_MESSAGE_LEN = 2000
MAX_REQUEST_ID = 2**64 - 1

Frame = bytes | memoryview


@dataclass(slots=True)
class Request:
    """A decoded request; tensors wrap the received frames (no copy)."""

    op: str
    uid: str
    request_id: int
    ttl: float | None
    tensors: list[torch.Tensor] = field(default_factory=list)
    will_backward: bool = False
    forward_id: int | None = None
    compression: str | None = None
    inputs_included: bool = True
    wire_nbytes: int = 0  # the message's size as received: header + tensor frames
    # decoded with restore=False: per tensor, the dtype its sender had (None: as received)
    restores: list[torch.dtype | None] = field(default_factory=list)


@dataclass(slots=True)
class Reply:
    """A decoded reply (``op`` "result" or "info"; errors are raised instead)."""

    op: str
    request_id: int
    tensors: list[torch.Tensor] = field(default_factory=list)
    info: dict | None = None
    cached: bool = False


_packers = threading.local()


def frames_nbytes(frames: Sequence[Frame]) -> int:
    """Total bytes of a message's frames (header included), as they go on the wire."""
    return sum(f.nbytes if type(f) is memoryview else len(f) for f in frames)


def _pack(header: dict) -> bytes:
    # one Packer per thread: msgpack.packb builds (and mallocs a buffer for) a new one per call
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(header)


def _unpack_header(frame: Frame, limits: WireLimits) -> dict:
    size = memoryview(frame).nbytes
    if size > limits.max_header_bytes:
        raise TooLargeError(f"header of {size} bytes > {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_header_bytes,
            max_bin_len=limits.max_header_bytes,
            max_array_len=max(64, limits.max_tensors * 2),
            max_map_len=max(64, limits.max_tensors * 2),
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types on garbage; all mean the same here
        raise BadRequestError(f"header is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise BadRequestError("header must be a msgpack map")
    if header.get("v") != PROTOCOL_VERSION:
        raise BadRequestError(
            f"unsupported protocol version {header.get('v')!r}; this peer speaks {PROTOCOL_VERSION}"
        )
    return header


def _check_id(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_REQUEST_ID:
        raise BadRequestError(f"{what} must be an unsigned 64-bit int")
    return value


def encode_request(
    op: str,
    uid: str,
    tensors: Sequence[torch.Tensor] = (),
    *,
    request_id: int,
    timeout: float | None = None,
    will_backward: bool = False,
    forward_id: int | None = None,
    compression: str | None = None,
    inputs_included: bool = True,
) -> list[Frame]:
    """Frames of one request; tensors are sent zero-copy unless compressed (cast or
    quantised); "int8" raises ``NonFiniteError`` on NaN or infinite values."""
    if op not in REQUEST_OPS:
        raise ValueError(f"unknown op {op!r}")
    specs, bufs = [], []
    for t in tensors:
        spec, buf = tensor_to_frame(t, compression)
        specs.append(spec)
        bufs.append(buf)
    header: dict = {"v": PROTOCOL_VERSION, "op": op, "uid": uid, "id": request_id, "t": specs}
    if timeout is not None:
        header["ttl"] = float(timeout)
    if will_backward:
        header["wb"] = True
    if forward_id is not None:
        header["fid"] = forward_id
    if compression is not None:
        header["c"] = compression
    if not inputs_included:
        header["xi"] = False
    return [_pack(header), *bufs]


def decode_request(
    frames: Sequence[Frame], limits: WireLimits = DEFAULT_LIMITS, *, restore: bool = True
) -> Request:
    """Parse and validate a request; raises BadRequestError / TooLargeError. ``restore=False``:
    16-bit tensors stay in their wire dtype and ``Request.restores`` says what they were."""
    if not frames:
        raise BadRequestError("empty message")
    if len(frames) > limits.max_tensors + 1:
        raise TooLargeError(f"too many frames: {len(frames)} > {limits.max_tensors + 1}")
    header = _unpack_header(frames[0], limits)
    request_id = header.get("id")
    try:
        request_id = _check_id(request_id, "id")
        op = header.get("op")
        if op not in REQUEST_OPS:
            raise BadRequestError(f"unknown op {op!r}; expected one of {list(REQUEST_OPS)}")
        uid = header.get("uid", "")
        if not isinstance(uid, str) or len(uid) > MAX_UID_LEN:
            raise BadRequestError(f"uid must be a string of at most {MAX_UID_LEN} chars")
        ttl = header.get("ttl")
        if ttl is not None and (
            not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not ttl == ttl
        ):
            raise BadRequestError("ttl must be a number of seconds")
        fid = header.get("fid")
        if fid is not None:
            fid = _check_id(fid, "fid")
        compression = header.get("c")
        if compression not in COMPRESSIONS:
            raise BadRequestError(f"unknown compression {compression!r}")
        will_backward = header.get("wb", False)
        if not isinstance(will_backward, bool):
            raise BadRequestError("wb must be a bool")
        inputs_included = header.get("xi", True)
        if not isinstance(inputs_included, bool) or (
            not inputs_included and (op != "backward" or fid is None)
        ):
            raise BadRequestError(
                "xi must be a bool; inputs may be omitted only by a backward with fid"
            )
        restores: list[torch.dtype | None] = []
        tensors = frames_to_tensors(
            header.get("t", []), frames[1:], limits, restore=restore, restores=restores
        )
    except RemoteError as e:
        e.request_id = request_id if isinstance(request_id, int) else None  # type: ignore[attr-defined]
        raise
    return Request(
        op=op,
        uid=uid,
        request_id=request_id,
        ttl=float(ttl) if ttl is not None else None,
        tensors=tensors,
        will_backward=will_backward,
        forward_id=fid,
        compression=compression,
        inputs_included=inputs_included,
        wire_nbytes=frames_nbytes(frames),
        restores=restores,
    )


def encode_result(
    request_id: int,
    tensors: Sequence[torch.Tensor],
    compression: str | None = None,
    cached: bool = False,
    restore: Sequence[torch.dtype | None] | None = None,
) -> list[Frame]:
    """Frames of a successful reply (``cached``: the forward's graph is kept for a backward;
    ``restore``: per tensor, see ``tensor_to_frame``)."""
    specs, bufs = [], []
    for i, t in enumerate(tensors):
        spec, buf = tensor_to_frame(t, compression, restore[i] if restore else None)
        specs.append(spec)
        bufs.append(buf)
    header = {"v": PROTOCOL_VERSION, "op": "result", "id": request_id, "t": specs}
    if cached:
        header["k"] = True
    return [_pack(header), *bufs]


def encode_result_or_error(
    request_id: int,
    tensors: Sequence[torch.Tensor],
    compression: str | None = None,
    cached: bool = False,
    restore: Sequence[torch.dtype | None] | None = None,
) -> list[Frame] | RemoteError:
    """``encode_result``, or the typed error that encoding raised (an "int8" reply of NaN or
    infinite values is ``NonFiniteError``): a server answers that one request with the error
    instead of failing the whole batch it was computed in."""
    try:
        return encode_result(request_id, tensors, compression, cached, restore)
    except RemoteError as e:
        return e


def encode_error(request_id: int | None, code: str, message: str) -> list[Frame]:
    """Frames of an error reply; the message is truncated to MAX_MESSAGE_LEN chars."""
    rid = request_id if isinstance(request_id, int) and 0 <= request_id <= MAX_REQUEST_ID else 0
    header = {
        "v": PROTOCOL_VERSION,
        "op": "error",
        "id": rid,
        "code": code,
        "msg": str(message)[:MAX_MESSAGE_LEN],
    }
    return [_pack(header)]


def encode_info_reply(request_id: int, info: dict) -> list[Frame]:
    """Frames of an info reply (no tensors)."""
    return [_pack({"v": PROTOCOL_VERSION, "op": "info", "id": request_id, "info": info})]


def decode_reply(
    frames: Sequence[Frame], limits: WireLimits = DEFAULT_LIMITS, *, quantized: bool = True
) -> Reply:
    """Parse a reply; error replies are raised as their typed exception. ``quantized=False``
    refuses int8 tensors (``BadRequestError``)."""
    if not frames:
        raise BadRequestError("empty reply")
    if len(frames) > limits.max_tensors + 1:
        raise TooLargeError(f"too many frames in reply: {len(frames)}")
    header = _unpack_header(frames[0], limits)
    request_id = _check_id(header.get("id"), "id")
    op = header.get("op")
    if op == "error":
        code, msg = header.get("code"), header.get("msg", "")
        if not isinstance(code, str) or not isinstance(msg, str):
            raise BadRequestError("malformed error reply")
        err = error_from_code(code, msg)
        err.request_id = request_id  # type: ignore[attr-defined]
        raise err
    if op == "info":
        info = header.get("info")
        if not isinstance(info, dict):
            raise BadRequestError("malformed info reply")
        return Reply(op="info", request_id=request_id, info=info)
    if op != "result":
        raise BadRequestError(f"unknown reply op {op!r}")
    return Reply(
        op="result",
        request_id=request_id,
        tensors=frames_to_tensors(header.get("t", []), frames[1:], limits, quantized=quantized),
        cached=header.get("k") is True,
    )


def reply_request_id(frame: Frame, limits: WireLimits = DEFAULT_LIMITS) -> int | None:
    """The request id of a reply header, or None if unreadable (used to skip stale replies)."""
    try:
        return _check_id(_unpack_header(frame, limits).get("id"), "id")
    except RemoteError:
        return None
