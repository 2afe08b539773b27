"""The swarm census and its summary: every uid, replicas one per peer, unserved uids, the
reachability mix, bounded lookups (a hung or failing DHT lookup is a hole, not a hang), and
the table at 80 columns."""

from __future__ import annotations

import io
import time
from typing import Any

import trio
from rich.console import Console

from tests.doctor.helpers import entry
from volunteer.doctor.census import Census, parent_prefixes, read_grid
from volunteer.doctor.swarm_summary import summarise
from volunteer.net.records import ServerEntry
from volunteer.status.swarm_table import render_swarm

A = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAaaaaaa"
B = "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBbbbbbb"
C = "12D3KooWCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCcccccc"
RELAY = "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRrrrrrr"


class FakeRegistry:
    """``lookup(prefix)`` from a table; one prefix hangs, one raises (both must not stall)."""

    def __init__(self, table: dict[str, list[ServerEntry]], hang: str = "", boom: str = "") -> None:
        self.table, self.hang, self.boom = table, hang, boom

    async def lookup(self, prefix: str) -> list[ServerEntry]:
        if prefix == self.hang:
            await trio.sleep_forever()
        if prefix == self.boom:
            raise RuntimeError("DHT peer reset the stream")
        await trio.sleep(0)
        return self.table.get(prefix, [])


def _census() -> Census:
    table = {
        "demo.ffn.0.": [entry(A, "demo.ffn.0.", ("0", "1"), version=7),
                        entry(B, "demo.ffn.0.", ("1",), version=5, reachability="private",
                              addrs=(f"{RELAY}/p2p-circuit/p2p/{B}",)),
                        entry(C, "demo.ffn.0.", ("1",), state="draining", reachability="unknown"),
                        # the same peer twice (an older entry): one replica, not two
                        entry(A, "demo.ffn.0.", ("0",), version=6, announced=time.time() - 10)],
        "demo.ffn.1.": [],
    }
    return trio.run(read_grid, FakeRegistry(table), "demo.ffn", (2, 4), 5.0)


def test_summary_lists_every_uid_its_replicas_and_the_unserved() -> None:
    summary = summarise(_census(), "demo")
    uids = {u["uid"]: u["replicas"] for u in summary["uids"]}
    assert list(uids) == [f"demo.ffn.{i}.{j}" for i in range(2) for j in range(4)]
    assert [(r["peer_id"], r["version"]) for r in uids["demo.ffn.0.0"]] == [(A, 7)]
    assert {r["peer_id"] for r in uids["demo.ffn.0.1"]} == {A, B, C}
    assert summary["unserved"] == ["demo.ffn.0.2", "demo.ffn.0.3", "demo.ffn.1.0", "demo.ffn.1.1",
                                   "demo.ffn.1.2", "demo.ffn.1.3"]
    assert summary["reachability"] == {"public": 1, "relayed": 1, "private": 0, "unknown": 1}
    assert summary["totals"] == {"volunteers": 3, "uids": 8, "served": 2, "unserved": 6, "replicas": 4,
                                 "draining": 1}


def test_a_uid_served_only_by_a_draining_peer_counts_as_unserved() -> None:
    census = Census("demo.ffn", (1, 2), {"demo.ffn.0.0": [entry(A, "demo.ffn.0.", ("0",), state="draining")],
                                         "demo.ffn.0.1": []})
    assert summarise(census, "demo")["unserved"] == ["demo.ffn.0.0", "demo.ffn.0.1"]


def test_hung_and_failing_lookups_leave_holes_not_hangs() -> None:
    registry = FakeRegistry({"demo.ffn.0.": [entry(A, "demo.ffn.0.", ("0",))]}, hang="demo.ffn.1.",
                            boom="demo.ffn.2.")
    census = trio.run(read_grid, registry, "demo.ffn", (3, 2), 0.2)
    assert census.unanswered == ["demo.ffn.1.", "demo.ffn.2."]
    assert census.entries["demo.ffn.0.0"] and census.entries["demo.ffn.1.0"] == []


def test_parent_prefixes_cover_the_grid_and_are_capped() -> None:
    assert parent_prefixes("p", (3,)) == [("p.", ["p.0", "p.1", "p.2"])]
    assert [p for p, _ in parent_prefixes("p", (2, 2, 2))] == ["p.0.0.", "p.0.1.", "p.1.0.", "p.1.1."]
    assert len(parent_prefixes("p", (4096, 2))) == 1024


def test_table_fits_80_columns_and_names_unserved_uids() -> None:
    summary = summarise(_census(), "demo")
    out = io.StringIO()
    Console(file=out, width=80, no_color=True, force_terminal=False).print(render_swarm(summary))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "3 volunteer(s) (public 1, relayed 1, private 0, unknown 1)\ngrid: 8 uids, 2 served, 6 unserved" in text
    assert "demo.ffn.0.1" in text and "unserved (6): demo.ffn.0.2" in text
    for peer in (A, B, C):
        assert peer[:4] + "…" + peer[-6:] in text


def test_odd_values_render_without_raising() -> None:
    odd: dict[str, Any] = {"experiment": "x", "volunteers": [{"peer_id": None, "load": "high"}],
                           "uids": [{"uid": "x.0", "replicas": [{"peer_id": 1, "version": None, "load": None}]}]}
    Console(file=io.StringIO(), width=80).print(render_swarm(odd))
