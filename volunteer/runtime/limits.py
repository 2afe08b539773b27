"""``ServingLimits``: every bound a serving node enforces, defined once.

This frozen dataclass is the single definition of the serving limits: the manifest's
``serving`` section parses straight into it (``volunteer.manifest.validate``, one key per
field, the range given here), the runtime and its ZeroMQ frontend enforce it, and the libp2p
RPC server gets the same object through ``volunteer.net.service.NetworkService``, so every
frontend applies the same numbers. The message bounds (header bytes, tensors, elements,
bytes) take their defaults from ``volunteer.wire.limits.WireLimits``, the lowest layer,
which clients use without the runtime; ``wire()`` is the view the decoder needs.

Queue bounds keep memory flat under overload (beyond them a request is answered
"overloaded"); message bounds are checked before any tensor is allocated; the activation
cache is bounded by entries, bytes and age; ``max_grad_norm`` (off by default) refuses a
backward whose output gradient is larger, per sample, than the experiment allows.

Each field's ``metadata["range"]`` is the inclusive range of accepted values, checked here
for any construction and reported with the key path by the manifest loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from volunteer.wire.limits import MESSAGE_FIELDS, WireLimits

_WIRE = WireLimits()


def _limit(default: Any, lo: float, hi: float) -> Any:
    """A dataclass field with its default and inclusive ``range`` (see module docstring)."""
    return field(default=default, metadata={"range": (lo, hi)})


@dataclass(frozen=True)
class ServingLimits:
    """Runtime bounds. ``max_queue_size`` counts tasks per (expert, op) pool;
    ``max_queued_bytes`` bounds the tensor bytes held by all queued tasks together (and the
    bytes a network frontend may hold in flight); ``activation_cache_size`` 0 disables the
    cache; ``max_grad_norm`` None means no bound (see ``volunteer.runtime.validation``)."""

    max_batch_size: int = _limit(256, 1, 65536)
    max_queue_size: int = _limit(1024, 1, 2**20)
    max_header_bytes: int = _limit(_WIRE.max_header_bytes, 1, 2**24)
    max_tensors: int = _limit(_WIRE.max_tensors, 1, 256)
    max_elements: int = _limit(_WIRE.max_elements, 1, 2**31)
    max_bytes: int = _limit(_WIRE.max_bytes, 1, 2**33)
    max_queued_bytes: int = _limit(1024 * 2**20, 1, 2**40)
    activation_cache_size: int = _limit(64, 0, 2**20)
    activation_cache_bytes: int = _limit(1024 * 2**20, 0, 2**40)
    activation_cache_ttl_s: float = _limit(120.0, 0.001, 86400.0)
    default_ttl_s: float = _limit(60.0, 0.001, 86400.0)
    max_grad_norm: float | None = _limit(None, 1e-12, 1e12)

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = limit_problem(f.name, getattr(self, f.name))
            if problem is not None:
                raise ValueError(f"ServingLimits.{f.name}: {problem}")

    def wire(self) -> WireLimits:
        """The message bounds, for the wire decoder (every frontend decodes with these)."""
        return WireLimits(**{name: getattr(self, name) for name in MESSAGE_FIELDS})


LIMIT_FIELDS = {f.name: f for f in fields(ServingLimits)}
"""Field name -> dataclass field: the manifest's ``serving`` keys."""


def limit_range(name: str) -> tuple[float, float]:
    """The inclusive range accepted for the limit ``name``."""
    lo, hi = LIMIT_FIELDS[name].metadata["range"]
    return lo, hi


def is_integer_limit(name: str) -> bool:
    """True for limits counted in whole units (sizes, counts, bytes)."""
    return isinstance(LIMIT_FIELDS[name].default, int)


def limit_expectation(name: str) -> str:
    """What the limit ``name`` accepts, for error messages ("an integer in [1, 256]")."""
    lo, hi = limit_range(name)
    if is_integer_limit(name):
        text = f"an integer in [{int(lo)}, {int(hi)}]"
    else:
        text = f"a number in [{lo:g}, {hi:g}]"
    return text + (" or null (no bound)" if LIMIT_FIELDS[name].default is None else "")


def limit_problem(name: str, value: Any) -> str | None:
    """None when ``value`` is acceptable for the limit ``name``, else what was expected."""
    lo, hi = limit_range(name)
    if value is None and LIMIT_FIELDS[name].default is None:
        return None  # an optional bound left off
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif is_integer_limit(name):
        ok = isinstance(value, int) and lo <= value <= hi
    else:
        ok = math.isfinite(value) and lo <= value <= hi
    return None if ok else f"expected {limit_expectation(name)}, got {value!r}"
