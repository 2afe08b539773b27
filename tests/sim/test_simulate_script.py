"""``scripts/simulate_swarm.py --preset smoke`` as CI runs it: a real subprocess, exit 0, a
JSON whose rows carry the figures issue 13 asks for, and the PNG plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("peers", "lookup_hops_p50", "lookup_hops_p99", "lookup_ms_p50", "lookup_ms_p99",
            "lookup_success", "lookup_success_churn", "dht_msgs_per_volunteer_per_min",
            "discoverable_servers_fraction")


def test_smoke_preset_writes_rows_and_plots(tmp_path):
    out = tmp_path / "sim.json"
    plots = tmp_path / "plots"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate_swarm.py"), "--preset", "smoke",
         "--json", str(out), "--plots", str(plots), "--seed", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["preset"] == "smoke" and report["seed"] == 3
    assert report["assumptions"]["product_constants"]["replication"] >= 1
    assert [r["peers"] for r in report["rows"]] == [100]
    for row in report["rows"]:
        assert all(k in row for k in REQUIRED), sorted(set(REQUIRED) - set(row))
        assert row["lookup_hops_p50"] >= 1 and row["lookup_ms_p50"] > 0
        assert row["dht_msgs_per_volunteer_per_min"] > 0
    beams = report["beam_by_grid"]  # beam search vs grid size: more uids, more lookups per step
    assert [b["grid"] for b in beams] == ["4x4", "8x8"] and all(b["peers"] == 100 for b in beams)
    assert beams[0]["beam_lookups_per_step"] < beams[1]["beam_lookups_per_step"]
    for name in ("lookup_hops.png", "lookup_latency.png", "lookup_success.png",
                 "registry_discoverable.png", "beam_by_grid.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_names_the_presets():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "simulate_swarm.py"), "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "smoke" in proc.stdout and "--seed" in proc.stdout and "--plots" in proc.stdout
