"""The resource rule engine with a fake clock and fake sources (``volunteer.daemon.rules``)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from volunteer.daemon.rules import (
    RUNNING,
    RuleError,
    RuleSettings,
    evaluate,
    parse_duration,
    parse_schedule,
)

UTC = timezone.utc


def at(text: str) -> float:
    """Epoch seconds of a UTC time like "2026-11-30 17:59" (2026-11-30 is a Monday)."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC).timestamp()


def decide(now: float, rules: RuleSettings, idle=None, battery=None, cpu=None, previous=None):
    return evaluate(now, lambda: idle, lambda: battery, lambda: cpu, rules, previous=previous, tz=UTC)


def test_schedule_windows_cross_midnight_and_weekends() -> None:
    rules = RuleSettings(schedule=parse_schedule("mon-fri 18:00-08:00, sat-sun all day"))
    late = decide(at("2026-11-30 17:59"), rules)  # Monday, before the evening window
    assert late.paused and late.rule == "schedule" and late.reason == "until 18:00 by schedule"
    assert late.until == at("2026-11-30 18:00")
    assert decide(at("2026-11-30 18:00"), rules) == RUNNING
    assert decide(at("2026-12-01 07:59"), rules) == RUNNING  # Tuesday morning: Monday's window
    morning = decide(at("2026-12-01 08:00"), rules)
    assert morning.paused and morning.until == at("2026-12-01 18:00")
    assert decide(at("2026-12-05 12:00"), rules) == RUNNING  # Saturday
    # a window belongs to the day it starts: Monday 07:00 follows Sunday (all day), not a weekday evening
    assert decide(at("2026-12-07 07:00"), rules).paused
    assert decide(at("2026-12-05 07:00"), rules) == RUNNING  # Saturday 07:00: Friday's evening window and Saturday
    friday_noon = decide(at("2026-12-04 12:00"), rules)
    assert friday_noon.paused and friday_noon.reason == "until 18:00 by schedule"


def test_schedule_far_resume_names_the_day_and_empty_means_always() -> None:
    rules = RuleSettings(schedule=parse_schedule("sat 10:00-12:00"))
    d = decide(at("2026-11-30 09:00"), rules)
    assert d.paused and d.reason == "until Sat 10:00 by schedule" and d.until == at("2026-12-05 10:00")
    assert parse_schedule("") is None and parse_schedule("  always ") is None
    several = parse_schedule("daily 00:00-06:00 22:00-24:00")
    assert several is not None
    assert decide(at("2026-12-02 23:00"), RuleSettings(schedule=several)) == RUNNING
    assert decide(at("2026-12-02 12:00"), RuleSettings(schedule=several)).paused


@pytest.mark.parametrize("text", ["mon", "funday 10:00-12:00", "mon-fri 25:00-08:00", "mon 10:00-10:00",
                                  "mon 10-12", "mon-fri 18:00-08:00; sat all day", "mon 10:60-11:00"])
def test_bad_schedules_name_the_expected_format(text: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_schedule(text)
    message = str(info.value)
    assert "\n" not in message and text in message
    assert 'expected clauses "DAYS TIMES"' in message and "mon-fri 18:00-08:00, sat-sun all day" in message


def test_battery_idle_and_cpu_rules() -> None:
    now = at("2026-11-30 12:00")
    battery = RuleSettings(pause_on_battery=True)
    assert decide(now, battery, battery=True) == evaluate(now, lambda: None, lambda: True, lambda: None, battery)
    assert decide(now, battery, battery=True).reason == "on battery"
    assert decide(now, battery, battery=False) == RUNNING
    assert decide(now, battery, battery=None) == RUNNING  # no battery
    idle = RuleSettings(idle_minutes=5)
    busy = decide(now, idle, idle=60.0)
    assert busy.paused and busy.reason == "the machine is in use" and busy.until == now + 240.0
    assert decide(now, idle, idle=300.0) == RUNNING
    assert decide(now, idle, idle=None) == RUNNING  # unknown: the rule cannot tell, never pauses
    cpu = RuleSettings(other_cpu_limit_pct=50)
    high = decide(now, cpu, cpu=85.4)
    assert high.paused and high.reason == "other programs use 85% CPU"
    assert decide(now, cpu, cpu=45.0, previous=high).paused  # hysteresis: resumes below 40%
    assert decide(now, cpu, cpu=39.0, previous=high) == RUNNING
    assert decide(now, cpu, cpu=45.0) == RUNNING


def test_rule_order_and_sources_read_only_when_on() -> None:
    now = at("2026-11-30 12:00")
    calls: list[str] = []

    def source(name, value):
        def read():
            calls.append(name)
            return value
        return read

    rules = RuleSettings(schedule=parse_schedule("daily 18:00-08:00"), pause_on_battery=True, idle_minutes=1)
    d = evaluate(now, source("idle", 0.0), source("battery", True), source("cpu", 99.0), rules, tz=UTC)
    assert d.rule == "schedule" and calls == []
    rules = RuleSettings(pause_on_battery=True, idle_minutes=1)
    d = evaluate(now, source("idle", 0.0), source("battery", True), source("cpu", 99.0), rules, tz=UTC)
    assert d.rule == "battery" and "cpu" not in calls


def test_rule_settings_from_settings_and_durations() -> None:
    rules = RuleSettings.from_settings({"schedule": "sat-sun all day", "pause_on_battery": False,
                                        "idle_minutes": 0.0, "other_cpu_limit_pct": 0.0})
    assert rules.schedule is not None and rules.any
    assert not RuleSettings.from_settings({"schedule": ""}).any
    assert parse_duration("2h") == 7200 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("1d") == 86400 and parse_duration("45") == 45 and parse_duration("15M") == 900
    for bad in ("", "2x", "-5m", "0", "31d", "h"):
        with pytest.raises(RuleError, match="expected a duration like 90s, 15m, 2h"):
            parse_duration(bad)
