"""While paused the status shows state "paused" and health "paused" with the reason, and the
metrics say the same (``snapshot.paused_view``, the plain view, the Prometheus collector)."""

from __future__ import annotations

from volunteer.daemon.metrics import SnapshotCollector
from volunteer.daemon.snapshot import paused_view
from volunteer.status.plain import render_plain

PAUSE = {"paused": True, "reason": "paused by you", "until": None, "rule": "manual"}


def test_paused_view() -> None:
    assert paused_view("serving", "idle", "no trainer", PAUSE) == ("paused", "paused", "paused by you")
    assert paused_view("serving", "idle", None, {**PAUSE, "reason": "on battery"}) == \
        ("paused", "paused", "paused: on battery")
    assert paused_view("serving", "ok", None, {"paused": False}) == ("serving", "ok", None)
    assert paused_view("draining", "draining", "leaving", PAUSE) == ("draining", "draining", "leaving")
    assert paused_view("serving", "ok", None, "garbage") == ("serving", "ok", None)


def test_plain_and_metrics_say_paused() -> None:
    state, level, why = paused_view("serving", "idle", None, PAUSE)
    snap = {"state": state, "health": {"level": level, "why": why}, "pause": PAUSE}
    lines = render_plain(snap).splitlines()
    assert next(x for x in lines if x.startswith("state")).startswith("state       paused by you   uptime")
    assert next(x for x in lines if x.startswith("health")) == "health      paused by you"
    families = {m.name: m for m in SnapshotCollector(lambda: snap).collect()}
    states = {s.labels["volunteer_state"]: s.value for s in families["volunteer_state"].samples}
    levels = {s.labels["volunteer_health"]: s.value for s in families["volunteer_health"].samples}
    assert states["paused"] == 1 and states["serving"] == 0
    assert levels["paused"] == 1 and levels["idle"] == 0


def test_live_line_says_paused_once() -> None:
    from volunteer.daemon.snapshot import live_line_text

    state, level, why = paused_view("serving", "idle", None, {**PAUSE, "reason": "on battery"})
    snap = {"state": state, "experts": {"e.0": {}}, "totals": {}, "node": {"uptime_s": 5},
            "health": {"level": level, "why": why}, "pause": {**PAUSE, "reason": "on battery"}}
    line = live_line_text(snap)
    assert line.startswith("paused: on battery | 1 experts") and line.count("paused") == 1


def test_dashboard_health_line_names_the_pause() -> None:
    import io

    from rich.console import Console

    from volunteer.status.dashboard import render_dashboard

    state, level, why = paused_view("serving", "idle", None, PAUSE)
    out = io.StringIO()
    Console(file=out, width=100, no_color=True).print(
        render_dashboard({"state": state, "health": {"level": level, "why": why}, "pause": PAUSE}))
    assert "health: paused by you" in out.getvalue() and "paused  paused" not in out.getvalue()
