"""One duration format for every figure a user reads: ``fmt.duration``."""

from __future__ import annotations

import pytest

from volunteer.status import fmt
from volunteer.status.plain import render_plain


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.4, "0.4s"), (1.25, "1.2s"), (9.99, "9s"), (45, "45s"), (59.9, "59s"), (60, "1m 00s"),
    (185, "3m 05s"), (3599, "59m 59s"), (3600, "1h 00m"), (7620, "2h 07m"), (86399, "23h 59m"),
    (86400, "1d 00h"), (3 * 86400 + 4 * 3600 + 59, "3d 04h"), (400 * 86400, "400d 00h"), (-3, "-3s"),
])
def test_duration_units(seconds: float, text: str) -> None:
    assert fmt.duration(seconds) == text


@pytest.mark.parametrize("odd", [None, "12", True, float("nan"), float("inf"), [], {}])
def test_duration_of_odd_input_is_na(odd: object) -> None:
    assert fmt.duration(odd) == "n/a"


def test_ago_and_the_views_use_the_same_format() -> None:
    assert fmt.ago(None) == "never" and fmt.ago(125) == "2m 05s ago"
    text = render_plain({"node": {"uptime_s": 7620}, "checkpoints": {"interval_s": 300, "last_age_s": 185}})
    assert "uptime 2h 07m" in text and "every 5m 00s, last 3m 05s ago" in text
