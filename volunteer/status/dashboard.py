"""Rich dashboard for ``volunteer status`` on a terminal (rich honours ``NO_COLOR``).

Laid out for the terminal it is drawn on: the experts table is as wide as its content and
sheds low-value columns on narrow terminals (``volunteer.status.experts_table``), no header
is cut, and the panels are as wide as the table or ``MAX_WIDTH`` cells, whichever is wider
(on a 200-column terminal nothing stretches into empty space). The addresses others copy to
``--bootstrap`` are not part of the renderable: ``print_dashboard`` prints them after it,
each on its own line with soft wrapping (never folded with a newline, never cut), so a
terminal narrower than an address wraps it visually and copying still yields it whole.
The live view prints them once above its redrawn area (a line wider than the terminal
inside a redrawn area would leave a row behind at every refresh).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.constrain import Constrain
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from volunteer.status import fmt
from volunteer.status.contribution_view import TITLE as CONTRIBUTION_TITLE
from volunteer.status.contribution_view import contribution_lines
from volunteer.status.experts_table import experts_table
from volunteer.status.network_view import COPY_HEADING, copy_addresses, network_rows
from volunteer.status.pause_view import pause_text
from volunteer.status.plain import expert_rows
from volunteer.status.replicas_view import replica_rows
from volunteer.status.shards_view import shard_rows
from volunteer.status.transfer_view import LABEL as TRANSFER_LABEL
from volunteer.status.transfer_view import transfer_text

MAX_WIDTH = 120
STATE_STYLE = {"serving": "green", "starting": "yellow", "draining": "yellow", "stopped": "red", "paused": "yellow"}
LEVEL_STYLE = {"ok": "green", "idle": "yellow", "starting": "yellow", "draining": "yellow", "degraded": "red",
               "paused": "yellow"}


class Dashboard:
    """The dashboard of one snapshot; lays itself out when rich tells it the width."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table, table_width = experts_table(expert_rows(self.snapshot), max(1, options.max_width))
        width = max(1, min(options.max_width, max(MAX_WIDTH, table_width)))
        yield Constrain(_build(self.snapshot, table), width)


def render_dashboard(snapshot: dict[str, Any]) -> Dashboard:
    """The dashboard renderable (without the addresses to copy: see ``print_dashboard``)."""
    return Dashboard(snapshot)


def print_dashboard(console: Console, snapshot: dict[str, Any]) -> None:
    """Print the dashboard, then the addresses to copy, each whole on a line of its own."""
    console.print(render_dashboard(snapshot))
    print_addresses(console, copy_addresses(snapshot))


def print_addresses(console: Console, addresses: list[str]) -> None:
    """``COPY_HEADING`` and each address unwrapped and uncut (the terminal soft-wraps it)."""
    if not addresses:
        return
    console.print(COPY_HEADING, style="bold", highlight=False, markup=False)
    for addr in addresses:
        console.print(addr, soft_wrap=True, highlight=False, markup=False, emoji=False)


def _build(snapshot: dict[str, Any], experts: Table) -> Group:
    """Overview and contribution panels, experts table, shards, replicas, network, health."""
    health = fmt.section(snapshot, "health")
    paused = pause_text(snapshot)
    parts: list[Any] = [_overview(snapshot, paused)]
    contribution = contribution_lines(snapshot)
    if contribution:
        parts.append(Panel(Text("\n".join(contribution), overflow="fold"), title=CONTRIBUTION_TITLE,
                           title_align="left"))
    parts.append(experts)
    for title, rows in (("shards", shard_rows(snapshot)), ("replicas", replica_rows(snapshot))):
        if rows:
            parts.append(_labelled_panel(title, rows))
    net = network_rows(snapshot)
    if net:
        parts.append(_labelled_panel("network", net))
    else:
        parts.append(Panel(Text("not connected (network disabled)", style="dim"), title="network",
                           title_align="left"))
    level = str(health.get("level", "n/a"))
    said = fmt.says_level(level, health.get("why"))  # "paused by you": the why names the level
    why = Text(f"health: {health['why'] if said else level}", style=LEVEL_STYLE.get(level, ""))
    if health.get("why") and not said:
        why.append(f"  {health['why']}")
    return Group(*parts, why)


def _overview(snapshot: dict[str, Any], paused: str | None) -> Panel:
    """Experiment, state (and pause), endpoint, device, machine, checkpoints."""
    node, exp = fmt.section(snapshot, "node"), fmt.section(snapshot, "experiment")
    dev, system = fmt.section(snapshot, "device"), fmt.section(snapshot, "system")
    ckpt = fmt.section(snapshot, "checkpoints")
    state = str(snapshot.get("state", "n/a"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("experiment", Text(f"{exp.get('name', 'n/a')} v{exp.get('version', 'n/a')} from ")
                 + Text(fmt.source_text(exp.get("source")), style="dim") + Text(fmt.wire_text(exp)))
    grid.add_row("state", Text(state, style=STATE_STYLE.get(state, ""))
                 + Text(f"   up {fmt.duration(node.get('uptime_s'))}"))
    if paused:
        grid.add_row("", Text(paused, style="yellow"))
    grid.add_row("trainers reach", Text(str(snapshot.get("endpoint") or "n/a")))
    grid.add_row("device", Text(
        f"{dev.get('description') or dev.get('name', 'n/a')}\n"
        f"util {fmt.pct(dev.get('utilization_pct'))}   "
        f"mem {fmt.used_of(dev.get('memory_used_bytes'), dev.get('memory_total_bytes'))}"
        + (f"   torch threads {dev['torch_threads']}" if dev.get("torch_threads") else "")))
    grid.add_row("machine", Text(
        f"cpu {fmt.pct(system.get('cpu_pct'))} of {system.get('cpu_count', 'n/a')}   "
        f"ram {fmt.used_of(system.get('ram_used_bytes'), system.get('ram_total_bytes'))}"))
    checkpoints = Text(f"every {fmt.duration(ckpt.get('interval_s'))}, last {fmt.ago(ckpt.get('last_age_s'))}")
    if ckpt.get("last_error"):
        checkpoints.append(f"  {ckpt['last_error']}", style="red")
    grid.add_row("checkpoints", checkpoints)
    if (transfer := transfer_text(snapshot)) is not None:
        grid.add_row(TRANSFER_LABEL, Text(transfer))
    title = f"volunteer {node.get('version', '')} · {node.get('home', '')} · pid {node.get('pid', '?')}"
    return Panel(grid, title=Text(title), title_align="left")


def _labelled_panel(title: str, rows: list[tuple[str, str]]) -> Panel:
    """A titled panel of ``(label, text)`` rows; texts are plain (bars look like markup)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(Text(key), Text(value))
    return Panel(grid, title=title, title_align="left")
