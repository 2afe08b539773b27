"""A virtual clock for the swarm simulator: trio with ``MockClock(autojump_threshold=0)``.

The product's DHT code is trio code that waits with ``trio.sleep`` / ``move_on_after``
(query timeouts, lookup bounds). Run under a ``MockClock`` whose autojump threshold is 0,
virtual time jumps straight to the next deadline whenever every task is blocked, so an
hour of swarm time costs only the CPU of what happens in it, and a 3 s query timeout
costs nothing. ``run_virtual`` runs one async function that way; ``now`` is the virtual
time inside it (seconds; only differences mean anything).

Deterministic draws: trio shuffles the order in which ready tasks run, so the simulator
never draws random numbers in task order. Every random choice that tasks make (a link's
RTT, whether a query is lost) is a pure function of the seed and of *what* is drawn
(``unit(seed, ...)``: a hash), the same whatever order the tasks ran in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from statistics import NormalDist
from typing import Any, TypeVar

import trio
import trio.testing

T = TypeVar("T")
_NORMAL = NormalDist()


def run_virtual(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``fn(*args)`` under trio with a virtual clock that jumps whenever all tasks wait."""
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def now() -> float:
    """The current (virtual, under ``run_virtual``) trio time in seconds."""
    return trio.current_time()


def unit(seed: int, *parts: object) -> float:
    """A uniform number in (0, 1) that depends only on ``seed`` and ``parts`` (their repr)."""
    h = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return (int.from_bytes(h, "big") + 0.5) / 2.0**64


def normal(seed: int, *parts: object) -> float:
    """A standard normal draw that depends only on ``seed`` and ``parts``."""
    return _NORMAL.inv_cdf(unit(seed, *parts))
