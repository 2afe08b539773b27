"""The shards section of the status views: rows, download bars, odd values, the live line."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from volunteer.daemon.snapshot import live_line_text
from volunteer.status.dashboard import render_dashboard
from volunteer.status.plain import render_plain
from volunteer.status.shards_view import bar, download_line, shard_rows


def snapshot(**shards: Any) -> dict[str, Any]:
    base = {
        "replication": 2, "capacity": 4, "free": 1, "moves": 3,
        "hosted": {
            "d.ffn.0.1": {"state": "serving", "version": 12, "root": "ab" * 8, "weights_from": "downloaded v10 from "
                          "2 holder(s)", "reason": "1 of 2 replicas", "replica_versions": {"peerA": 15},
                          "version_spread": 3},
            "d.ffn.0.2": {"state": "downloading", "version": None, "root": None, "weights_from": None,
                          "reason": "unserved", "replica_versions": {}, "version_spread": 0},
        },
        "dropped": {"d.ffn.1.1": "over-covered (3 other replicas) -> moved to d.ffn.0.2 (unserved)"},
        "downloads": {"d.ffn.0.2": {"state": "downloading", "fraction": 0.5, "have_bytes": 2**20,
                                    "total_bytes": 2**21, "mb_per_s": 42.0, "sources": {"a": 3, "b": 4},
                                    "resumed_bytes": 4096, "bad_sources": ["c"]}},
        "cache": {"directory": "/h/cache/shards/d", "bytes": 3 * 2**20, "max_bytes": 2**30},
    }
    base.update(shards)
    return {"state": "serving", "shards": base, "experts": {}, "totals": {}, "health": {"level": "ok"}}


def test_rows_say_why_where_from_and_how_far_replicas_are_apart() -> None:
    rows = dict(shard_rows(snapshot()))
    assert "target 2 per uid" in rows["replication"] and "(1 free; bound: n/a)" in rows["replication"]
    assert "weights downloaded v10 from 2 holder(s)" in rows["d.ffn.0.1"]
    assert "why: 1 of 2 replicas" in rows["d.ffn.0.1"] and "spread 3" in rows["d.ffn.0.1"]
    assert "no other replica" in rows["d.ffn.0.2"]
    dl = rows["download d.ffn.0.2"]
    assert dl.startswith("[##########----------]  50%") and "2 holder(s)" in dl
    assert "resumed 4.0 KiB" in dl and "1 bad holder(s) dropped" in dl
    assert "moved to d.ffn.0.2" in rows["dropped d.ffn.1.1"]
    assert "3.0 MiB of 1.0 GiB" in rows["shard cache"]


def test_odd_values_render_and_missing_section_gives_no_rows() -> None:
    assert shard_rows({}) == [] and shard_rows({"shards": "garbage"}) == []
    rows = shard_rows({"shards": {"hosted": {"u": "x"}, "downloads": {"u": {"state": "downloading"}}}})
    assert rows and all(isinstance(v, str) for _k, v in rows)
    assert bar(None) == "[--------------------]   0%" and bar(7.0).endswith("100%")


def test_plain_dashboard_and_live_line_show_downloads() -> None:
    snap = snapshot()
    text = render_plain(snap)
    assert "shards\n" in text and "download d.ffn.0.2" in text
    console = Console(width=140, record=True, color_system=None)
    console.print(render_dashboard(snap))
    rich_text = console.export_text()
    assert "shards" in rich_text and "d.ffn.0.1" in rich_text and "[##########----------]  50%" in rich_text
    assert download_line(snap).startswith("downloading d.ffn.0.2 [##########")
    assert "downloading d.ffn.0.2" in live_line_text(snap)
    idle = snapshot(downloads={})
    assert download_line(idle) == "" and "downloading" not in live_line_text(idle)
