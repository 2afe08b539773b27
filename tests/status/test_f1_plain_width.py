"""The plain status fits the terminal's width (``COLUMNS``, or the terminal behind a pipe):
long lines wrap under their value column, the experts table leaves out low-value columns,
and the addresses to copy (and any other single word) are never cut."""

from __future__ import annotations

import pytest

from tests.status.test_render import NETWORK, SNAPSHOT
from volunteer.cli.status import plain_width
from volunteer.status.network_view import copy_addresses
from volunteer.status.plain import render_plain
from volunteer.status.plain_fit import fit_lines, table_lines

LONG_ADDR = "/ip4/203.0.113.77/tcp/40001/p2p/12D3KooWKkdx6XSmkqYV1scf4L82io8b117jkZ9Z2z6WH2esS7gr"
WHY = ("Reachability unknown: no bootstrap/relay peer answered the dial-back check. Check that the "
       "bootstrap peers (addresses from the --bootstrap flag) are up and that outbound TCP is allowed.")
SNAP = dict(SNAPSHOT, network=dict(NETWORK, addrs=[LONG_ADDR], reachability="unknown", nat={"advice": WHY}),
            device=dict(SNAPSHOT["device"], description="cpu (AMD EPYC 7B13 64-Core Processor, 2 threads)"))


@pytest.mark.parametrize("width", [60, 80, 120])
def test_lines_fit_the_width_and_nothing_is_lost(width: int) -> None:
    text = render_plain(SNAP, width)
    lines = text.splitlines()
    assert LONG_ADDR in lines  # whole, on a line of its own
    assert all(len(line) <= width or line.strip() in (LONG_ADDR, "12D3KooWTest") or " " not in line.strip()
               for line in lines), [line for line in lines if len(line) > width]
    advice = lines.index(next(line for line in lines if line.lstrip().startswith("advice")))
    block = [lines[advice]] + [line for line in lines[advice + 1:advice + 6] if line.startswith(" " * 10)]
    assert " ".join(" ".join(block).split()[1:]).startswith(WHY)  # wrapped between words, in order
    assert all(line.startswith(" " * 16) for line in block[1:])  # under the value column
    header = next(line for line in lines if line.startswith("uid"))
    assert header.split()[:2] == ["uid", "req/s"] and "errors" in header and "updates" in header


def test_without_a_width_every_line_stays_whole() -> None:
    lines = render_plain(SNAP).splitlines()
    assert any(len(line) > 120 for line in lines)
    assert f"  advice        {WHY}" in lines


def test_table_leaves_out_low_value_columns_first() -> None:
    rows = [{"uid": "demo.ffn.0.0", "req/s": "1.0", "in": "1.0 MiB (2 B/s)", "out": "1.0 MiB (2 B/s)",
             "errors": "overloaded=3"}]
    assert table_lines(rows, None)[0].split() == ["uid", "req/s", "in", "out", "errors"]
    assert table_lines(rows, 50)[0].split() == ["uid", "req/s", "out", "errors"]
    assert table_lines(rows, 40)[0].split() == ["uid", "req/s", "errors"]
    assert fit_lines([LONG_ADDR], 40, keep=[]) == [LONG_ADDR]


def test_width_comes_from_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert plain_width() == 80
    monkeypatch.setenv("COLUMNS", "junk")
    assert plain_width() is None or plain_width() > 0
    assert LONG_ADDR in copy_addresses(SNAP)
