"""Resource rules: when a volunteer node should stop taking work (pure; no I/O, no clock).

BOINC and Folding@home let a volunteer say *when* their machine may compute; these are the
same rules as settings (``volunteer.daemon.settings``), decided here and applied by the
supervisor's pause controller (``volunteer.daemon.pause``):

- ``schedule``: time windows per weekday in local time, e.g. ``"mon-fri 18:00-08:00,
  sat-sun all day"`` (a window whose end is before its start runs past midnight into the
  next day); outside every window the node pauses "until 18:00 by schedule";
- ``pause_on_battery``: pause while the machine runs on battery ("on battery");
- ``idle_minutes``: run only once nobody used the machine for that long ("the machine is in
  use"); an idle time nobody can read (``None``) never pauses: the rule cannot tell;
- ``other_cpu_limit_pct``: pause while other programs use more than that share of the
  machine's CPU ("other programs use 85% CPU"), resumed below the limit minus
  ``CPU_HYSTERESIS_PCT`` so a load near the limit does not flap.

``evaluate(now, idle_source, battery_source, cpu_source, settings)`` returns a
``PauseDecision(paused, reason, until, rule)``: the first rule that pauses, in the order
above. Sources are plain callables (``None`` = unknown), called only when their rule is
on, so tests pass fakes and a fake clock; the real readers are in ``rule_sources.py``. A
manual pause (``volunteer pause``) is not a rule: the controller puts it first.

``parse_schedule`` and ``parse_duration`` validate strictly and raise ``RuleError`` with a
one-line message that shows the expected format; ``schedule_problem`` is the same check as
a problem text (the settings layer rejects a bad ``schedule`` with it, before anything runs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
SCHEDULE_FORMAT = ('clauses "DAYS TIMES" separated by commas, e.g. "mon-fri 18:00-08:00, sat-sun all day" '
                   '(DAYS: mon..sun, a range like mon-fri, or daily; TIMES: HH:MM-HH:MM, several allowed, '
                   'or "all day")')
DURATION_FORMAT = 'a duration like 90s, 15m, 2h, 1h30m or 1d (at most 30d)'
MAX_DURATION_S = 30 * 86400.0
CPU_HYSTERESIS_PCT = 10.0
MINUTES_PER_DAY = 24 * 60
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


class RuleError(ValueError):
    """A schedule or duration that does not parse; ``str(err)`` is one line with the format."""


@dataclass(frozen=True)
class PauseDecision:
    """Whether the node should take work now, and why not in human words.

    ``until``: epoch seconds when the pause is expected to end (None: unknown or never);
    ``rule``: manual | schedule | battery | idle | cpu (None when not paused).
    """

    paused: bool
    reason: str | None = None
    until: float | None = None
    rule: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"paused": self.paused, "reason": self.reason, "until": self.until}


RUNNING = PauseDecision(False)


@dataclass(frozen=True)
class Schedule:
    """Allowed minutes per weekday: ``windows[d]`` is a tuple of [start, end) minute ranges."""

    windows: tuple[tuple[tuple[int, int], ...], ...]
    text: str

    def allows(self, when: datetime) -> bool:
        minute = when.hour * 60 + when.minute
        return any(a <= minute < b for a, b in self.windows[when.weekday()])

    def next_change(self, when: datetime) -> datetime | None:
        """The first minute boundary after ``when`` where ``allows`` flips (None: never, i.e.
        allowed all week or never)."""
        now_ok = self.allows(when)
        start = when.replace(second=0, microsecond=0)
        for day in range(8):
            base = (start + timedelta(days=day)).replace(hour=0, minute=0)
            bounds = sorted({m for a, b in self.windows[base.weekday()] for m in (a, b)} | {0})
            for m in bounds:
                t = base + timedelta(minutes=m)
                if t > when and self.allows(t) != now_ok:
                    return t
        return None


def _day_set(spec: str) -> list[int]:
    if spec in ("daily", "all", "every-day"):
        return list(range(7))
    first, sep, last = spec.partition("-")
    if first not in DAYS or (sep and last not in DAYS):
        raise ValueError(f"unknown day {spec!r}")
    a = DAYS.index(first)
    b = DAYS.index(last) if sep else a
    return [(a + i) % 7 for i in range((b - a) % 7 + 1)]


def _minutes(hh: str, mm: str) -> int:
    h, m = int(hh), int(mm)
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise ValueError(f"bad time {hh}:{mm}")
    return h * 60 + m


def _windows(clean: str) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The allowed minute ranges per weekday of a cleaned schedule; ValueError saying what
    is wrong (the one definition of the format, used by ``parse_schedule`` and
    ``schedule_problem``)."""
    windows: list[list[tuple[int, int]]] = [[] for _ in DAYS]
    for clause in clean.split(","):
        words = clause.strip().split(" ")
        if len(words) < 2:
            raise ValueError(f"clause {clause.strip()!r} needs days and times")
        days = _day_set(words[0])
        times = words[1:]
        if times == ["all", "day"]:
            for d in days:
                windows[d].append((0, MINUTES_PER_DAY))
            continue
        for span in times:
            match = _TIME_RE.match(span)
            if not match:
                raise ValueError(f"bad time range {span!r}")
            a, b = _minutes(*match.group(1, 2)), _minutes(*match.group(3, 4))
            if a in (b, MINUTES_PER_DAY):
                raise ValueError(f"empty time range {span!r}")
            for d in days:
                if a < b:
                    windows[d].append((a, b))
                else:  # past midnight: the rest of this day and the next morning
                    windows[d].append((a, MINUTES_PER_DAY))
                    if b:
                        windows[(d + 1) % 7].append((0, b))
    return tuple(tuple(sorted(w)) for w in windows)


def _clean(text: str) -> str:
    return " ".join(str(text).lower().split())


_ALWAYS = ("", "always", "any", "all")


def parse_schedule(text: str) -> Schedule | None:
    """Parse the ``schedule`` setting; empty (or "always") means no schedule (None)."""
    clean = _clean(text)
    if clean in _ALWAYS:
        return None
    try:
        windows = _windows(clean)
    except ValueError as exc:
        raise RuleError(f"schedule {text!r}: {exc}; expected {SCHEDULE_FORMAT}") from None
    return Schedule(windows, clean)


def schedule_problem(text: str) -> str | None:
    """None when ``parse_schedule`` accepts ``text``, else what is wrong and the expected
    format in one line (the settings layer's check of ``schedule``)."""
    clean = _clean(text)
    if clean in _ALWAYS:
        return None
    try:
        _windows(clean)
    except ValueError as exc:
        return f"{exc} in {text!r}; expected {SCHEDULE_FORMAT}"
    return None


def parse_duration(text: str) -> float:
    """``"2h"`` -> 7200.0; also ``90s``, ``15m``, ``1h30m``, ``1d`` or plain seconds."""
    clean = str(text).strip().lower().replace(" ", "")
    try:
        seconds = float(clean)
    except ValueError:
        match = _DURATION_RE.match(clean)
        if not clean or not match:
            raise RuleError(f"duration {text!r}: expected {DURATION_FORMAT}") from None
        d, h, m, s = (int(g or 0) for g in match.groups())
        seconds = float(d * 86400 + h * 3600 + m * 60 + s)
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_DURATION_S:
        raise RuleError(f"duration {text!r}: expected {DURATION_FORMAT}")
    return seconds


@dataclass(frozen=True)
class RuleSettings:
    """The rule settings, validated (``from_settings`` reads the daemon's ``Settings``)."""

    schedule: Schedule | None = None
    pause_on_battery: bool = False
    idle_minutes: float = 0.0
    other_cpu_limit_pct: float = 0.0

    @classmethod
    def from_settings(cls, settings: Any) -> RuleSettings:
        """Raises ``RuleError`` for a bad schedule (the caller reports it as a settings error)."""
        values: Mapping[str, Any] = settings.as_dict() if hasattr(settings, "as_dict") else dict(settings)
        return cls(schedule=parse_schedule(values.get("schedule", "") or ""),
                   pause_on_battery=bool(values.get("pause_on_battery", False)),
                   idle_minutes=float(values.get("idle_minutes", 0.0) or 0.0),
                   other_cpu_limit_pct=float(values.get("other_cpu_limit_pct", 0.0) or 0.0))

    @property
    def any(self) -> bool:
        return bool(self.schedule or self.pause_on_battery or self.idle_minutes > 0 or self.other_cpu_limit_pct > 0)


Source = Callable[[], Any]


def evaluate(now: float, idle_source: Source, battery_source: Source, cpu_source: Source,
             settings: RuleSettings, previous: PauseDecision | None = None,
             tz: Any = None) -> PauseDecision:
    """The first rule that pauses the node at ``now`` (epoch seconds), else ``RUNNING``.

    ``idle_source()``: seconds since the last user input (None: unknown);
    ``battery_source()``: True on battery (None: no battery or unknown);
    ``cpu_source()``: other programs' share of the machine's CPU in percent (None: unknown).
    ``previous``: the last decision (the CPU rule resumes only below its limit minus the
    hysteresis); ``tz``: the schedule's time zone (None: the machine's local time).
    """
    s = settings
    if s.schedule is not None:
        local = datetime.fromtimestamp(now, tz)
        if not s.schedule.allows(local):
            nxt = s.schedule.next_change(local)
            if nxt is None:
                return PauseDecision(True, "by schedule (no window allows work)", None, "schedule")
            return PauseDecision(True, f"until {nxt:%H:%M} by schedule" if nxt - local < timedelta(hours=20)
                                 else f"until {nxt:%a %H:%M} by schedule", nxt.timestamp(), "schedule")
    if s.pause_on_battery and _bool(battery_source()) is True:
        return PauseDecision(True, "on battery", None, "battery")
    if s.idle_minutes > 0:
        idle = _number(idle_source())
        need = s.idle_minutes * 60.0
        if idle is not None and idle < need:
            return PauseDecision(True, "the machine is in use", now + (need - idle), "idle")
    if s.other_cpu_limit_pct > 0:
        cpu = _number(cpu_source())
        limit = s.other_cpu_limit_pct
        if previous is not None and previous.rule == "cpu":
            limit = max(0.0, limit - CPU_HYSTERESIS_PCT)
        if cpu is not None and cpu > limit:
            return PauseDecision(True, f"other programs use {cpu:.0f}% CPU", None, "cpu")
    return RUNNING


def pause_text(pause: Mapping[str, Any]) -> str:
    """A pause in one phrase: "paused: on battery", "paused: until 18:00 by schedule",
    "paused by you until 14:05" (the reason as it is when it already says "paused"; the
    same rule as ``volunteer status``'s ``status.pause_view``)."""
    reason = str(pause.get("reason") or "").strip()
    if not reason:
        return "paused"
    if reason.startswith("paused"):
        return reason
    return f"paused: {reason}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None
