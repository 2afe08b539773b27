"""``RequestBudget``: the node's ``max_queued_bytes``, the payload bytes of requests it holds
between admission and reply, with the typed refusals a trainer gets when it is spent.

A request larger than the whole budget is ``too_large`` (it can never fit: split it); one
that does not fit now is ``overloaded`` (retry later or elsewhere). Thread-safe: frontends
reserve while reading, replies release from whichever thread answers.
"""

from __future__ import annotations

from volunteer.net.byte_budget import ByteBudget
from volunteer.wire.errors import OverloadedError, RemoteError, TooLargeError


class RequestBudget(ByteBudget):
    """``ByteBudget`` over request payload bytes, answering refusals as typed errors."""

    def reserve(self, nbytes: int) -> RemoteError | None:
        """Take ``nbytes``; None on success, else why not (``TooLargeError``/``OverloadedError``)."""
        if nbytes > self.capacity:
            return TooLargeError(
                f"request of {nbytes} bytes > this node's max_queued_bytes {self.capacity}"
            )
        if self.try_reserve(nbytes):
            return None
        return OverloadedError(
            f"node holds {self.held} bytes of requests (max {self.capacity}); "
            "retry later or elsewhere"
        )

    def held_bytes(self) -> dict[str, int]:
        """Now, peak, bound and refusals (the runtime's ``held_bytes`` view)."""
        snap = self.snapshot()
        return {"held": snap["held"], "peak": snap["peak"], "max": snap["capacity"],
                "refused": snap["refused"]}
