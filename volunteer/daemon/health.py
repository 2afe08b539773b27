"""Node health: a level and a one-line "why" for the dashboard, from recent counters.

``HealthTracker`` is fed the runtime's per-expert stats on every supervisor tick and keeps a
short window of totals; ``assess`` is a pure function of that window and the node state, so
the rules are unit-tested without a daemon:

- starting / draining: say so;
- degraded: a checkpoint failed, the peer network is unwell (no peer reached, announce
  failing: ``volunteer.daemon.network.network_problem``), queues are near their bound, or
  more than 10% of recent requests failed (naming the most common error code);
- idle: no request for ``idle_after_s`` (and who is expected to send work);
- ok otherwise.

A paused node's health is "paused" with the pause's reason (set over ``assess``'s answer by
``volunteer.daemon.snapshot.paused_view``, which also shows its state as "paused").
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from volunteer.status.fmt import duration

IGNORED_ERRORS = ("draining",)  # refusals we cause ourselves while leaving


@dataclass(frozen=True)
class Sample:
    at: float
    requests: int
    errors: dict[str, int]


def totals(experts: Mapping[str, Mapping[str, Any]]) -> tuple[int, dict[str, int]]:
    """Sum requests and errors by code over all experts' stats."""
    requests = 0
    errors: dict[str, int] = {}
    for stats in experts.values():
        requests += int(stats.get("requests", 0) or 0)
        for code, count in (stats.get("errors") or {}).items():
            errors[code] = errors.get(code, 0) + int(count or 0)
    return requests, errors


class HealthTracker:
    """Keeps ``window_s`` seconds of totals and the time of the last request."""

    def __init__(self, window_s: float = 30.0, clock: Any = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._samples: deque[Sample] = deque()
        self._started = clock()
        self.last_activity: float | None = None

    def observe(self, experts: Mapping[str, Mapping[str, Any]]) -> None:
        now = self._clock()
        requests, errors = totals(experts)
        if self._samples and requests != self._samples[-1].requests:
            self.last_activity = now
        self._samples.append(Sample(now, requests, errors))
        while len(self._samples) > 2 and now - self._samples[1].at >= self.window_s:
            self._samples.popleft()

    def recent(self) -> tuple[int, dict[str, int]]:
        """Requests and errors by code within the window."""
        if len(self._samples) < 2:
            return 0, {}
        first, last = self._samples[0], self._samples[-1]
        errors = {c: n - first.errors.get(c, 0) for c, n in last.errors.items() if n - first.errors.get(c, 0) > 0}
        return last.requests - first.requests, errors

    def idle_for(self) -> float:
        since = self.last_activity if self.last_activity is not None else self._started
        return self._clock() - since


def assess(
    state: str,
    recent_requests: int,
    recent_errors: Mapping[str, int],
    idle_for_s: float,
    queue_fill: float,
    checkpoint_error: str | None,
    endpoint: str | None,
    idle_after_s: float = 60.0,
    network_problem: str | None = None,
) -> tuple[str, str | None]:
    """Return ``(level, why)``; level is starting|draining|degraded|idle|ok."""
    if state == "starting":
        return "starting", "loading experts and checkpoints"
    if state in ("draining", "stopped"):
        return "draining", "leaving: refusing new work, finishing in-flight requests, then checkpointing"
    if checkpoint_error:
        return "degraded", f"last checkpoint failed: {checkpoint_error}"
    if network_problem:
        return "degraded", f"network: {network_problem}"
    if queue_fill >= 0.8:
        return "degraded", f"overloaded: task queues are {queue_fill:.0%} full, trainers get 'overloaded' replies"
    failures = {c: n for c, n in recent_errors.items() if c not in IGNORED_ERRORS}
    failed = sum(failures.values())
    if failed and failed > 0.1 * max(1, recent_requests):
        code = max(failures, key=lambda c: failures[c])
        return "degraded", f"{failed} of {recent_requests} recent requests failed (mostly {code!r}); see the log"
    if idle_for_s >= idle_after_s:
        where = f" at {endpoint}" if endpoint else ""
        return "idle", f"no trainer has sent work for {duration(idle_for_s)} (trainers reach this node{where})"
    return "ok", None
