"""scripts/demo_trainer.py as a real process against a real expert server on loopback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from volunteer.manifest import load_manifest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "demo_trainer.py"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(150)
def test_demo_trainer_learns_digits(expert_servers):
    manifest = load_manifest("demo")
    server = expert_servers(list(manifest.grid.uids()), manifest.expert.hidden_dim)
    proc = _run("--endpoint", server.endpoint, "--steps", "60", "--log-every", "20", "--k-best", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"found {manifest.grid.size} experts")
    assert [ln.split()[1] for ln in lines if ln.startswith("step ")] == ["20", "40", "60"]
    final = re.search(r"final: steps=60 first_loss=([\d.]+) last_loss=([\d.]+) test_acc=([\d.]+)", proc.stdout)
    assert final, proc.stdout
    first, last, acc = map(float, final.groups())
    assert last < 0.5 * first
    assert acc > 0.5  # chance is 0.1
    assert sum(s["updates_applied"] for s in server.runtime.stats().values()) >= 60


@pytest.mark.timeout(60)
def test_demo_trainer_reports_unreachable_experts_in_one_line(dead_endpoint):
    proc = _run("--endpoint", dead_endpoint, "--timeout", "0.5", "--steps", "1")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: no expert of grid 'demo.ffn' reachable")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""


def test_demo_trainer_requires_an_endpoint():
    proc = _run("--steps", "1")
    assert proc.returncode == 2
    assert "--endpoint" in proc.stderr
