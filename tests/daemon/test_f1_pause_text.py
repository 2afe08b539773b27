"""How a pause reads: the resume time said once, with the weekday when it is not today, and
the log lines without a doubled "paused" (``volunteer.daemon.pause``, ``volunteer.cli.pause``)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import pytest

from volunteer.cli.pause import describe
from volunteer.daemon.pause import PauseController
from volunteer.daemon.rule_sources import RuleSources
from volunteer.daemon.rules import RuleSettings
from volunteer.status.fmt import clock

NOW = datetime(2026, 11, 28, 5, 6).timestamp()  # a Saturday


def controller(now: float) -> PauseController:
    sources = RuleSources(clock=lambda: now, idle=lambda: None, battery=lambda: None, cpu=lambda: None)
    return PauseController(RuleSettings(), sources, lambda paused: None, rules_every_s=0.0)


def test_clock_names_the_day_when_it_is_not_today() -> None:
    assert clock(NOW + 3600, NOW) == "06:06"
    assert clock(NOW + 2 * 86400, NOW) == "Mon 05:06"
    assert clock(NOW + 10 * 86400, NOW) == "Tue 8 Dec 05:06"
    assert clock("x", NOW) == "n/a" and clock(float("nan"), NOW) == "n/a"


def test_a_two_day_pause_says_the_day_and_the_time_once() -> None:
    d = controller(NOW).pause(2 * 86400.0)
    assert d.reason == "paused by you until Mon 05:06"
    line = describe(d.as_dict(), now=NOW)
    assert line == "paused by you until Mon 05:06 (resumes in 2d 00h)"
    assert line.count("05:06") == 1


def test_a_reason_without_the_time_gets_it_once() -> None:
    line = describe({"paused": True, "reason": "daily transfer cap reached", "until": NOW + 300}, now=NOW)
    assert line == "paused: daily transfer cap reached (resumes in 5m 00s, at 05:11)"
    assert describe({"paused": False}) == "running: taking new work"


@pytest.mark.parametrize("hours", [1, 30])
def test_today_or_tomorrow(hours: int) -> None:
    until = datetime.fromtimestamp(NOW) + timedelta(hours=hours)
    text = controller(NOW).pause(hours * 3600.0).reason
    assert text.endswith(f"{until:%H:%M}") and (f"{until:%a}" in text) == (hours == 30)


def test_the_log_says_paused_once(caplog: pytest.LogCaptureFixture) -> None:
    pc = controller(NOW)
    with caplog.at_level(logging.INFO, logger="volunteer.daemon.pause"):
        pc.pause()
        pc.pause(3600.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["paused by you", "still paused by you until 06:06"]
    assert not any("paused: paused" in line for line in lines)
