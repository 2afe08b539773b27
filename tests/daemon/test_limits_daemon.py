"""A real daemon with the volunteer's transfer limits and metrics switched on: the daily
transfer cap pauses the node (typed "paused" replies, ``status`` names the cap, the count
survives a restart on the same UTC day) and the Prometheus endpoint serves the status
figures of the running node (a taken metrics port stops a second node with one line)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DaemonFactory, cli_env, run_cli
from volunteer.client.remote_expert import RemoteExpert
from volunteer.wire.errors import PausedError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def status(home: Path) -> dict:
    out = run_cli("status", "--json", "--home", str(home))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_daily_transfer_cap_pauses_the_node_and_survives_a_restart(
        tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    home = tmp_path / "home"
    env = cli_env(VOLUNTEER_DAILY_TRANSFER_CAP="1MB", VOLUNTEER_MAX_UPLOAD_RATE="50MB/s")
    daemon = volunteer_daemon.start(home, "--num-experts", "1", env=env)
    snap = status(home)
    assert snap["transfer"]["cap"] == 1_000_000 and snap["transfer"]["upload_bytes_per_s"] == 50_000_000
    uid = next(iter(snap["experts"]))
    expert = RemoteExpert(uid, daemon.endpoint, timeout=30, adaptive=False)
    served = refused = 0
    try:
        deadline = time.monotonic() + 60
        while refused == 0 and time.monotonic() < deadline:  # ~330 KB a step: the cap falls in a few
            try:
                expert(torch.randn(128, 64)).sum().item()
                served += 1
            except PausedError:
                refused += 1
    finally:
        expert.close()
    assert served >= 3 and refused == 1, (served, refused)
    snap = status(home)
    assert snap["pause"]["paused"] and snap["pause"]["rule"] == "transfer_cap"
    assert snap["pause"]["reason"].startswith("daily transfer cap of 1.0 MB reached"), snap["pause"]
    assert snap["transfer"]["bytes"] >= 1_000_000
    out = run_cli("pause", "--json", "--home", str(home))  # the CLI names the setting that rules
    assert run_cli("resume", "--home", str(home)).stdout.count("daily_transfer_cap") == 1, out.stdout
    assert run_cli("leave", "--home", str(home)).returncode == 0
    kept = json.loads((home / "transfer.json").read_text())
    assert kept["bytes_in"] + kept["bytes_out"] >= 1_000_000
    volunteer_daemon.start(home, "--num-experts", "1", env=env)  # same UTC day: still over the cap
    assert status(home)["pause"]["rule"] == "transfer_cap"


def test_metrics_endpoint_serves_the_running_nodes_figures(
        tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    home = tmp_path / "home"
    port = free_port()
    env = cli_env(VOLUNTEER_METRICS_ENABLED="true", VOLUNTEER_METRICS_PORT=str(port))
    daemon = volunteer_daemon.start(home, "--num-experts", "1", env=env)
    uid = next(iter(status(home)["experts"]))
    expert = RemoteExpert(uid, daemon.endpoint, timeout=30, adaptive=False)
    try:
        for _ in range(5):
            expert(torch.randn(8, 64)).sum().item()
    finally:
        expert.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("volunteer_up", ())] == 1.0
    requests = [v for (name, labels), v in samples.items() if name.startswith("volunteer_expert_requests")
                and dict(labels).get("uid") == uid]
    assert requests and max(requests) >= 5, sorted(n for n, _ in samples)

    # a second node on the same metrics port: one line, exit 1, and the first keeps serving
    second = subprocess.run([sys.executable, "-m", "volunteer", "join", "demo", "--home", str(tmp_path / "h2"),
                             "--set", "network_enabled=false", "--set", "selfbench=false"],
                            env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert second.returncode == 1, second.stderr
    errors = [ln for ln in second.stderr.splitlines() if "cannot start" in ln]
    assert len(errors) == 1 and "metrics_port" in errors[0], second.stderr
    assert status(home)["state"] == "serving"
