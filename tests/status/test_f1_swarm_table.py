"""``volunteer swarm``'s tables pad both edges of every cell (like the other tables) and still
fit 80 columns with long uids, many versions and several replicas."""

from __future__ import annotations

import io

from rich.console import Console

from volunteer.status.swarm_table import render_swarm

PEERS = [f"12D3KooW{c * 40}{c.lower() * 6}" for c in "ABCD"]
SUMMARY = {
    "experiment": "demo", "totals": {"volunteers": 4, "uids": 2, "served": 2, "unserved": 0, "replicas": 5},
    "reachability": {"public": 4},
    "volunteers": [{"peer_id": p, "reachability": "public", "state": "serving", "load": 0.25, "free": 3, "uids": 2}
                   for p in PEERS],
    "uids": [{"uid": "demo.ffn.0.0", "replicas": [{"peer_id": PEERS[0], "version": 7, "load": 0.1,
                                                   "state": "serving"}]},
             {"uid": "an-experiment-with-a-long-name.ffn.12.345",
              "replicas": [{"peer_id": p, "version": 1000 + i, "load": 0.5, "state": "serving"}
                           for i, p in enumerate(PEERS)]}],
    "unserved": [],
}


def test_cells_are_padded_on_both_edges_and_fit_80_columns() -> None:
    out = io.StringIO()
    Console(file=out, width=80, no_color=True, force_terminal=False).print(render_swarm(SUMMARY))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line for line in lines if line[:1] in ("┃", "│")]
    assert rows and all(line.startswith(("┃ ", "│ ")) and line.endswith((" ┃", " │")) for line in rows), rows
    assert any(line.startswith("┃ peer ") for line in rows) and any(line.startswith("│ 12D3…aaaaaa ") for line in rows)
    for peer in PEERS:
        assert f"12D3…{peer[-6:]}" in out.getvalue()
