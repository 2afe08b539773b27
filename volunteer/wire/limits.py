"""Hard limits applied when decoding any message, checked before anything is allocated.

``WireLimits`` is the part of the node's limits that the decoder needs, usable by clients
without the runtime. The *message* bounds are defined here once: the wire is the lowest
layer (``volunteer.runtime.limits.ServingLimits``, the one serving definition that the
manifest's ``serving`` section parses into, takes its message-bound defaults from
``WireLimits`` and hands the decoder ``ServingLimits.wire()``), so no number is typed twice.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class WireLimits:
    """Bounds on one message: header bytes, tensor count, total elements and total bytes."""

    max_header_bytes: int = 65536
    max_tensors: int = 16
    max_elements: int = 2**26
    max_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        for name in MESSAGE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"WireLimits.{name} must be a positive integer, got {value!r}")


MESSAGE_FIELDS = tuple(f.name for f in fields(WireLimits))
"""The message-bound field names (shared with ``ServingLimits``)."""
DEFAULT_LIMITS = WireLimits()
