"""A real daemon (``network_enabled=false``) and a trainer over ZeroMQ: ``volunteer pause`` /
``resume`` through the real CLI, typed "paused" replies and no lost request; resource rules
(schedule, idle) through the named test seam; the contribution totals across a restart."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from tests.conftest import DaemonFactory, cli_env, run_cli
from volunteer.client.remote_expert import RemoteExpert
from volunteer.daemon.rule_sources import TEST_SOURCES_ENV
from volunteer.wire.errors import PausedError, RemoteError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]
WAIT_S = 60.0


def status(home: Path) -> dict:
    out = run_cli("status", "--json", "--home", str(home))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_for(what: str, check, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Trainer(threading.Thread):
    """Forward+backward steps against one expert until stopped; every step's outcome counted:
    "ok", "paused" (the typed reply) or the unexpected error's code."""

    def __init__(self, uid: str, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.expert = RemoteExpert(uid, endpoint, timeout=30, adaptive=False)
        self.outcomes: Counter[str] = Counter()
        self.started_steps = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def count(self, outcome: str) -> int:
        with self.lock:
            return self.outcomes[outcome]

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.started_steps += 1
                try:
                    x = torch.randn(4, 64, requires_grad=True)
                    self.expert(x).pow(2).mean().backward()
                    outcome = "ok"
                except PausedError:
                    outcome = "paused"
                except RemoteError as exc:
                    outcome = exc.code
                with self.lock:
                    self.outcomes[outcome] += 1
        finally:
            self.expert.close()


def test_pause_and_resume_with_a_trainer_running(tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    home = tmp_path / "home"
    daemon = volunteer_daemon.start(home, "--num-experts", "1")
    uid = next(iter(status(home)["experts"]))
    trainer = Trainer(uid, daemon.endpoint)
    trainer.start()
    try:
        wait_for("steps served", lambda: trainer.count("ok") >= 3)
        out = run_cli("pause", "--home", str(home))
        assert out.returncode == 0 and out.stdout.strip() == "paused by you", out.stderr
        wait_for("typed paused replies", lambda: trainer.count("paused") >= 3)
        snap = status(home)
        assert snap["pause"] == {**snap["pause"], "paused": True, "reason": "paused by you", "until": None}
        assert snap["experts"][uid]["errors"].get("paused", 0) >= 3  # refused, counted, experts loaded
        assert snap["health"] == {"level": "paused", "why": "paused by you"} and snap["state"] == "paused"
        ok_while_paused = trainer.count("ok")
        out = run_cli("resume", "--home", str(home))
        assert out.returncode == 0 and "running: taking new work" in out.stdout, out.stderr
        wait_for("steps served again", lambda: trainer.count("ok") >= ok_while_paused + 3)
    finally:
        trainer.stop.set()
        trainer.join(60)
    assert not trainer.is_alive(), "a trainer step hung"
    assert set(trainer.outcomes) == {"ok", "paused"}, trainer.outcomes  # nothing lost, timed out or failed
    assert sum(trainer.outcomes.values()) == trainer.started_steps

    # a timed pause resumes by itself; the snapshot says until when
    out = run_cli("pause", "--for", "2s", "--json", "--home", str(home))
    state = json.loads(out.stdout)
    assert state["paused"] and state["until"] is not None and state["rule"] == "manual"
    wait_for("the timed pause to end", lambda: not status(home)["pause"]["paused"])
    bad = run_cli("pause", "--for", "soon", "--home", str(home))
    assert bad.returncode == 2 and "expected a duration like 90s, 15m, 2h" in bad.stderr

    # contribution: kept across a restart, which starts unpaused
    run_cli("pause", "--home", str(home))
    before = wait_for("contribution counted", lambda: (c := status(home)["contribution"])["samples"] > 0 and c)
    assert before["experiment"] == "demo" and before["updates"] > 0 and before["bytes_served"] > 0
    assert run_cli("leave", "--home", str(home)).returncode == 0
    saved = json.loads((home / "contribution.json").read_text())["experiments"]["demo"]
    assert saved["samples"] >= before["samples"] and saved["updates"] >= before["updates"]
    volunteer_daemon.start(home, "--num-experts", "1")
    snap = status(home)
    assert snap["pause"]["paused"] is False
    after = snap["contribution"]
    assert after["samples"] == saved["samples"] and after["updates"] == saved["updates"]
    assert after["since"] == before["since"] and after["uptime_s"] >= saved["uptime_s"] - 0.1  # shown to 0.1 s


def _monday(hour: int) -> float:
    return datetime(2026, 11, 30, hour, 0, tzinfo=timezone.utc).timestamp()  # a Monday


def test_schedule_and_idle_rules_pause_and_resume(tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    home = tmp_path / "home"
    sources = tmp_path / "sources.json"

    def machine(**state: object) -> None:
        tmp = sources.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(sources)

    machine(now=_monday(12), idle_s=3600)  # Monday noon: outside the schedule's windows
    env = cli_env(TZ="UTC", VOLUNTEER_SCHEDULE="mon-fri 18:00-08:00, sat-sun all day", VOLUNTEER_IDLE_MINUTES="5",
                  **{TEST_SOURCES_ENV: str(sources)})
    daemon = volunteer_daemon.start(home, "--num-experts", "1", env=env)
    uid = next(iter(status(home)["experts"]))
    pause = wait_for("the schedule to pause", lambda: (p := status(home)["pause"])["paused"] and p)
    assert pause["reason"] == "until 18:00 by schedule" and pause["until"] == _monday(18) and pause["rule"] == "schedule"
    expert = RemoteExpert(uid, daemon.endpoint, timeout=30, adaptive=False)
    try:
        with pytest.raises(PausedError):
            expert(torch.randn(2, 64))
        out = run_cli("resume", "--home", str(home))  # a rule in force: resume says so
        assert out.returncode == 0 and "paused: until 18:00 by schedule" in out.stdout
        assert "set by the setting schedule" in out.stdout

        machine(now=_monday(19), idle_s=30)  # in the window, but someone uses the machine
        pause = wait_for("the idle rule", lambda: (p := status(home)["pause"])["reason"] == "the machine is in use"
                         and p)
        assert pause["paused"] and pause["rule"] == "idle"
        with pytest.raises(PausedError):
            expert(torch.randn(2, 64))

        machine(now=_monday(19), idle_s=600)  # idle for 10 minutes: work
        wait_for("the rules to resume", lambda: not status(home)["pause"]["paused"])
        assert expert(torch.randn(2, 64)).shape == (2, 64)
    finally:
        expert.close()
