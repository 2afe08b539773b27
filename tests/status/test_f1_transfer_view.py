"""The transfer caps and today's transfer show in the plain status and the dashboard, not only
in ``--json`` (``volunteer.status.transfer_view``)."""

from __future__ import annotations

import io
from datetime import datetime, timezone

from rich.console import Console

from volunteer.status.dashboard import render_dashboard
from volunteer.status.plain import render_plain
from volunteer.status.transfer_view import transfer_text

MIDNIGHT = datetime(2026, 11, 29, tzinfo=timezone.utc).timestamp()
CAPPED = {"upload_bytes_per_s": 2_000_000, "download_bytes_per_s": None, "day": "2026-11-28",
          "bytes_in": 200_000_000, "bytes_out": 1_000_000_000, "bytes": 1_200_000_000, "cap": 5_000_000_000,
          "resets_at": MIDNIGHT}
LINE = "up ≤ 2.0 MB/s, down unlimited; today 1.2 GB of 5.0 GB (resets 00:00 UTC)"


def test_transfer_text() -> None:
    assert transfer_text({"transfer": CAPPED}) == LINE
    rates = {"upload_bytes_per_s": 2_000_000.0, "download_bytes_per_s": 500_000.0}
    assert transfer_text({"transfer": rates}) == "up ≤ 2.0 MB/s, down ≤ 500.0 kB/s"
    assert transfer_text({"transfer": {**rates, "bytes": 10, "cap": 0}}).endswith("; today 10 B (no daily cap)")
    for odd in ({}, {"transfer": None}, {"transfer": "x"}, {"transfer": {"bytes": "x", "cap": None}}):
        assert transfer_text(odd) is None


def test_plain_and_dashboard_show_the_transfer_line() -> None:
    snap = {"state": "serving", "transfer": CAPPED}
    assert f"transfer    {LINE}" in render_plain(snap).splitlines()
    out = io.StringIO()
    Console(file=out, width=120, no_color=True).print(render_dashboard(snap))
    assert "transfer" in out.getvalue() and "1.2 GB of 5.0 GB" in out.getvalue()
    assert "transfer" not in render_plain({"state": "serving"})
