"""Health rules: the level and the "why" line."""

from __future__ import annotations

from volunteer.daemon.health import HealthTracker, assess


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def stats(requests: int, **errors: int) -> dict:
    return {"a": {"requests": requests, "errors": errors}}


def test_levels() -> None:
    assert assess("starting", 0, {}, 0, 0, None, None)[0] == "starting"
    assert assess("draining", 0, {}, 0, 0, None, None)[0] == "draining"
    level, why = assess("serving", 10, {}, 0, 0.0, "disk full", None)
    assert level == "degraded" and "disk full" in (why or "")
    level, why = assess("serving", 10, {}, 0, 0.9, None, None)
    assert level == "degraded" and "overloaded" in (why or "")
    level, why = assess("serving", 10, {"bad_request": 5}, 0, 0.0, None, None)
    assert level == "degraded" and "bad_request" in (why or "")
    assert assess("serving", 100, {"bad_request": 5}, 0, 0.0, None, None) == ("ok", None)
    assert assess("serving", 10, {"draining": 9}, 0, 0.0, None, None) == ("ok", None)
    level, why = assess("serving", 0, {}, 120, 0.0, None, "tcp://h:1")
    assert level == "idle" and "tcp://h:1" in (why or "")


def test_tracker_window_and_idle() -> None:
    clock = FakeClock()
    tracker = HealthTracker(window_s=30, clock=clock)
    tracker.observe(stats(0))
    clock.t += 10
    tracker.observe(stats(5, overloaded=1))
    assert tracker.recent() == (5, {"overloaded": 1})
    assert tracker.idle_for() == 0
    clock.t += 50
    tracker.observe(stats(5, overloaded=1))
    clock.t += 1
    tracker.observe(stats(5, overloaded=1))
    assert tracker.recent() == (0, {})
    assert tracker.idle_for() == 51
