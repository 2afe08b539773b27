"""A real daemon through the real CLI: join/status/leave, restarts, refusals, permissions."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import DaemonFactory, cli_env, run_cli
from tests.runtime.servers import wait_for
from tests.status.test_render import colour_codes
from volunteer.client.remote_expert import RemoteExpert
from volunteer.daemon.control_client import call
from volunteer.experts.backend import ExpertBackend
from volunteer.experts.checkpoint import load_checkpoint
from volunteer.manifest import load_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXPERT_FIELDS = {"requests", "samples", "requests_per_s", "samples_per_s", "mean_batch_size", "batch_size_histogram",
                 "queue_depth", "latency_ms", "errors", "updates_applied"}


def train(uid: str, endpoint: str, steps: int) -> None:
    expert = RemoteExpert(uid, endpoint, timeout=20)
    try:
        for _ in range(steps):
            x = torch.randn(8, 64, requires_grad=True)
            expert(x).pow(2).mean().backward()
    finally:
        expert.transport.close()


def test_join_status_leave_round_trip(tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    home = tmp_path / "home"
    daemon = volunteer_daemon.start(home, "--num-experts", "2", network=True)
    out = daemon.output()
    assert "device: cpu" in out or "device: cuda" in out
    assert f"trainers reach this node at {daemon.endpoint}" in out
    assert "hosting 2 ffn expert(s): demo.ffn." in out
    assert "started a new swarm: other volunteers join it with `volunteer join demo --bootstrap /ip4/127.0.0.1/" in out

    snap = json.loads(run_cli("status", "--json", "--home", str(home)).stdout)
    assert snap["state"] == "serving" and snap["endpoint"] == daemon.endpoint
    assert set(snap) >= {"node", "experiment", "state", "endpoint", "device", "system", "process", "experts",
                         "totals", "checkpoints", "network", "health"}
    net = snap["network"]
    assert net["new_swarm"] is True and net["state"] == "serving" and net["announced_uids"] == 2
    assert net["addrs"] and all(a.startswith("/ip4/127.0.0.1/tcp/") and net["peer_id"] in a for a in net["addrs"])
    assert net["zmq_endpoint"] == daemon.endpoint and net["last_announce_ok"] is True
    assert snap["settings"]["network_enabled"] is True and snap["settings"]["listen_host"] == "127.0.0.1"
    assert snap["node"]["pid"] == daemon.proc.pid and snap["node"]["uptime_s"] >= 0
    assert snap["experiment"]["name"] == "demo"
    assert {"utilization_pct", "memory_used_bytes", "memory_total_bytes", "description"} <= set(snap["device"])
    assert {"cpu_pct", "ram_used_bytes", "ram_total_bytes"} <= set(snap["system"])
    uids = sorted(snap["experts"])
    assert len(uids) == 2
    for uid in uids:
        assert set(snap["experts"][uid]) >= EXPERT_FIELDS
        assert {"queue_p50", "queue_p99", "compute_p50", "compute_p99"} <= set(snap["experts"][uid]["latency_ms"])

    train(uids[0], daemon.endpoint, steps=5)
    snap = json.loads(run_cli("status", "--json", "--home", str(home)).stdout)
    assert snap["experts"][uids[0]]["updates_applied"] == 5
    assert snap["experts"][uids[0]]["requests"] >= 10
    assert snap["totals"]["requests"] >= 10

    plain = run_cli("status", "--home", str(home))  # piped: plain text, one frame
    assert plain.returncode == 0 and "\x1b[" not in plain.stdout
    assert "state       serving" in plain.stdout and uids[0] in plain.stdout and "not connected" not in plain.stdout
    assert f"peer id       {net['peer_id']}" in plain.stdout and "new swarm" in plain.stdout

    sock = Path(daemon.control["socket"])  # the control socket is private to the owner
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(home.stat().st_mode) == 0o700

    coloured = status_on_tty(home, no_color=False)  # a terminal gets the rich dashboard...
    assert "hosted experts" in coloured and colour_codes(coloured)
    plain_tty = status_on_tty(home, no_color=True)  # ... without colours under NO_COLOR
    assert "hosted experts" in plain_tty and not colour_codes(plain_tty)

    left = run_cli("leave", "--home", str(home))
    assert left.returncode == 0, left.stderr
    assert left.stdout.startswith("left in ") and "checkpointed 2 expert(s)" in left.stdout
    assert daemon.wait_exit(30) == 0
    assert not (home / "control.json").exists()
    assert sorted(p.name for p in (home / "checkpoints" / "demo").glob("*.pt")) == [f"{u}.pt" for u in uids]
    assert "left (leave command)" in (home / "logs" / "volunteer.log").read_text()
    assert run_cli("status", "--home", str(home)).returncode == 3


def test_second_daemon_on_same_home_is_refused(tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    home = tmp_path / "home"
    first = volunteer_daemon.start(home, "--num-experts", "1")
    second = volunteer_daemon.spawn(home, "--num-experts", "1")
    assert second.wait_exit(60) == 4
    assert second.output().strip() == (
        f"error: another volunteer daemon (pid {first.proc.pid}) is already running with home {home}: "
        f"stop it with `volunteer leave --home {home}` or pick another --home")
    other = volunteer_daemon.start(tmp_path / "other-home", "--num-experts", "1")  # side by side is fine
    assert other.endpoint != first.endpoint
    assert call(home, "ping")["pid"] == first.proc.pid


def test_sigterm_leaves_gracefully_and_restart_resumes(tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    home = tmp_path / "home"
    daemon = volunteer_daemon.start(home, "--num-experts", "1")
    uid = next(iter(call(home, "status")["experts"]))
    train(uid, daemon.endpoint, steps=3)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert "SIGTERM received: leaving gracefully" in daemon.output()
    state = load_checkpoint(home / "checkpoints" / "demo" / f"{uid}.pt", uid, load_manifest("demo").fingerprint())
    assert state["updates_applied"] == 3

    local = ExpertBackend(uid, "ffn", 64)
    fresh = local.forward([torch.ones(2, 64)])
    local.load_state_dict(state)
    assert not torch.allclose(local.forward([torch.ones(2, 64)]), fresh)  # training changed the weights

    again = volunteer_daemon.start(home, "--num-experts", "1")
    assert f"{uid} (resumed at 3 updates)" in again.output()
    snap = call(home, "status")
    assert snap["experts"][uid]["updates_applied"] == 3
    assert snap["experts"][uid]["resumed_from_updates"] == 3
    x = torch.randn(4, 64)
    remote = RemoteExpert(uid, again.endpoint, timeout=20)
    try:
        with torch.no_grad():
            served = remote(x)
    finally:
        remote.transport.close()
    assert torch.allclose(served, local.forward([x]), atol=1e-6)  # the restarted node serves the trained weights


def test_kill_9_loses_at_most_one_checkpoint_interval(tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    home = tmp_path / "home"
    daemon = volunteer_daemon.start(home, "--num-experts", "1", "--set", "checkpoint_interval_s=1")
    uid = next(iter(call(home, "status")["experts"]))
    train(uid, daemon.endpoint, steps=4)
    # a periodic checkpoint (no leave involved) picks the updates up within one interval
    wait_for(lambda: ((call(home, "status")["checkpoints"]["last"] or {}).get("updates_applied") or {}).get(uid) == 4,
             timeout=30, what="a periodic checkpoint with 4 updates")
    daemon.kill()
    assert (home / "control.json").exists()  # left behind by the killed daemon
    assert run_cli("status", "--home", str(home)).returncode == 3  # ... and recognised as stale
    volunteer_daemon.start(home, "--num-experts", "1")
    assert call(home, "status")["experts"][uid]["updates_applied"] == 4


def test_changed_architecture_is_not_loaded_silently(tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    home = tmp_path / "home"
    daemon = volunteer_daemon.start(home, "--num-experts", "1")
    uid = next(iter(call(home, "status")["experts"]))
    assert run_cli("leave", "--home", str(home)).returncode == 0
    daemon.wait_exit(30)
    wider = tmp_path / "wider.yaml"
    wider.write_text((Path(__file__).parents[2] / "configs" / "demo.yaml").read_text().replace("hidden_dim: 64",
                                                                                               "hidden_dim: 32"))
    again = volunteer_daemon.start(home, "--num-experts", "1", experiment=str(wider))
    assert f"not loading {uid}" in again.output() and "fingerprint" in again.output()
    snap = call(home, "status")
    assert snap["experts"][uid]["resumed_from_updates"] is None
    assert any("mismatch" in p for p in snap["checkpoints"]["set_aside"])


def _read_pty(fd: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> str:
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks).decode(errors="replace")


def status_on_tty(home: Path, no_color: bool) -> str:
    env = cli_env(TERM="xterm-256color", COLUMNS="120")
    if not no_color:
        env.pop("NO_COLOR")
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "volunteer", "status", "--once", "--home", str(home)],
                            stdout=terminal, stderr=terminal, stdin=subprocess.DEVNULL, env=env)
    os.close(terminal)
    try:
        text = _read_pty(controller, proc)
        assert proc.wait(timeout=60) == 0, text
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
    return text
