"""``volunteer swarm``'s tables: the swarm summary laid out for an 80-column terminal (rich).

``render_swarm(summary)`` takes the dict of ``volunteer.doctor.swarm_summary.summarise`` and
returns a rich ``Group``: a two-line headline (volunteers and their reachability mix, uids served
and unserved, replicas), a volunteers table (peer, reach, state, load, free slots, uids), an
experts table (uid, replicas, versions, highest load, who serves it) and the uids nobody
serves. Peer ids are abbreviated to ``12D3…last6`` (the full ids are in ``--json``); long
tables are cut at ``max_rows`` with a line saying how many rows were left out. Input is
peer-supplied (already bounded by the record reader); odd values render as ``?``.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

MAX_ROWS = 200
PEER_HEAD = 4
PEER_TAIL = 6


def short_peer(peer_id: Any) -> str:
    """``12D3…a1b2c3``: enough to tell peers apart in a table."""
    text = str(peer_id)
    if len(text) <= PEER_HEAD + PEER_TAIL + 1:
        return text
    return f"{text[:PEER_HEAD]}…{text[-PEER_TAIL:]}"


def _load(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def headline(summary: dict[str, Any]) -> str:
    """Two lines: who is there, and how much of the grid they serve."""
    t = summary.get("totals", {})
    mix = summary.get("reachability", {})
    mix_text = ", ".join(f"{k} {mix.get(k, 0)}" for k in ("public", "relayed", "private", "unknown"))
    return (f"swarm {summary.get('experiment', '?')}: {t.get('volunteers', 0)} volunteer(s) ({mix_text})\n"
            f"grid: {t.get('uids', 0)} uids, {t.get('served', 0)} served, {t.get('unserved', 0)} unserved; "
            f"{t.get('replicas', 0)} replica(s)")


def volunteers_table(summary: dict[str, Any], max_rows: int = MAX_ROWS) -> Table:
    table = Table(title="volunteers", title_justify="left", expand=False)
    for name, justify in (("peer", "left"), ("reach", "left"), ("state", "left"), ("load", "right"),
                          ("free", "right"), ("uids", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for v in summary.get("volunteers", [])[:max_rows]:
        table.add_row(short_peer(v.get("peer_id")), str(v.get("reachability", "?")), str(v.get("state", "?")),
                      _load(v.get("load")), str(v.get("free", "?")), str(v.get("uids", "?")))
    return table


def experts_table(summary: dict[str, Any], max_rows: int = MAX_ROWS) -> Table:
    table = Table(title="experts (served uids)", title_justify="left", expand=False)
    table.add_column("uid", no_wrap=True, max_width=24, overflow="ellipsis")
    table.add_column("n", justify="right", no_wrap=True)
    table.add_column("versions", no_wrap=True, max_width=16, overflow="ellipsis")
    table.add_column("load", justify="right", no_wrap=True)
    table.add_column("served by", max_width=26, overflow="fold")
    served = [u for u in summary.get("uids", []) if u.get("replicas")]
    for u in served[:max_rows]:
        reps = u["replicas"]
        versions = " ".join(sorted({f"v{r['version']}" if r.get("version") is not None else "v?" for r in reps}))
        loads = [r.get("load") for r in reps if isinstance(r.get("load"), (int, float))]
        peers = ", ".join(short_peer(r.get("peer_id")) + ("" if r.get("state") == "serving" else "(d)")
                          for r in reps)
        table.add_row(str(u.get("uid")), str(len(reps)), versions, _load(max(loads) if loads else None), peers)
    return table


def render_swarm(summary: dict[str, Any], max_rows: int = MAX_ROWS) -> Group:
    """The whole view (see module docstring)."""
    parts: list[Any] = [Text(headline(summary))]
    if summary.get("volunteers"):
        parts.append(volunteers_table(summary, max_rows))
        if len(summary["volunteers"]) > max_rows:
            parts.append(Text(f"… and {len(summary['volunteers']) - max_rows} more volunteers (see --json)"))
        parts.append(experts_table(summary, max_rows))
    else:
        parts.append(Text("no volunteer serves this experiment in the DHT yet"))
    unserved = summary.get("unserved", [])
    if unserved:
        shown = ", ".join(unserved[:max_rows])
        more = f" … and {len(unserved) - max_rows} more" if len(unserved) > max_rows else ""
        parts.append(Text(f"unserved ({len(unserved)}): {shown}{more}"))
    grid = summary.get("grid", {})
    if grid.get("truncated"):
        parts.append(Text(f"note: the grid is large; only the first {grid.get('size')} uids were read"))
    missing = summary.get("lookups", {}).get("unanswered", [])
    if missing:
        parts.append(Text(f"note: {len(missing)} DHT lookup(s) did not answer in time; their uids show as unserved"))
    return Group(*parts)
