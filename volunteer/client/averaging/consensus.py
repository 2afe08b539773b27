"""``finish``: a trainer leaving a run first agrees on one copy with the members still here.

Gossip keeps copies *close*, never equal: between two pulls every member takes its own
steps, and members finish at different times (the last one trains on alone for a few steps,
aiming its pulls at members that already left). Measured in experiment 4 (four trainers,
one killed, elastic gossip every step): survivors ended 0.04 and 0.11 apart (relative L2).
A researcher who stops a run wants one model, so ``finish`` ends it with a consensus:

- The finishing member takes no more local steps; peers' updates are applied at once
  (``Averager.begin_finish``).
- It sweeps over the live members in a random order, one ``consensus`` exchange with each:
  a symmetric pull to the midpoint (alpha 1/2 on both sides), so a pair that exchanges
  while both are finishing ends bit-for-bit equal, and three or more converge
  geometrically, sweep by sweep.
- It stops after a sweep in which every exchange that succeeded found the two copies
  within ``tol`` before pulling, and at least one succeeded; or when no member is left
  (a member that is gone is shunned by the averager and drops out of the sweep); or at
  ``timeout``, whichever comes first. A member still training makes its copy move between
  sweeps, so a finishing member waits for it (bounded by ``timeout``), pausing ``pause``
  seconds between sweeps so that a training member is not flooded.

``finish`` never raises a peer's fault and never runs longer than ``timeout`` plus one
exchange's timeout. Its report says how it ended, for the trainer's summary.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from volunteer.client.averaging.averager import Averager

FINISH_TIMEOUT_S = 60.0
FINISH_TOL = 1e-3
SWEEP_PAUSE_S = 0.3


@dataclass
class FinishReport:
    """How ``finish`` ended: ``agreed`` (a quiet sweep), ``alone`` (no member left),
    ``timeout``; the sweeps and exchanges it ran; the largest divergence its last sweep saw
    before pulling (None when no exchange succeeded); its duration.

    Fields: ``ended``, ``sweeps``, ``exchanges_ok``, ``exchanges_failed``,
    ``last_divergence``, ``duration_s``."""

    ended: str
    sweeps: int
    exchanges_ok: int
    exchanges_failed: int
    last_divergence: float | None
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dict."""
        return asdict(self)


def finish(averager: Averager, step: int, *, timeout: float = FINISH_TIMEOUT_S,
           tol: float = FINISH_TOL, pause: float = SWEEP_PAUSE_S,
           seed: int | None = None) -> FinishReport:
    """Agree on one copy with the live members before leaving (see the module docstring).

    ``averager``: this member's ``Averager`` (no local step may follow); ``step`` is the
    caller's last step (sent as the exchanges' round); ``timeout``: the longest it runs, in
    seconds; ``tol``: the divergence below which a sweep counts as quiet (agreement);
    ``pause``: seconds between sweeps; ``seed``: seeds the order members are visited in.
    ``CollaborativeOptimizer.finish`` calls this."""
    if not timeout > 0 or not tol >= 0 or not pause >= 0:
        raise ValueError("timeout must be > 0, tol and pause >= 0")
    rng = random.Random(seed)
    start = time.monotonic()
    deadline = start + timeout
    averager.begin_finish()
    sweeps = ok = failed = 0
    worst: float | None = None
    ended = "timeout"
    while time.monotonic() < deadline:
        averager.apply_pending()
        members = averager.members_to_average()
        if not members:
            ended = "alone"
            break
        rng.shuffle(members)
        sweeps += 1
        worst, quiet, any_ok = None, True, False
        for peer in members:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            div = averager.pull(peer, "consensus", step, 0.5,
                                min(averager.config.timeout, left))
            averager.apply_pending()
            if div is None:
                failed += 1
                continue
            ok += 1
            any_ok = True
            worst = div if worst is None else max(worst, div)
            quiet = quiet and div <= tol
        if quiet and any_ok:
            ended = "agreed"
            break
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
    return FinishReport(ended, sweeps, ok, failed, worst, round(time.monotonic() - start, 3))
