"""The ``volunteer status`` dashboard at 80 and 200 columns (and widths between): headers
whole, the addresses to copy whole on lines of their own, nothing wider than the terminal,
no stretching on wide terminals; the pause and contribution keys when present, nothing
when absent; the plain view's address, pause and contribution lines.

The snapshot below has the shape ``volunteer.daemon.snapshot.build_snapshot`` produced for
a real ``join demo --new-swarm`` (trimmed to what the views read), with traffic, errors and
a public address of realistic length added.
"""

from __future__ import annotations

import copy
import io
import time
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console

from volunteer.status.dashboard import MAX_WIDTH, print_dashboard
from volunteer.status.experts_table import COLUMNS, experts_table, table_width
from volunteer.status.network_view import COPY_HEADING
from volunteer.status.plain import expert_rows, render_plain

PEER = "12D3KooWBGau1ard4phmaNV6ArUxGP5EWNcpqdYLjhkeW3P6KqKs"
LOOPBACK = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"  # 80 cells
PUBLIC = f"/ip4/203.0.113.45/tcp/40001/p2p/{PEER}"  # 84 cells: wider than an 80-column terminal
CIRCUIT = f"/ip4/198.51.100.7/tcp/4001/p2p/12D3KooWRelayRelayRelay/p2p-circuit/p2p/{PEER}"


def expert(i: int) -> dict[str, Any]:
    return {"requests_per_s": 12.5 * i, "samples_per_s": 400.0 * i, "mean_batch_size": 32.0, "queue_depth": i,
            "latency_ms": {"queue_p50": 1.0, "queue_p99": 5.0, "compute_p50": 2.0, "compute_p99": 20.0},
            "updates_applied": 1700 * i, "bytes_in": 340 * 2**20 * i, "bytes_in_per_s": 1.5 * 2**20,
            "bytes_out": 120 * 2**20 * i, "bytes_out_per_s": 0.5 * 2**20,
            "errors": {"overloaded": 2, "timeout": 1} if i == 3 else {}}


SNAPSHOT: dict[str, Any] = {
    "node": {"home": "/home/ada/.local/share/volunteer", "node_id": "22290e4b6b50b4e8", "pid": 16565,
             "started_at": 1795840329.6, "uptime_s": 7620.4, "version": "0.1.0"},
    "experiment": {"name": "demo", "version": "1", "source": "demo (shipped: volunteer/configs/demo.yaml)",
                   "wire": {"compression": None}},
    "state": "serving",
    "endpoint": "tcp://127.0.0.1:44533",
    "device": {"description": "cpu (AMD EPYC, 2 threads, 23.5 GiB RAM)", "memory_total_bytes": 25276063744,
               "memory_used_bytes": 317554688, "name": "cpu", "torch_threads": 1, "utilization_pct": 0.15},
    "system": {"cpu_count": 2, "cpu_pct": 72.3, "ram_total_bytes": 25276063744, "ram_used_bytes": 1634324480},
    "checkpoints": {"interval_s": 300.0, "last_age_s": 185.0, "last_error": None},
    "health": {"level": "ok", "why": None},
    "experts": {f"demo.ffn.{i // 2}.{i % 2}": expert(i) for i in range(4)},
    "shards": {"cache": {"bytes": 533788, "directory": "/tmp/h1home/cache/shards/demo", "max_bytes": 4294967296},
               "capacity": 4, "capacity_reason": "num_experts=4", "downloads": {}, "dropped": {}, "free": 0,
               "replication": 2, "moves": 0,
               "hosted": {"demo.ffn.0.0": {"reason": "unserved", "replica_versions": {}, "state": "serving",
                                           "version": 0, "weights_from": "fresh (deterministic init)"}}},
    "replicas": {"alpha": 0.5, "enabled": True, "lookup_errors": 0, "period_s": 30.0, "rounds": 0, "uids": {}},
    "network": {"peer_id": PEER, "addrs": [PUBLIC, LOOPBACK], "reachability": "public", "relay": None,
                "relay_addrs": [CIRCUIT], "peers": {"direct": 3, "hole_punched": 0, "relayed": 1},
                "connected_peers": 4, "routing_table": 4,
                "bootstrap": {"attempts": 0, "last_error": None, "peers": 0, "successes": 0},
                "new_swarm": True, "records_announced": 3, "announced_uids": 4, "state": "serving",
                "last_announce_ok": True, "heartbeats": 12, "rpc": {"errors": {}, "requests": 9, "streams_open": 1}},
    "pause": {"paused": True, "reason": "until 18:00 by schedule", "until": None},
    "contribution": {"experiment": "demo", "samples": 1234567, "updates": 8910, "uptime_s": 3 * 86400 + 4 * 3600,
                     "bytes_served": 12 * 2**30, "since": time.mktime((2026, 11, 1, 12, 0, 0, 0, 0, -1))},
}


def render(snapshot: dict[str, Any], width: int) -> list[str]:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    print_dashboard(console, snapshot)
    return console.export_text().splitlines()


def addresses_of(snapshot: dict[str, Any]) -> list[str]:
    return [*snapshot["network"]["addrs"], *snapshot["network"]["relay_addrs"]]


def header_line(lines: list[str]) -> str:
    return next(line for line in lines if "┃ uid" in line)


@pytest.mark.parametrize("width", [80, 200])
def test_headers_whole_addresses_whole_nothing_wider(width: int) -> None:
    lines = render(SNAPSHOT, width)
    text = "\n".join(lines)
    header = [h.strip() for h in header_line(lines).strip("┃").split("┃")]
    assert header[0] == "uid" and "errors" in header and set(header) <= set(COLUMNS), header
    assert "…" not in text  # no header, cell or row cut with an ellipsis
    for addr in addresses_of(SNAPSHOT):
        assert addr in lines, addr  # whole, on a line of its own
    assert lines.index(COPY_HEADING) < lines.index(PUBLIC)
    too_wide = [line for line in lines if cell_len(line) > width]
    assert all(line in addresses_of(SNAPSHOT) for line in too_wide), too_wide  # only what a terminal soft-wraps
    assert (PUBLIC in too_wide) == (width < cell_len(PUBLIC)) and LOOPBACK not in too_wide
    assert "paused: until 18:00 by schedule" in text
    assert "contribution (lifetime)" in text and "demo: 1,234,567 samples, 8,910 updates, 3d 04h serving" in text
    assert "12.0 GiB served" in text and "since 2026-11-01" in text


def test_narrow_terminal_drops_low_value_columns_first_and_says_so() -> None:
    lines = render(SNAPSHOT, 80)
    header = [h.strip() for h in header_line(lines).strip("┃").split("┃")]
    assert {"uid", "req/s", "errors"} <= set(header) and "batch" not in header and "p50" not in header
    assert any(line.startswith("narrow terminal:") and "batch" in line for line in lines)
    row = next(line for line in lines if "demo.ffn.1.1" in line and "│" in line)
    assert "overloaded=2" in row  # the errors column stays


def test_wide_terminal_is_not_stretched() -> None:
    lines = render(SNAPSHOT, 200)
    rows = expert_rows(SNAPSHOT)
    natural = table_width(rows, list(COLUMNS), short=False, wrap_errors=False)
    header = header_line(lines)
    assert cell_len(header) == natural < 200  # the table has every column, at its own width
    assert [h.strip() for h in header.strip("┃").split("┃")] == list(COLUMNS)
    assert "340.0 MiB (1.5 MiB/s)" in "\n".join(lines) and "narrow terminal" not in "\n".join(lines)
    panel_top = next(line for line in lines if line.startswith("╭─ volunteer"))
    assert cell_len(panel_top) == max(MAX_WIDTH, natural)
    others = [line for line in lines if line not in addresses_of(SNAPSHOT)]
    assert max(cell_len(line) for line in others) <= max(MAX_WIDTH, natural)


@pytest.mark.parametrize("width", range(60, 201, 20))
def test_every_width_fits(width: int) -> None:
    lines = render(SNAPSHOT, width)
    assert "…" not in "\n".join(lines)
    assert all(cell_len(line) <= width or line in addresses_of(SNAPSHOT) for line in lines)
    _table, used = experts_table(expert_rows(SNAPSHOT), width)
    assert used <= width and cell_len(header_line(lines)) == used


def test_pause_and_contribution_are_optional() -> None:
    snap = copy.deepcopy(SNAPSHOT)
    del snap["pause"], snap["contribution"]
    for text in ("\n".join(render(snap, 80)), render_plain(snap)):
        assert "paused" not in text and "contribution" not in text
    snap["pause"] = {"paused": False, "reason": None, "until": None}
    snap["contribution"] = "garbage"
    assert "paused" not in render_plain(snap) and "contribution" not in "\n".join(render(snap, 80))
    snap["pause"] = {"paused": True, "reason": "on battery", "until": time.time() + 3600}
    text = render_plain(snap)
    assert "paused: on battery (resumes in 59m" in text or "paused: on battery (resumes in 1h 00m)" in text
    snap["pause"] = {"paused": True, "reason": "paused by you until 14:05", "until": None}
    assert "paused by you until 14:05" in render_plain(snap) and "paused: paused" not in render_plain(snap)


def test_plain_prints_addresses_whole_last_and_pause_and_contribution() -> None:
    lines = render_plain(SNAPSHOT).splitlines()
    assert lines[-4:] == [COPY_HEADING, *addresses_of(SNAPSHOT)]
    state = next(line for line in lines if line.startswith("state"))
    assert "paused: until 18:00 by schedule" in state
    assert any(line.startswith("contribution (lifetime): demo: 1,234,567 samples") for line in lines)
    assert "one of the addresses to copy" in "\n".join(lines)
