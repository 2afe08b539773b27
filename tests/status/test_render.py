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
               "memory_total_bytes": 8 * 2**30, "torch_threads": 1},
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
    for fragment in ("demo v1", "serving", "uptime 1h 02m", "tcp://127.0.0.1:5555", "util 37%",
                     "1.0 GiB / 8.0 GiB", "torch threads 1", "cpu 50% of 2", "last 12s ago", "health      idle: no trainer",
                     "network     not connected", "overloaded=2"):
        assert fragment in text, fragment
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("uid"))
    assert lines[header + 1].startswith("demo.ffn.0.0") and lines[header + 2].startswith("demo.ffn.1.0")
    row = lines[header + 2].split()
    assert row[1:8] == ["12.5", "400", "32.0", "3", "3.0ms", "25ms", "17"]
    assert "\x1b[" not in text


NETWORK = {  # the shape of NetworkService.snapshot()
    "peer_id": "12D3KooWTest", "addrs": ["/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWTest"], "reachability": "private",
    "relay": "12D3KooWRelay", "relay_addrs": ["/ip4/1.2.3.4/tcp/4001/p2p/12D3KooWRelay/p2p-circuit"],
    "peers": {"direct": 3, "relayed": 1, "hole_punched": 2}, "connected_peers": 6, "routing_table": 5,
    "bootstrap": {"peers": 1, "attempts": 2, "successes": 1, "last_error": "timeout"}, "new_swarm": False,
    "records_announced": 12, "announced_uids": 4, "state": "serving", "last_announce_ok": True, "heartbeats": 7,
    "rpc": {"requests": 9, "streams_open": 2, "errors": {"overloaded": 1}},
    "nat": {"advice": "behind a NAT: reachable through relay 12D3KooWRelay"},
}


def test_network_section_shows_peer_addresses_reachability_relay_peers_and_records() -> None:
    snap = dict(SNAPSHOT, network=NETWORK)
    text = render_plain(snap)
    for fragment in ("peer id       12D3KooWTest", "/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWTest", "reachability  private",
                     "relay         12D3KooWRelay (1 circuit address(es))",
                     "6 connected: 3 direct, 1 relayed, 2 hole-punched",
                     "4 expert(s) announced as serving, 12 record(s) written, last announce ok, 7 heartbeat(s)",
                     "1 peer(s) configured, 1 of 2 round(s) succeeded, last error: timeout",
                     "9 request(s) over libp2p", "overloaded=1", "advice        behind a NAT"):
        assert fragment in text, fragment
    assert "not connected" not in text
    out = io.StringIO()
    Console(file=out, width=140, no_color=True).print(render_dashboard(snap))
    for fragment in ("12D3KooWTest", "private", "2 hole-punched", "12 record(s) written"):
        assert fragment in out.getvalue(), fragment
    assert "not connected" not in out.getvalue()
    new = dict(NETWORK, new_swarm=True, reachability="public", relay=None, relay_addrs=[])
    text = render_plain(dict(SNAPSHOT, network=new))
    assert "new swarm (others join with --bootstrap" in text and "none (not needed)" in text
    alone = dict(NETWORK, new_swarm=True, reachability="unknown", connected_peers=0)
    text = render_plain(dict(SNAPSHOT, network=alone))
    assert "unknown (new swarm: no peer has dialled back yet)" in text and "advice" not in text


def test_network_error_and_many_addresses() -> None:
    text = render_plain(dict(SNAPSHOT, network={"error": "RuntimeError: loop stopped"}))
    assert "error  RuntimeError: loop stopped" in text
    many = dict(NETWORK, addrs=[f"/ip4/10.0.0.{i}/tcp/1" for i in range(10)])
    text = render_plain(dict(SNAPSHOT, network=many))
    assert "/ip4/10.0.0.3/tcp/1" in text and "/ip4/10.0.0.4/tcp/1" not in text and "(+6 more)" in text


def test_dashboard_renders_without_colour_codes_when_asked() -> None:
    out = io.StringIO()
    Console(file=out, width=120, force_terminal=True, no_color=True).print(render_dashboard(SNAPSHOT))
    text = out.getvalue()
    assert "demo.ffn.1.0" in text and "not connected" in text and "health: idle" in text
    assert "torch threads 1" in text
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
