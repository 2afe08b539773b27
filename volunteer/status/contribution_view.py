"""What this node has given an experiment over its whole life: ``snapshot["contribution"]``.

The daemon keeps lifetime totals per experiment in the home across restarts
(``{"experiment", "samples", "updates", "uptime_s", "bytes_served", "since"}``; ``volunteer
receipt`` signs them). Both views show them as one line; odd values render as "n/a", and an
older daemon without the key shows nothing. A mapping of such records keyed by experiment
renders one line each.
"""

from __future__ import annotations

import time
from typing import Any

from volunteer.status import fmt

TITLE = "contribution (lifetime)"
KEYS = ("samples", "updates", "uptime_s", "bytes_served")


def contribution_lines(snapshot: dict[str, Any]) -> list[str]:
    """``demo: 1,234,567 samples, 8,910 updates, 3d 04h serving, 12.3 GiB served, since
    2026-11-01`` per experiment; empty when the snapshot has no contribution."""
    c = snapshot.get("contribution")
    if not isinstance(c, dict) or not c:
        return []
    if any(k in c for k in KEYS):
        return [_line(c)]
    return [_line(v, name) for name, v in sorted(c.items()) if isinstance(v, dict)]


def _line(c: dict[str, Any], name: str | None = None) -> str:
    experiment = c.get("experiment") if isinstance(c.get("experiment"), str) else name
    since = fmt.num(c.get("since"))
    text = (f"{_count(c.get('samples'))} samples, {_count(c.get('updates'))} updates, "
            f"{fmt.duration(c.get('uptime_s'))} serving, {fmt.bytes_(c.get('bytes_served'))} served")
    if since is not None and since > 0:
        try:
            text += f", since {time.strftime('%Y-%m-%d', time.localtime(since))}"
        except (OverflowError, OSError, ValueError):  # a date no calendar holds
            pass
    return f"{experiment}: {text}" if experiment else text


def _count(value: Any) -> str:
    v = fmt.num(value)
    return "n/a" if v is None else f"{int(v):,}"
