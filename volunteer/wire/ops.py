"""The ``info`` op: ask a server which experts it hosts.

Reply payload: ``{uid: {"kind": str, "input_shapes": [[...]], "dtype": str,
"state": "serving" | "draining"}}`` (per-sample input shapes, without the batch dimension).
"""

from __future__ import annotations

from collections.abc import Sequence

from volunteer.wire.errors import BadRequestError
from volunteer.wire.limits import DEFAULT_LIMITS, WireLimits
from volunteer.wire.messages import Frame, decode_reply, encode_request

INFO_STATES = ("serving", "draining")


def encode_info_request(request_id: int = 0) -> list[Frame]:
    """Frames of an info request."""
    return encode_request("info", "", (), request_id=request_id)


def decode_info_reply(
    frames: Sequence[Frame], limits: WireLimits = DEFAULT_LIMITS
) -> dict[str, dict]:
    """The validated expert table of an info reply; typed errors for error replies/garbage."""
    reply = decode_reply(frames, limits)
    if reply.op != "info" or reply.info is None:
        raise BadRequestError("not an info reply")
    out: dict[str, dict] = {}
    for uid, entry in reply.info.items():
        if not isinstance(uid, str) or not isinstance(entry, dict):
            raise BadRequestError("malformed info entry")
        kind, shapes, dtype, state = (
            entry.get(k) for k in ("kind", "input_shapes", "dtype", "state")
        )
        if not isinstance(kind, str) or not isinstance(dtype, str) or state not in INFO_STATES:
            raise BadRequestError(f"malformed info entry for {uid!r}")
        if not isinstance(shapes, list) or not all(
            isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in s)
            for s in shapes
        ):
            raise BadRequestError(f"malformed input_shapes for {uid!r}")
        out[uid] = {"kind": kind, "input_shapes": shapes, "dtype": dtype, "state": state}
    return out
