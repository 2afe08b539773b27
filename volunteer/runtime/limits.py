"""``ServingLimits``: every bound the runtime enforces, in one place.

Queue bounds keep memory flat under overload (beyond them a request is answered
"overloaded"); message bounds are checked before any tensor is allocated; the activation
cache is bounded by entries, bytes and age.
"""

from __future__ import annotations

from dataclasses import dataclass

from volunteer.wire.limits import WireLimits


@dataclass(frozen=True)
class ServingLimits:
    """Runtime bounds. ``max_queue_size`` counts tasks per (expert, op) pool;
    ``max_queued_bytes`` bounds the tensor bytes held by all queued tasks together."""

    max_batch_size: int = 256
    max_queue_size: int = 1024
    max_header_bytes: int = 65536
    max_tensors: int = 16
    max_elements: int = 2**26
    max_bytes: int = 256 * 2**20
    max_queued_bytes: int = 1024 * 2**20
    activation_cache_size: int = 64
    activation_cache_bytes: int = 1024 * 2**20
    activation_cache_ttl_s: float = 120.0
    default_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_queue_size",
            "max_header_bytes",
            "max_tensors",
            "max_elements",
            "max_bytes",
            "max_queued_bytes",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ServingLimits.{name} must be positive")
        if self.activation_cache_size < 0 or self.activation_cache_bytes < 0:
            raise ValueError("activation cache bounds must be >= 0 (0 disables the cache)")

    def wire(self) -> WireLimits:
        """The message bounds, for the wire decoder."""
        return WireLimits(
            max_header_bytes=self.max_header_bytes,
            max_tensors=self.max_tensors,
            max_elements=self.max_elements,
            max_bytes=self.max_bytes,
        )
