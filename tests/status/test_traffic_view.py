"""``volunteer status`` shows each expert's wire traffic (bytes in / out with their rates) and
the experiment's default wire compression; older snapshots without them still render."""

from __future__ import annotations

import copy
import io

from rich.console import Console

from tests.status.test_render import SNAPSHOT
from volunteer.status import fmt
from volunteer.status.dashboard import render_dashboard
from volunteer.status.plain import expert_rows, render_plain


def with_traffic() -> dict:
    snap = copy.deepcopy(SNAPSHOT)
    snap["experts"]["demo.ffn.1.0"].update(bytes_in=340 * 2**20, bytes_in_per_s=1.5 * 2**20,
                                           bytes_out=2048, bytes_out_per_s=0.0)
    snap["experiment"]["wire"] = {"compression": "int8"}
    return snap


def test_rows_carry_bytes_in_and_out_with_rates() -> None:
    rows = {r["uid"]: r for r in expert_rows(with_traffic())}
    assert rows["demo.ffn.1.0"]["in"] == "340.0 MiB (1.5 MiB/s)"
    assert rows["demo.ffn.1.0"]["out"] == "2.0 KiB (0 B/s)"
    assert rows["demo.ffn.0.0"]["in"] == rows["demo.ffn.0.0"]["out"] == "n/a"  # older daemon


def test_plain_and_dashboard_show_traffic_and_the_default_wire() -> None:
    snap = with_traffic()
    text = render_plain(snap)
    header = next(line for line in text.splitlines() if line.startswith("uid"))
    assert header.split()[-3:] == ["in", "out", "errors"]
    assert "340.0 MiB (1.5 MiB/s)" in text and "wire int8" in text
    out = io.StringIO()
    Console(file=out, width=200, no_color=True).print(render_dashboard(snap))
    for fragment in ("340.0 MiB (1.5 MiB/s)", "2.0 KiB (0 B/s)", "wire int8"):
        assert fragment in out.getvalue(), fragment


def test_no_wire_text_without_a_default_and_odd_values_never_raise() -> None:
    assert "wire" not in render_plain(SNAPSHOT).split("\n")[1]
    assert fmt.wire_text({"wire": {"compression": None}}) == ""
    assert fmt.wire_text({"wire": "bf16"}) == ""
    assert fmt.traffic("many", 3) == "n/a" and fmt.traffic(10, None) == "10 B"
    empty = copy.deepcopy(SNAPSHOT)
    empty["experts"] = {}
    out = io.StringIO()
    Console(file=out, width=200, no_color=True).print(render_dashboard(empty))
    assert "none hosted" in out.getvalue()
