"""Averaging messages on the wire: one ``Exchange`` request, one answer (tensors or a refusal).

Both sides of ``/volunteer/averaging/1.0.0`` (a trainer's ``ClientNode``, a volunteer
daemon's ``NetworkService``) speak this; the stream envelope is the expert RPC's
(``volunteer.net.stream_io``: call id + length-prefixed frames), so this module only turns
frames into values and back. No pickle: a msgpack header frame, then one raw frame per
tensor (``volunteer.wire.tensors``).

Request header (``op`` "exchange", version ``v`` 1): ``g`` group name (the experiment-scoped
name the server dispatches on), ``k`` kind (``group.KINDS``), ``r`` round, ``a`` alpha,
``t`` tensor specs, ``c`` compression of the tensors (``AVERAGING_COMPRESSIONS``: None |
"fp16" | "bf16"; the server answers with the same). Answers reuse the expert RPC's reply messages (``volunteer.wire.messages``):
``encode_result`` for tensors and ``encode_error`` for a refusal, so the typed refusals that
``RpcServer`` sends by itself (``overloaded``, ``too_large``) decode here too.

What a peer's bytes can cost before they are refused: the header's size is checked against
``limits.max_header_bytes`` before it is unpacked, msgpack containers and strings are
bounded, every field's exact type and range is checked, and every tensor spec is checked
against the limits (count, elements, bytes, frame sizes) before a tensor is wrapped
(``frames_to_tensors``). Malformed -> ``BadRequestError``, oversized -> ``TooLargeError``,
NaN/inf in a decoded tensor -> ``NonFiniteError`` (a peer's non-finite parameters must
never be averaged into ours, in either direction).

``fp16`` / ``bf16``: float32 tensors travel as float16 / bfloat16 (half the bytes; ~3 / ~2
decimal digits) and come back as float32. A tensor whose magnitude would overflow the 16-bit
type travels uncompressed instead (each tensor's spec names its own wire dtype), so
compression never turns a finite parameter into inf.

No ``int8`` here: the wire's 8-bit blockwise quantisation is for activations and gradients,
whose error is one step's noise; averaged *parameters* would take its error (up to
absmax/254 per value) into the weights at every exchange. Encoders refuse it with a
``ValueError`` naming the allowed ones; decoders refuse an "int8" header or tensor spec with
``BadRequestError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import torch

from volunteer.client.averaging.group import KINDS, MAX_ROUND, Exchange
from volunteer.wire.errors import BadRequestError, NonFiniteError, RemoteError, TooLargeError
from volunteer.wire.limits import WireLimits
from volunteer.wire.messages import PROTOCOL_VERSION, decode_reply, encode_error
from volunteer.wire.tensors import COMPRESSIONS, frames_to_tensors, tensor_to_frame

PROTOCOL = "/volunteer/averaging/1.0.0"
WIRE_VERSION = 1
MAX_GROUP_LEN = 200
FP16_MAX = 65504.0
BF16_MAX = 3.3895313892515355e38  # larger float32 values round to inf in bfloat16
_HALF_MAX = {"fp16": FP16_MAX, "bf16": BF16_MAX}
AVERAGING_COMPRESSIONS = tuple(c for c in COMPRESSIONS if c != "int8")

# Parameter tensors, not activations: many tensors per message (one per parameter), up to
# 128 Mi elements / 512 MiB in total. The stream reader checks the frame count and total
# size against these before reading a body; the decoder checks them again per spec.
AVERAGING_LIMITS = WireLimits(max_header_bytes=1 << 18, max_tensors=1024,
                              max_elements=2**27, max_bytes=512 * 2**20)

Frame = bytes | bytearray | memoryview  # frames out are memoryviews of the tensors


@dataclass(frozen=True)
class ExchangeMessage:
    """A decoded request: the group it is for, the exchange, and the compression the
    sender used (and so wants its answer in)."""

    group: str
    exchange: Exchange
    compression: str | None


def _frames(tensors: Sequence[torch.Tensor], compression: str | None) -> tuple[list, list]:
    """Specs and zero-copy buffers; with fp16/bf16, tensors that would overflow go as they are."""
    if compression not in AVERAGING_COMPRESSIONS:
        why = " (int8 is for activations and gradients, not parameters)" if compression == "int8" else ""
        raise ValueError(f"averaging compression {compression!r} not supported{why}; use one of "
                         f"{AVERAGING_COMPRESSIONS}")
    limit = _HALF_MAX.get(compression) if compression is not None else None
    specs, bufs = [], []
    for t in tensors:
        c = compression
        if (limit is not None and t.dtype == torch.float32 and t.numel()
                and float(t.detach().abs().max()) > limit):
            c = None
        spec, buf = tensor_to_frame(t, c)
        specs.append(spec)
        bufs.append(buf)
    return specs, bufs


def encode_exchange(group: str, request: Exchange,
                    compression: str | None = None) -> list[Frame]:
    """Frames of one exchange request (header + one frame per tensor, zero-copy)."""
    _check_group(group)
    specs, bufs = _frames(request.tensors, compression)
    header: dict = {"v": WIRE_VERSION, "op": "exchange", "g": group, "k": request.kind,
                    "r": request.round, "a": float(request.alpha), "t": specs}
    if compression is not None:
        header["c"] = compression
    return [msgpack.packb(header, use_bin_type=True), *bufs]


def decode_exchange_message(frames: Sequence[Frame],
                            limits: WireLimits = AVERAGING_LIMITS) -> ExchangeMessage:
    """Parse and validate a request (see the module docstring for what is checked)."""
    if not frames:
        raise BadRequestError("empty averaging message")
    if len(frames) > limits.max_tensors + 1:
        raise TooLargeError(f"too many frames: {len(frames)} > {limits.max_tensors + 1}")
    header = _unpack(frames[0], limits)
    if header.get("op") != "exchange":
        raise BadRequestError(f"unknown averaging op {header.get('op')!r}; expected 'exchange'")
    group = header.get("g")
    if not isinstance(group, str):
        raise BadRequestError("g (group) must be a string")
    _check_group(group, BadRequestError)
    kind = header.get("k")
    if type(kind) is not str or kind not in KINDS:
        raise BadRequestError(f"k (kind) must be one of {list(KINDS)}")
    rnd = header.get("r")
    if type(rnd) is not int or not 0 <= rnd <= MAX_ROUND:
        raise BadRequestError(f"r (round) must be an int in [0, {MAX_ROUND}]")
    alpha = header.get("a", 0.5)
    if type(alpha) not in (int, float) or not math.isfinite(alpha) or not 0.0 < alpha <= 1.0:
        raise BadRequestError("a (alpha) must be a number in (0, 1]")
    compression = header.get("c")
    if compression not in AVERAGING_COMPRESSIONS:
        raise BadRequestError(f"averaging compression {compression!r} not supported; use one of "
                              f"{AVERAGING_COMPRESSIONS}")
    tensors = frames_to_tensors(header.get("t", []), frames[1:], limits, quantized=False)
    check_finite(tensors)
    return ExchangeMessage(group, Exchange(kind=kind, round=rnd, tensors=tensors,
                                           alpha=float(alpha)), compression)


def decode_exchange(frames: Sequence[Frame],
                    limits: WireLimits = AVERAGING_LIMITS) -> tuple[str, Exchange]:
    """``(group, exchange)`` of a request; raises BadRequestError / TooLargeError /
    NonFiniteError (all before anything large is allocated, except the finiteness check,
    which needs the tensors)."""
    msg = decode_exchange_message(frames, limits)
    return msg.group, msg.exchange


def encode_answer(tensors: Sequence[torch.Tensor],
                  compression: str | None = None) -> list[Frame]:
    """Frames of a successful answer: the layout of ``messages.encode_result`` (request id 0),
    with fp16/bf16 applied per tensor as in requests."""
    specs, bufs = _frames(tensors, compression)
    header = {"v": PROTOCOL_VERSION, "op": "result", "id": 0, "t": specs}
    return [msgpack.packb(header, use_bin_type=True), *bufs]


def encode_refusal(error: RemoteError) -> list[Frame]:
    """Frames of a typed refusal (what ``RpcServer`` sends for its own refusals too)."""
    return list(encode_error(None, error.code, error.message))


def decode_answer(frames: Sequence[Frame],
                  limits: WireLimits = AVERAGING_LIMITS) -> list[torch.Tensor]:
    """The answer's tensors; a refusal raises its typed ``RemoteError``, a malformed answer
    ``BadRequestError``/``TooLargeError``, NaN/inf ``NonFiniteError``."""
    if frames and memoryview(frames[0]).nbytes > limits.max_header_bytes:
        raise TooLargeError(f"answer header of {memoryview(frames[0]).nbytes} bytes > "
                            f"{limits.max_header_bytes}")
    reply = decode_reply(frames, limits, quantized=False)
    if reply.op != "result":
        raise BadRequestError(f"unexpected answer op {reply.op!r}")
    check_finite(reply.tensors)
    return reply.tensors


def check_finite(tensors: Sequence[torch.Tensor]) -> None:
    """NonFiniteError if any tensor holds NaN or inf."""
    for i, t in enumerate(tensors):
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"tensor {i} holds NaN or inf")


def _check_group(group: str, error: type[Exception] = ValueError) -> None:
    if not group or len(group) > MAX_GROUP_LEN or not group.isprintable():
        raise error(f"group name must be 1..{MAX_GROUP_LEN} printable characters")


def _unpack(frame: Frame, limits: WireLimits) -> dict:
    """The header map, with its size checked before unpacking and containers bounded."""
    size = memoryview(frame).nbytes
    if size > limits.max_header_bytes:
        raise TooLargeError(f"header of {size} bytes > {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True,
                                 max_str_len=limits.max_header_bytes,
                                 max_bin_len=0, max_ext_len=0,
                                 max_array_len=max(16, 2 * limits.max_tensors),
                                 max_map_len=16)
    except Exception as e:  # msgpack raises many types on garbage; all mean the same here
        raise BadRequestError(f"header is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise BadRequestError("header must be a msgpack map")
    if header.get("v") != WIRE_VERSION:
        raise BadRequestError(f"unsupported averaging wire version {header.get('v')!r}; "
                              f"this peer speaks {WIRE_VERSION}")
    return header
