"""Plain-text status: stable lines for pipes, logs and terminals without colour.

Labelled lines and blocks; with a width (the terminal behind a pipe, or ``COLUMNS``) long lines
wrap under their value column and the experts table leaves out low-value columns
(``plain_fit``), without one every line stays whole. The addresses others pass
to ``--bootstrap`` end the text, each whole on a line of its own under a heading, so that
``volunteer status | tail -n 1`` or a copy from a terminal yields one address intact. A
paused node says why on its state line (``paused: on battery``); lifetime contribution has a
line when the daemon reports it.
"""

from __future__ import annotations

from typing import Any

from volunteer.status import fmt
from volunteer.status.contribution_view import TITLE as CONTRIBUTION_TITLE
from volunteer.status.contribution_view import contribution_lines
from volunteer.status.network_view import COPY_HEADING, copy_addresses, network_rows
from volunteer.status.pause_view import pause_text
from volunteer.status.plain_fit import fit_lines, table_lines
from volunteer.status.replicas_view import replica_rows
from volunteer.status.shards_view import shard_rows
from volunteer.status.transfer_view import LABEL as TRANSFER_LABEL
from volunteer.status.transfer_view import transfer_text


def expert_rows(snapshot: dict[str, Any]) -> list[dict[str, str]]:
    """One dict of display strings per hosted expert, sorted by uid (``in`` / ``out``: bytes
    of requests received and replies sent, with their recent rate)."""
    experts = fmt.section(snapshot, "experts")
    rows = []
    for uid in sorted(experts):
        e = experts[uid] if isinstance(experts[uid], dict) else {}
        lat = e.get("latency_ms") if isinstance(e.get("latency_ms"), dict) else {}
        rows.append({
            "uid": uid,
            "req/s": fmt.rate(e.get("requests_per_s")),
            "samples/s": fmt.rate(e.get("samples_per_s")),
            "batch": fmt.rate(e.get("mean_batch_size")),
            "queue": str(e.get("queue_depth", "n/a")),
            "p50": fmt.ms(_total_latency(lat, "p50")),
            "p99": fmt.ms(_total_latency(lat, "p99")),
            "updates": str(e.get("updates_applied", "n/a")),
            "in": fmt.traffic(e.get("bytes_in"), e.get("bytes_in_per_s")),
            "out": fmt.traffic(e.get("bytes_out"), e.get("bytes_out_per_s")),
            "errors": fmt.errors_text(e.get("errors")),
        })
    return rows


def _total_latency(lat: dict[str, Any], q: str) -> float | None:
    queue, compute = fmt.num(lat.get(f"queue_{q}")), fmt.num(lat.get(f"compute_{q}"))
    if queue is None and compute is None:
        return None
    return (queue or 0.0) + (compute or 0.0)


def render_plain(snapshot: dict[str, Any], width: int | None = None) -> str:
    """The whole status as text lines (see the module docstring), fitted to ``width`` columns
    when given (``volunteer.status.plain_fit``: columns left out, lines wrapped, never an
    address cut); None leaves every line whole."""
    node, exp = fmt.section(snapshot, "node"), fmt.section(snapshot, "experiment")
    dev, system = fmt.section(snapshot, "device"), fmt.section(snapshot, "system")
    health, ckpt = fmt.section(snapshot, "health"), fmt.section(snapshot, "checkpoints")
    lines = [
        f"node        {node.get('home', 'n/a')} (pid {node.get('pid', 'n/a')}, volunteer {node.get('version', 'n/a')})",
        f"experiment  {exp.get('name', 'n/a')} v{exp.get('version', 'n/a')} from {fmt.source_text(exp.get('source'))}"
        + fmt.wire_text(exp),
        f"state       {_state_text(snapshot)}   uptime {fmt.duration(node.get('uptime_s'))}",
        f"endpoint    {snapshot.get('endpoint') or 'n/a'}",
        f"device      {dev.get('description') or dev.get('name', 'n/a')}   util {fmt.pct(dev.get('utilization_pct'))}"
        f"   mem {fmt.used_of(dev.get('memory_used_bytes'), dev.get('memory_total_bytes'))}"
        + (f"   torch threads {dev['torch_threads']}" if dev.get("torch_threads") else ""),
        f"system      cpu {fmt.pct(system.get('cpu_pct'))} of {system.get('cpu_count', 'n/a')}   ram "
        f"{fmt.used_of(system.get('ram_used_bytes'), system.get('ram_total_bytes'))}",
        f"checkpoints every {fmt.duration(ckpt.get('interval_s'))}, last {fmt.ago(ckpt.get('last_age_s'))}"
        + (f", error: {ckpt['last_error']}" if ckpt.get("last_error") else ""),
        f"health      {fmt.health_text(health)}",
    ]
    if (transfer := transfer_text(snapshot)) is not None:
        lines.insert(-1, f"{TRANSFER_LABEL:<11} {transfer}")
    lines += [f"{CONTRIBUTION_TITLE}: {line}" for line in contribution_lines(snapshot)]
    lines.append("")
    rows = expert_rows(snapshot)
    if rows:
        lines += table_lines(rows, width)
    else:
        lines.append("experts     none hosted")
    lines.append("")
    srows = shard_rows(snapshot)
    if srows:
        lines += [*_block("shards", srows), ""]
    rrows = replica_rows(snapshot)
    if rrows:
        lines += [*_block("replicas", rrows), ""]
    net = network_rows(snapshot)
    if net:
        lines += _block("network", net)
    else:
        lines.append("network     not connected (network disabled)")
    addresses = copy_addresses(snapshot)
    if addresses:
        lines += ["", COPY_HEADING, *addresses]
    return "\n".join(fit_lines(lines, width, keep=addresses))


def _state_text(snapshot: dict[str, Any]) -> str:
    """``serving``; while paused the pause's phrase (``paused: on battery (resumes in 2h 07m)``),
    after the state when that is not already "paused" (an older daemon says "serving")."""
    state, paused = str(snapshot.get("state", "n/a")), pause_text(snapshot)
    if not paused:
        return state
    return paused if state == "paused" else f"{state}   {paused}"


def _block(title: str, rows: list[tuple[str, str]]) -> list[str]:
    """A titled block of labelled rows; multi-line values continue under their value column."""
    out = [title]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        first, *rest = value.split("\n")
        out.append(f"  {key.ljust(width)}  {first}")
        out += [f"  {'':{width}}  {more}" for more in rest]
    return out
