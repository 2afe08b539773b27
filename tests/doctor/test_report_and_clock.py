"""The doctor's report (verdicts, exit semantics, rendering) and the clock-skew rule (pure)."""

from __future__ import annotations

import time

import pytest

from tests.doctor.helpers import entry
from volunteer.doctor.clock import check_clock, peer_skews, swarm_skew
from volunteer.doctor.report import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    Report,
    failed,
    ok,
    render_text,
    warn,
)


def test_report_can_serve_only_without_failures_and_renders_the_fix_whole() -> None:
    report = Report("demo", "/h")
    report.add(ok("python", "Python 3.11"), warn("disk", "little space", "free space"))
    assert report.can_serve
    addr = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWJik9SDvQrdNggBWJZTXzTskZdQ2AKc63QrK74iMwMbEx"
    report.add(failed("bootstrap", f"connection refused at 203.0.113.7:4001 ({addr})", f"pass --bootstrap {addr}"))
    assert not report.can_serve
    doc = report.as_json()
    assert doc["can_serve"] is False and doc["counts"] == {OK: 1, WARN: 1, FAIL: 1, SKIP: 0}
    assert [c["verdict"] for c in doc["checks"]] == [OK, WARN, FAIL]
    text = render_text(report, width=80)
    assert addr in text  # never broken across lines: it is what the user copies
    assert "fix: free space" in text and text.splitlines()[-1].startswith("verdict: this node cannot serve")
    with pytest.raises(ValueError):
        Check("x", "maybe", "?")


def test_clock_skew_interval_from_record_timestamps() -> None:
    now = time.time()
    skews = peer_skews([entry("A", "demo.ffn.", ("0",), announced=now - 5),
                        entry("A", "demo.ffn.0.", ("1",), announced=now - 20, seq_bump=-1),  # older: ignored
                        entry("B", "demo.ffn.", ("1",), announced=now + 100)], now)
    by_peer = {s.peer_id: s for s in skews}
    assert by_peer["A"].lo == pytest.approx(-5, abs=0.01) and by_peer["A"].hi == pytest.approx(25, abs=0.01)
    assert by_peer["B"].lo == pytest.approx(100, abs=0.01)
    assert check_clock([], 60).verdict == SKIP


def test_clock_verdicts_follow_the_median_peer() -> None:
    now = time.time()
    honest = [entry(p, "demo.ffn.", ("0",), announced=now - 1) for p in ("A", "B", "C")]
    liar = entry("D", "demo.ffn.", ("0",), announced=now + 3000)
    skews = peer_skews([*honest, liar], now)
    assert check_clock(skews, 60).verdict == OK  # one peer's clock cannot move the verdict
    behind = peer_skews([entry(p, "demo.ffn.", ("0",), announced=now + 120) for p in "ABC"], now)
    assert swarm_skew(behind)[0] == pytest.approx(120, abs=0.01)
    verdict = check_clock(behind, 60)
    assert verdict.verdict == FAIL and "behind the swarm" in verdict.detail and "NTP" in verdict.fix
    slightly = peer_skews([entry(p, "demo.ffn.", ("0",), announced=now + 20) for p in "ABC"], now)
    assert check_clock(slightly, 60).verdict == WARN
    ahead = peer_skews([entry(p, "demo.ffn.", ("0",), announced=now - 50) for p in "ABC"], now)
    assert check_clock(ahead, 60).verdict == WARN  # ahead by 20..50 s: worth fixing, records still kept
