"""Rich dashboard for ``volunteer status`` on a terminal (rich honours ``NO_COLOR``)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from volunteer.status import fmt
from volunteer.status.network_view import network_rows
from volunteer.status.plain import expert_rows
from volunteer.status.replicas_view import replica_rows
from volunteer.status.shards_view import shard_rows

STATE_STYLE = {"serving": "green", "starting": "yellow", "draining": "yellow", "stopped": "red"}
LEVEL_STYLE = {"ok": "green", "idle": "yellow", "starting": "yellow", "draining": "yellow", "degraded": "red"}


def render_dashboard(snapshot: dict[str, Any]) -> Group:
    """Build the dashboard renderable: overview panel, experts table, network, why line."""
    node, exp = fmt.section(snapshot, "node"), fmt.section(snapshot, "experiment")
    dev, system = fmt.section(snapshot, "device"), fmt.section(snapshot, "system")
    health, ckpt = fmt.section(snapshot, "health"), fmt.section(snapshot, "checkpoints")
    state = str(snapshot.get("state", "n/a"))

    overview = Table.grid(padding=(0, 2))
    overview.add_column(style="bold")
    overview.add_column()
    overview.add_row("experiment", f"{exp.get('name', 'n/a')} v{exp.get('version', 'n/a')}  [dim]{exp.get('source', '')}[/]"
                     + fmt.wire_text(exp))
    overview.add_row("state", Text(state, style=STATE_STYLE.get(state, "")) + Text(f"   up {fmt.duration(node.get('uptime_s'))}"))
    overview.add_row("trainers reach", str(snapshot.get("endpoint") or "n/a"))
    overview.add_row(
        "device",
        f"{dev.get('description') or dev.get('name', 'n/a')}\n"
        f"util {fmt.pct(dev.get('utilization_pct'))}   mem {fmt.used_of(dev.get('memory_used_bytes'), dev.get('memory_total_bytes'))}"
        + (f"   torch threads {dev['torch_threads']}" if dev.get("torch_threads") else ""),
    )
    overview.add_row(
        "machine",
        f"cpu {fmt.pct(system.get('cpu_pct'))} of {system.get('cpu_count', 'n/a')}   "
        f"ram {fmt.used_of(system.get('ram_used_bytes'), system.get('ram_total_bytes'))}",
    )
    last = "never" if fmt.num(ckpt.get("last_age_s")) is None else fmt.duration(ckpt.get("last_age_s")) + " ago"
    overview.add_row("checkpoints", f"every {fmt.duration(ckpt.get('interval_s'))}, last {last}"
                     + (f"  [red]{ckpt['last_error']}[/]" if ckpt.get("last_error") else ""))
    title = f"volunteer {node.get('version', '')} · {node.get('home', '')} · pid {node.get('pid', '?')}"

    rows = expert_rows(snapshot)
    experts = Table(title="hosted experts", expand=True, title_justify="left")
    cols = ("uid", "req/s", "samples/s", "batch", "queue", "p50", "p99", "updates", "in", "out", "errors")
    for col in cols:
        experts.add_column(col, justify="left" if col in ("uid", "errors") else "right", no_wrap=col == "uid")
    for r in rows:
        experts.add_row(*(Text(v, style="red") if k == "errors" and v != "0" else v for k, v in r.items()))
    if not rows:
        experts.add_row("none hosted", *[""] * (len(cols) - 1))

    network = Table.grid(padding=(0, 2))
    network.add_column(style="bold")
    network.add_column()
    net = network_rows(snapshot)
    for key, value in net:
        network.add_row(key, value)
    if not net:
        network.add_row("network", Text("not connected (network disabled)", style="dim"))

    parts: list[Any] = [Panel(overview, title=title, title_align="left"), experts]
    srows = shard_rows(snapshot)
    if srows:
        shards = Table.grid(padding=(0, 2))
        shards.add_column(style="bold", no_wrap=True)
        shards.add_column()
        for key, value in srows:
            shards.add_row(key, Text(value))  # plain text: bars look like markup
        parts.append(Panel(shards, title="shards", title_align="left"))
    rrows = replica_rows(snapshot)
    if rrows:
        replicas = Table.grid(padding=(0, 2))
        replicas.add_column(style="bold", no_wrap=True)
        replicas.add_column()
        for key, value in rrows:
            replicas.add_row(key, Text(value))
        parts.append(Panel(replicas, title="replicas", title_align="left"))
    level = str(health.get("level", "n/a"))
    why = Text(f"health: {level}", style=LEVEL_STYLE.get(level, ""))
    if health.get("why"):
        why.append(f"  {health['why']}")
    return Group(*parts, Panel(network, title="network", title_align="left"), why)
