"""Pausing a node: ``volunteer pause`` / ``resume`` and the resource rules, applied.

``PauseController`` combines the manual pause (``pause(for_s)``, ``resume()``; it wins over
every rule) with the rules' decision (``volunteer.daemon.rules.evaluate``, on each
supervisor tick) and applies a change at once:

- the runtime's ``PauseGate`` closes (new requests get the typed "paused" reply on the
  ZeroMQ and libp2p paths alike; in-flight work finishes; experts stay loaded) or opens
  (the next request is served: resuming is instant);
- the DHT records are re-announced with state "paused" (or "serving") by a background
  thread (``Announcer``), so the supervisor's tick never waits on the network; trainers'
  directories skip paused servers. ``PausedNetwork`` wraps the network service so every
  announce made while paused (the shard manager's, after a download or an adoption too)
  says "paused", and heartbeats repeat the last state.

The pause lives in memory only: ``volunteer status`` shows it (``status()`` is the
snapshot's ``pause`` section), and a restart starts unpaused unless a rule applies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from volunteer.daemon.rule_sources import RuleSources, sources_from_env
from volunteer.daemon.rules import (
    RUNNING,
    PauseDecision,
    RuleError,
    RuleSettings,
    evaluate,
    pause_text,
)
from volunteer.daemon.settings import SettingsError
from volunteer.status.fmt import clock

log = logging.getLogger(__name__)

RULES_EVERY_S = 1.0  # how often the rules read their sources (the supervisor ticks faster)


class PausedNetwork:
    """The network service, with announces said "paused" while ``is_paused()`` holds.

    Everything else is the service's own (``__getattr__``). An announce of "draining" (a
    leave) passes unchanged: leaving wins over pausing.
    """

    def __init__(self, inner: Any, is_paused: Callable[[], bool]) -> None:
        self.inner = inner
        self._is_paused = is_paused
        self._lock = threading.Lock()  # one announce at a time: the last one carries the state

    def announce(self, uids: Any, state: str = "serving", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if state == "serving" and self._is_paused():
                state = "paused"
            return self.inner.announce(uids, state, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Announcer:
    """A daemon thread that runs ``announce()`` whenever ``kick()`` asks (kicks coalesce)."""

    def __init__(self, announce: Callable[[], Any]) -> None:
        self._announce = announce
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def kick(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pause-announce", daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            try:
                self._announce()
            except Exception as exc:  # the heartbeats try again; the gate already acts
                log.warning("announcing the pause state failed: %s", exc)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()


class PauseController:
    """Manual pause + resource rules -> the gate and the records (see module docstring).

    ``apply(paused)`` is called on every change (from the caller's thread: the control op's
    or the supervisor's tick); it must not block (close/open the gate, kick the announcer).
    """

    def __init__(self, rules: RuleSettings, sources: RuleSources, apply: Callable[[bool], None],
                 rules_every_s: float = RULES_EVERY_S, announcer: Announcer | None = None,
                 limits: Sequence[Callable[[], Mapping[str, Any]]] = ()) -> None:
        self.rules = rules
        self._limits = tuple(limits)  # e.g. the daily transfer cap: {"paused", "reason", "until", "rule"}
        self.announcer = announcer
        self.sources = sources
        self._apply = apply
        self._rules_every_s = rules_every_s
        self._lock = threading.Lock()
        self._manual = False
        self._manual_until: float | None = None
        self._rule = RUNNING
        self._next_rules = 0.0
        self._current = RUNNING
        self._changed_at: float | None = None
        self._readings: dict[str, Any] = {}

    # ------------------------------------------------------------------ manual

    def pause(self, for_s: float | None = None) -> PauseDecision:
        """Pause by hand, until ``resume()`` or for ``for_s`` seconds (then it resumes itself)."""
        with self._lock:
            self._manual = True
            self._manual_until = None if for_s is None else self.sources.clock() + float(for_s)
        return self._update()

    def resume(self) -> PauseDecision:
        """Clear the manual pause; a rule that applies keeps the node paused (and says so)."""
        with self._lock:
            self._manual, self._manual_until = False, None
        return self._update()

    # ------------------------------------------------------------------ rules

    def tick(self) -> PauseDecision:
        """Supervisor tick: re-read the rules when due, expire a timed pause, apply changes."""
        now = time.monotonic()
        if self.rules.any and now >= self._next_rules:
            self._next_rules = now + self._rules_every_s
            readings = {"idle_s": self.sources.idle() if self.rules.idle_minutes > 0 else None,
                        "on_battery": self.sources.battery() if self.rules.pause_on_battery else None,
                        "other_cpu_pct": self.sources.cpu() if self.rules.other_cpu_limit_pct > 0 else None}
            decision = evaluate(self.sources.clock(), lambda: readings["idle_s"], lambda: readings["on_battery"],
                                lambda: readings["other_cpu_pct"], self.rules, previous=self._rule)
            with self._lock:
                self._rule, self._readings = decision, readings
        return self._update()

    # ------------------------------------------------------------------ state

    def _decide(self) -> PauseDecision:
        now = self.sources.clock()
        if self._manual and self._manual_until is not None and now >= self._manual_until:
            self._manual, self._manual_until = False, None
            log.info("the timed pause ended")
        if self._manual:
            until = self._manual_until
            reason = "paused by you" + (f" until {clock(until, now)}" if until else "")
            return PauseDecision(True, reason, until, "manual")
        for limit in self._limits:
            state = limit()
            if state.get("paused"):
                return PauseDecision(True, str(state.get("reason") or "a limit is reached"), state.get("until"),
                                     str(state.get("rule") or "limit"))
        return self._rule

    def _update(self) -> PauseDecision:
        with self._lock:
            decision = self._decide()
            before, self._current = self._current, decision
            if decision.paused != before.paused:
                self._changed_at = self.sources.clock()
        if decision.paused != before.paused:
            log.info("%s", pause_text(decision.as_dict()) if decision.paused else "resumed: taking new work")
            self._apply(decision.paused)
        elif decision.reason != before.reason and decision.paused:
            log.info("still %s", pause_text(decision.as_dict()))
        return decision

    @property
    def paused(self) -> bool:
        return self._current.paused

    def close(self) -> None:
        """Stop the announcer thread (the node is stopping)."""
        if self.announcer is not None:
            self.announcer.stop()

    @property
    def decision(self) -> PauseDecision:
        return self._current

    def status(self) -> dict[str, Any]:
        """The snapshot's ``pause`` section: paused, reason, until (+ what the rules read)."""
        with self._lock:
            d, readings = self._current, dict(self._readings)
        out = d.as_dict()
        out.update(rule=d.rule, since=self._changed_at if d.paused else None, manual=self._manual,
                   readings=readings, detection=self.sources.methods() if self.rules.any else {})
        return out


def node_pause(sup: Any) -> PauseController:
    """The pause controller of a supervisor: its rule settings (``SettingsError`` for a bad
    schedule), the machine's rule sources (or the test seam's), and on a change the runtime's
    gate at once and the records through the shard manager's announce, in the background."""
    try:
        rules = RuleSettings.from_settings(sup.settings)
    except RuleError as exc:
        raise SettingsError(str(exc)) from None

    def announce() -> None:
        if sup.shards is not None and sup.network is not None and not sup.leaving:
            sup.shards.announce()  # through ``PausedNetwork``: "paused" or "serving"

    announcer = Announcer(announce)

    def apply(paused: bool) -> None:
        if sup.runtime is not None:
            (sup.runtime.pause_gate.close if paused else sup.runtime.pause_gate.open)()
        if sup.network is not None and sup.shards is not None:
            announcer.kick()

    quota = getattr(sup, "quota", None)
    return PauseController(rules, sources_from_env(), apply, announcer=announcer,
                           limits=[quota.limit_state] if quota is not None else [])
