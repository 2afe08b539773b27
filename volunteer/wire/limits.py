"""Hard limits applied when decoding any message, checked before anything is allocated.

The same numbers appear in ``volunteer.runtime.limits.ServingLimits`` (which a server
configures); ``WireLimits`` is the part the decoder needs, usable by clients too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WireLimits:
    """Bounds on one message: header bytes, tensor count, total elements and total bytes."""

    max_header_bytes: int = 65536
    max_tensors: int = 16
    max_elements: int = 2**26
    max_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_tensors", "max_elements", "max_bytes"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"WireLimits.{name} must be positive")


DEFAULT_LIMITS = WireLimits()
