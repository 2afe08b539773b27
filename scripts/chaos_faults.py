"""The chaos bench's fault schedule: every round, three volunteers each get one fault.

Round ``i`` (every ``round_s`` seconds) walks the volunteers ``v[i % n], v[(i+1) % n], ...``:

- the first one that is up is killed with SIGKILL and restarted at once in the same home
  (same identity, checkpoints and shards), bootstrapping from the other volunteers; at most
  ``max_down`` volunteers are coming back at a time (a kill is skipped, and counted, while
  that many restarts are still in progress: on a slow machine a restart can outlast a
  round, and killing the whole swarm measures nothing);
- the next one is SIGSTOPped for ``stop_s`` seconds (longer than the trainers' call
  timeout), then SIGCONTed;
- the next one's link loses ``loss_pct`` % of its packets each way for the round (when the
  lab can do loss; else this fault is skipped and the reason recorded).

Each kill records the victim's ``updates_applied`` just before it and, once the restarted
daemon serves again (a watcher thread polls it), how long that took and what it resumed from
its checkpoints (``resumed_from_updates``), so lost work is measured, not assumed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from chaos_swarm import Volunteer, serving_uids


@dataclass
class Restart:
    """One kill -9 and what came back."""

    name: str
    killed_at: float
    updates_before: dict[str, int]
    serving_after_s: float | None = None
    resumed_from: dict[str, int | None] = field(default_factory=dict)
    updates_after: dict[str, int] = field(default_factory=dict)
    weights_from: dict[str, str] = field(default_factory=dict)
    serving_uids: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        # what the uids it served before and serves again lost: their updates at the kill
        # minus what the restarted copy holds (from its checkpoint, or a newer replica's shard)
        rolled = [max(0, self.updates_before[u] - n) for u, n in self.updates_after.items()
                  if u in self.updates_before]
        return {"volunteer": self.name, "serving_after_s": self.serving_after_s,
                "came_back": self.serving_after_s is not None, "serving_uids": self.serving_uids,
                "resumed_from_checkpoint": sum(r is not None for r in self.resumed_from.values()),
                "weights_from": self.weights_from,
                "updates_rolled_back": sum(rolled) if rolled else None, "error": self.error}


def _updates(snap: dict[str, Any] | None) -> dict[str, int]:
    return {u: int(e.get("updates_applied") or 0) for u, e in ((snap or {}).get("experts") or {}).items()}


class FaultScheduler:
    """Applies the schedule in the module docstring; ``run`` blocks for the chaos phase."""

    def __init__(self, lab: Any, volunteers: list[Volunteer], round_s: float, stop_s: float,
                 loss_pct: float, restart_timeout: float, max_down: int = 1) -> None:
        self.lab, self.vols = lab, volunteers
        self.round_s, self.stop_s, self.loss_pct = round_s, stop_s, loss_pct
        self.restart_timeout = restart_timeout
        self.max_down = max_down
        self.kills_skipped = 0
        self.restarts: list[Restart] = []
        self.stops: list[dict[str, Any]] = []
        self.losses: list[dict[str, Any]] = []
        self.rounds = 0
        self.timeline: list[tuple[float, str, str]] = []  # (monotonic t, fault, volunteer)
        self._watchers: list[threading.Thread] = []

    def _coming_back(self) -> set[str]:
        return {r.name for r in self.restarts if r.serving_after_s is None and r.error is None}

    def _note(self, what: str, v: Volunteer) -> None:
        self.timeline.append((time.monotonic(), what, v.name))

    def _bootstrap_for(self, victim: Volunteer) -> list[str]:
        return [v.addr for v in self.vols if v is not victim and v.addr]

    def _kill(self, v: Volunteer) -> None:
        before = _updates(v.status(wait_s=1.0))
        rec = Restart(name=v.name, killed_at=time.monotonic(), updates_before=before)
        v.kill9()
        self._note("kill -9", v)
        v.start(self._bootstrap_for(v))
        self.restarts.append(rec)
        t = threading.Thread(target=self._watch, args=(v, rec), daemon=True)
        t.start()
        self._watchers.append(t)

    def _watch(self, v: Volunteer, rec: Restart) -> None:
        deadline = rec.killed_at + self.restart_timeout
        while time.monotonic() < deadline:
            if not v.alive():
                rec.error = f"exited with {v.proc.returncode if v.proc else None}"
                return
            snap = v.status(wait_s=2.0)
            uids = serving_uids(snap)
            if uids:
                rec.serving_after_s = round(time.monotonic() - rec.killed_at, 2)
                self._note("serving again", v)
                rec.serving_uids = sorted(uids)
                experts = (snap or {}).get("experts") or {}
                hosted = ((snap or {}).get("shards") or {}).get("hosted") or {}
                rec.resumed_from = {u: e.get("resumed_from_updates") for u, e in experts.items()}
                rec.updates_after = {u: int(experts[u].get("updates_applied") or 0) for u in uids if u in experts}
                rec.weights_from = {u: str(hosted.get(u, {}).get("weights_from")) for u in uids}
                return
            time.sleep(0.5)
        rec.error = f"not serving within {self.restart_timeout:.0f}s of the kill"

    def run(self, duration: float) -> None:
        """Fault rounds for ``duration`` seconds; every volunteer continues and every link is
        clean when it returns."""
        n = len(self.vols)
        start = time.monotonic()
        lossy = None
        try:
            while time.monotonic() - start < duration:
                i = self.rounds
                t_round = time.monotonic()
                if lossy is not None:
                    self.lab.clear_loss(lossy.host)
                    self._note("loss off", lossy)
                    lossy = None
                down = self._coming_back()
                order = [v for v in (self.vols[(i + k) % n] for k in range(n)) if v.name not in down]
                if len(down) < self.max_down:
                    self._kill(order.pop(0))
                else:
                    self.kills_skipped += 1
                stop, loss = order[0], order[1]
                stop.sigstop()
                self._note("SIGSTOP", stop)
                stopped_at = time.monotonic()
                if self.lab.loss_method is not None:
                    self.lab.set_loss(loss.host, self.loss_pct)
                    self._note(f"loss {self.loss_pct:g}%", loss)
                    lossy = loss
                    self.losses.append({"volunteer": loss.name, "pct": self.loss_pct, "round": i})
                self.rounds += 1
                time.sleep(max(0.0, stopped_at + self.stop_s - time.monotonic()))
                stop.sigcont()
                self._note("SIGCONT", stop)
                self.stops.append({"volunteer": stop.name, "stopped_s": round(time.monotonic() - stopped_at, 2)})
                time.sleep(max(0.0, t_round + self.round_s - time.monotonic()))
        finally:
            if lossy is not None:
                self.lab.clear_loss(lossy.host)
                self._note("loss off", lossy)
            for v in self.vols:
                v.sigcont()

    def wait_restarts(self) -> None:
        """Wait for every restart watcher (each bounded by ``restart_timeout``)."""
        for t in self._watchers:
            t.join(self.restart_timeout + 10)

    def faults_near(self, name: str, t0: float, t1: float) -> list[str]:
        """What happened to volunteer ``name`` from 10 s before ``t0`` to ``t1`` (for a late call)."""
        return [f"{what} at {t - t0:+.1f}s" for t, what, who in self.timeline if who == name and t0 - 10 <= t <= t1]

    def report(self) -> dict[str, Any]:
        rows = [r.as_dict() for r in self.restarts]
        back = [r["serving_after_s"] for r in rows if r["came_back"]]
        dropped = {v.name: self.lab.dropped_packets(v.host) for v in self.vols
                   if hasattr(self.lab, "dropped_packets")}
        return {"rounds": self.rounds, "kills": len(rows), "kills_skipped": self.kills_skipped,
                "came_back": len(back),
                "restart_to_serving_s": {"max": max(back), "mean": round(sum(back) / len(back), 2)} if back else None,
                "updates_rolled_back": sum(r["updates_rolled_back"] or 0 for r in rows),
                "restarts": rows, "sigstops": len(self.stops),
                "sigstop_s": max((s["stopped_s"] for s in self.stops), default=None),
                "loss_periods": len(self.losses), "loss_method": self.lab.loss_method,
                "loss_unavailable": self.lab.loss_unavailable, "dropped_packets": dropped}
