"""The replicas section of the status views: per hosted uid its replicas and divergence."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from volunteer.status.dashboard import render_dashboard
from volunteer.status.plain import render_plain
from volunteer.status.replicas_view import divergence_text, replica_rows


def snapshot(**replicas: Any) -> dict[str, Any]:
    base = {
        "enabled": True, "period_s": 30.0, "alpha": 0.5, "rounds": 7, "last_round_at": 1.0, "lookup_errors": 1,
        "uids": {
            "d.ffn.0.1": {"replicas": ["peerA", "peerB"], "replica_count": 2, "last_divergence": 0.0123,
                          "exchanges_ok": 5, "exchanges_failed": 2, "failures": {"timeout": 1, "unreachable": 1},
                          "inbound_ok": 4, "inbound_refused": {}, "last_exchange_at": 1.0,
                          "last_exchange_age_s": 12.0, "last_peer": "peerA"},
            "d.ffn.0.2": {"replicas": [], "replica_count": 0, "last_divergence": None, "exchanges_ok": 0,
                          "exchanges_failed": 0, "failures": {}, "inbound_ok": 0, "last_exchange_at": None,
                          "last_exchange_age_s": None},
            "d.ffn.0.3": {"replicas": ["peerA"], "replica_count": 1, "last_divergence": 2e-7, "exchanges_ok": 1,
                          "exchanges_failed": 0, "failures": {}, "inbound_ok": 0, "last_exchange_age_s": None},
        },
    }
    base.update(replicas)
    return {"state": "serving", "replicas": base, "experts": {}, "totals": {}, "health": {"level": "ok"}}


def test_rows_show_replicas_divergence_and_exchanges() -> None:
    rows = dict(replica_rows(snapshot()))
    assert rows["averaging"] == ("elastic, every 30s with a random other holder, alpha 0.5; 7 round(s), "
                                 "1 failed DHT read(s)")
    assert rows["d.ffn.0.1"] == ("2 other replica(s); divergence 0.0123; 5 exchange(s), 2 failed "
                                 "(timeout=1, unreachable=1), 4 answered; last 12s ago")
    assert rows["d.ffn.0.2"] == "no other replica: nothing to average"
    assert "divergence 2e-07" in rows["d.ffn.0.3"] and "last never" in rows["d.ffn.0.3"]
    assert divergence_text(None) == "n/a" and divergence_text(0) == "0.0000" and divergence_text(True) == "n/a"


def test_stopped_failed_missing_and_odd_sections() -> None:
    assert replica_rows({}) == [] and replica_rows({"replicas": None}) == [] and replica_rows({"replicas": 3}) == []
    assert replica_rows(snapshot(enabled=False)) == [("averaging", "stopped (this node is leaving)")]
    assert replica_rows({"replicas": {"error": "RuntimeError: x"}}) == [("averaging", "failed: RuntimeError: x")]
    rows = replica_rows({"replicas": {"period_s": "x", "uids": {"u": "garbage", "v": {"replicas": "no"}}}})
    assert rows and all(isinstance(v, str) for _k, v in rows)


def test_plain_and_dashboard_show_the_section() -> None:
    snap = snapshot()
    text = render_plain(snap)
    assert "replicas\n" in text and "divergence 0.0123" in text
    console = Console(width=160, record=True, color_system=None)
    console.print(render_dashboard(snap))
    rich_text = console.export_text()
    assert "replicas" in rich_text and "2 other replica(s); divergence 0.0123" in rich_text
    assert "replicas\n" not in render_plain({"state": "serving"})
