"""Status rendering from snapshots: plain text, rich dashboard, network section, odd input."""

from __future__ import annotations

import io
import re

from rich.console import Console

from volunteer.status.dashboard import render_dashboard
from volunteer.status.plain import render_plain

SNAPSHOT = {
    "node": {"pid": 42, "home": "/h", "version": "0.1.0", "uptime_s": 3725},
    "experiment": {"name": "demo", "version": "1", "source": "demo.yaml"},
    "state": "serving",
    "endpoint": "tcp://127.0.0.1:5555",
    "device": {"name": "cpu", "description": "cpu (test)", "utilization_pct": 37.0, "memory_used_bytes": 2**30,
               "memory_total_bytes": 8 * 2**30},
    "system": {"cpu_pct": 50.0, "cpu_count": 2, "ram_used_bytes": 2**31, "ram_total_bytes": 2**33},
    "experts": {
        "demo.ffn.1.0": {"requests_per_s": 12.5, "samples_per_s": 400.0, "mean_batch_size": 32.0, "queue_depth": 3,
                         "latency_ms": {"queue_p50": 1.0, "queue_p99": 5.0, "compute_p50": 2.0, "compute_p99": 20.0},
                         "updates_applied": 17, "errors": {"overloaded": 2}},
        "demo.ffn.0.0": {"updates_applied": 0, "errors": {}},
    },
    "checkpoints": {"interval_s": 300, "last_age_s": 12, "last_error": None},
    "network": None,
    "health": {"level": "idle", "why": "no trainer has sent work for 61s"},
}


def test_plain_has_every_section() -> None:
    text = render_plain(SNAPSHOT)
    for fragment in ("demo v1", "serving", "uptime 1h02m", "tcp://127.0.0.1:5555", "util 37%",
                     "1.0 GiB / 8.0 GiB", "cpu 50% of 2", "last 12s ago", "health      idle: no trainer",
                     "network     not connected", "overloaded=2"):
        assert fragment in text, fragment
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("uid"))
    assert lines[header + 1].startswith("demo.ffn.0.0") and lines[header + 2].startswith("demo.ffn.1.0")
    row = lines[header + 2].split()
    assert row[1:8] == ["12.5", "400", "32.0", "3", "3.0ms", "25ms", "17"]
    assert "\x1b[" not in text


def test_network_section_renders_whatever_the_service_reports() -> None:
    snap = dict(SNAPSHOT, network={"peer_id": "12D3KooW", "reachability": "private",
                                   "peers": {"direct": 3, "relayed": 1, "hole_punched": 2}, "addrs": ["/ip4/1"]})
    text = render_plain(snap)
    assert "peers.hole_punched: 2" in text and "reachability: private" in text and "addrs: /ip4/1" in text
    out = io.StringIO()
    Console(file=out, width=120, no_color=True).print(render_dashboard(snap))
    assert "hole_punched" in out.getvalue() and "not connected" not in out.getvalue()


def test_dashboard_renders_without_colour_codes_when_asked() -> None:
    out = io.StringIO()
    Console(file=out, width=120, force_terminal=True, no_color=True).print(render_dashboard(SNAPSHOT))
    text = out.getvalue()
    assert "demo.ffn.1.0" in text and "not connected" in text and "health: idle" in text
    assert "\x1b[" in text and not colour_codes(text)
    out = io.StringIO()
    Console(file=out, width=120, force_terminal=True, color_system="standard").print(render_dashboard(SNAPSHOT))
    assert colour_codes(out.getvalue())  # the check above can fail: colours appear when allowed


def colour_codes(text: str) -> list[str]:
    """SGR parameters that set a foreground/background colour."""
    params = [p for seq in re.findall(r"\x1b\[([0-9;]*)m", text) for p in seq.split(";") if p]
    return [p for p in params if 30 <= int(p) <= 48 or 90 <= int(p) <= 107]


def test_odd_or_partial_snapshots_do_not_crash() -> None:
    for snap in ({}, {"experts": {"x": "garbage"}, "node": [], "network": "weird"}, {"experts": {"y": {"latency_ms": 5}}}):
        assert "n/a" in render_plain(snap)
        Console(file=io.StringIO(), width=80).print(render_dashboard(snap))
