"""``PauseController`` with a fake clock and fake sources; the runtime's gate and the
records wrapper it drives (``volunteer.daemon.pause``, ``volunteer.runtime.pause_gate``)."""

from __future__ import annotations

import threading

import pytest

from volunteer.daemon.pause import Announcer, PauseController, PausedNetwork
from volunteer.daemon.rule_sources import TEST_SOURCES_ENV, RuleSources, sources_from_env
from volunteer.daemon.rules import RuleSettings
from volunteer.runtime.pause_gate import PauseGate
from volunteer.wire.errors import ERROR_CLASSES, PausedError, error_from_code


class Fake:
    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.idle: float | None = 3600.0
        self.battery: bool | None = False

    def sources(self) -> RuleSources:
        return RuleSources(clock=lambda: self.now, idle=lambda: self.idle, battery=lambda: self.battery,
                           cpu=lambda: None)


def controller(fake: Fake, rules: RuleSettings) -> tuple[PauseController, list[bool]]:
    applied: list[bool] = []
    return PauseController(rules, fake.sources(), applied.append, rules_every_s=0.0), applied


def test_manual_pause_for_a_while_resumes_by_itself() -> None:
    fake = Fake()
    pc, applied = controller(fake, RuleSettings())
    d = pc.pause(7200.0)
    assert d.paused and d.rule == "manual" and d.reason.startswith("paused by you until ")
    assert d.until == fake.now + 7200.0 and applied == [True]
    pc.pause(7200.0)  # again: no second change applied
    assert applied == [True]
    fake.now += 7199.0
    assert pc.tick().paused
    fake.now += 1.0
    assert not pc.tick().paused and applied == [True, False]
    status = pc.status()
    assert status["paused"] is False and status["reason"] is None and status["until"] is None


def test_manual_pause_wins_and_resume_leaves_a_rule_in_force() -> None:
    fake = Fake()
    pc, applied = controller(fake, RuleSettings(pause_on_battery=True, idle_minutes=5))
    assert not pc.tick().paused
    fake.battery = True
    d = pc.tick()
    assert d.paused and d.reason == "on battery" and applied == [True]
    manual = pc.pause()
    assert manual.reason == "paused by you" and manual.until is None and applied == [True]  # still paused
    d = pc.resume()
    assert d.paused and d.reason == "on battery"  # the rule still applies
    fake.battery = False
    fake.idle = 10.0
    d = pc.tick()
    assert d.paused and d.reason == "the machine is in use" and d.until == fake.now + 290.0
    fake.idle = 301.0
    assert not pc.tick().paused and applied == [True, False]
    assert pc.status()["readings"] == {"idle_s": 301.0, "on_battery": False, "other_cpu_pct": None}


def test_gate_refuses_with_the_typed_error_and_opens_at_once() -> None:
    gate = PauseGate()
    gate.check()
    gate.close()
    with pytest.raises(PausedError) as info:
        gate.check()
    assert info.value.code == "paused" and "another replica" in info.value.message
    gate.open()
    gate.check()
    assert ERROR_CLASSES["paused"] is PausedError and isinstance(error_from_code("paused", "x"), PausedError)


class Service:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def announce(self, uids, state="serving", load=0.0, **kw):
        self.calls.append((tuple(uids), state))
        return "report"

    def snapshot(self):
        return {"peer_id": "p"}


def test_paused_network_says_paused_and_lets_draining_through() -> None:
    paused = [False]
    net = PausedNetwork(Service(), lambda: paused[0])
    net.announce(["a.0"], "serving", 0.1, shards={})
    paused[0] = True
    net.announce(["a.0"], "serving", 0.1)
    net.announce(["a.0"])
    net.announce(["a.0"], "draining")
    assert net.inner.calls == [(("a.0",), "serving"), (("a.0",), "paused"), (("a.0",), "paused"),
                               (("a.0",), "draining")]
    assert net.snapshot() == {"peer_id": "p"}  # everything else is the service's


def test_announcer_runs_kicks_in_the_background_and_stops() -> None:
    done = threading.Event()
    count = [0]

    def announce() -> None:
        count[0] += 1
        done.set()

    a = Announcer(announce)
    a.kick()
    assert done.wait(10)
    a.stop()
    assert count[0] >= 1


def test_test_seam_reads_the_named_file(tmp_path) -> None:
    path = tmp_path / "sources.json"
    path.write_text('{"now": 123.0, "idle_s": 5, "on_battery": true}')
    s = sources_from_env({TEST_SOURCES_ENV: str(path)})
    assert s.clock() == 123.0 and s.idle() == 5 and s.battery() is True and s.cpu() is None
    path.write_text("garbage")
    assert s.idle() is None and s.clock() > 1e9  # unreadable: unknown, and the real clock
    real = sources_from_env({})
    assert real.test_file is None and set(real.methods()) == {"idle", "battery", "cpu"}


def test_live_line_starts_with_the_pause_reason() -> None:
    from volunteer.daemon.rules import pause_text
    from volunteer.daemon.snapshot import live_line_text

    snap = {"state": "serving", "experts": {"e.0": {}}, "totals": {}, "node": {"uptime_s": 5},
            "health": {"level": "idle", "why": "paused: on battery"},
            "pause": {"paused": True, "reason": "on battery", "until": None}}
    line = live_line_text(snap)
    assert line.startswith("paused: on battery | [serving] 1 experts") and line.count("on battery") == 1
    assert pause_text({"reason": "paused by you until 14:05"}) == "paused by you until 14:05"
    assert pause_text({"reason": "until 18:00 by schedule"}) == "paused: until 18:00 by schedule"
    snap["pause"] = {"paused": False, "reason": None, "until": None}
    snap["health"] = {"level": "ok", "why": None}
    assert live_line_text(snap).startswith("[serving]")
