"""``ContributionLedger``: deltas of the runtime counters, kept across restarts, and a
corrupt file set aside with a warning (never a crash)."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from volunteer.daemon.contribution import ContributionError, ContributionLedger, load_totals


def test_counts_only_progress_and_survives_a_restart(tmp_path: Path) -> None:
    ledger = ContributionLedger(tmp_path, "exp", clock=lambda: 100.0)
    # first sight of an expert resumed at 50 updates: only the updates made here count
    ledger.observe({"u.0": {"samples": 10, "updates_applied": 50, "bytes_out": 100}}, 1.0)
    ledger.observe({"u.0": {"samples": 30, "updates_applied": 53, "bytes_out": 300},
                    "u.1": {"samples": 5, "updates_applied": 0, "bytes_out": 10}}, 2.0)
    ledger.observe({"u.1": {"samples": 2, "updates_applied": 1, "bytes_out": 20}}, float("nan"))  # restarted counters
    assert ledger.section() == {"experiment": "exp", "samples": 35, "updates": 4, "uptime_s": 3.0,
                                "bytes_served": 320, "since": 100.0}
    ledger.save()
    assert stat.S_IMODE((tmp_path / "contribution.json").stat().st_mode) == 0o600
    again = ContributionLedger(tmp_path, "exp", clock=lambda: 200.0)
    assert again.section() == ledger.section()
    other = ContributionLedger(tmp_path, "second", clock=lambda: 300.0)
    other.save()
    assert load_totals(tmp_path)["experiment"] == "second"  # the last one served
    assert load_totals(tmp_path, "exp")["samples"] == 35
    with pytest.raises(ContributionError, match="recorded: exp, second"):
        load_totals(tmp_path, "nope")


@pytest.mark.parametrize("garbage", [b"{not json", b"[]", json.dumps({"version": 1, "experiments": {
    "exp": {"samples": -5}}}).encode(), b"\xff\xfe", json.dumps({"version": 9}).encode()])
def test_corrupt_file_is_set_aside_and_counting_starts_fresh(tmp_path: Path, garbage: bytes,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "contribution.json").write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        ledger = ContributionLedger(tmp_path, "exp", clock=lambda: 5.0)
    assert "unreadable" in caplog.text and "counting afresh" in caplog.text
    assert ledger.section()["samples"] == 0
    assert (tmp_path / "contribution.json.corrupt").read_bytes() == garbage
    ledger.save()
    assert load_totals(tmp_path)["since"] == 5.0
    (tmp_path / "contribution.json").write_bytes(garbage)
    with pytest.raises(ContributionError, match="unreadable"):
        load_totals(tmp_path)


def test_missing_home_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ContributionError, match="no contribution recorded"):
        load_totals(tmp_path)
