"""Why the node takes no new work right now: ``snapshot["pause"]`` as one line.

The daemon's pause state (``{"paused": bool, "reason": str | None, "until": unix time |
None}``) comes from ``volunteer pause`` and the resource rules (battery, schedule, idle,
transfer cap). The reason is already a phrase ("on battery", "until 18:00 by schedule"), so
the line is ``paused: <reason>`` (a reason that already starts with "paused", such as
"paused by you until 14:05", stands as it is, as in the daemon's health line), with how
long until it resumes when the daemon knows.
An older daemon has no such key: no line.
"""

from __future__ import annotations

import time
from typing import Any

from volunteer.status import fmt


def pause_text(snapshot: dict[str, Any], now: float | None = None) -> str | None:
    """``paused: on battery (resumes in 2h 07m)``, or None when the node is not paused."""
    pause = snapshot.get("pause")
    if not isinstance(pause, dict) or pause.get("paused") is not True:
        return None
    reason = pause.get("reason")
    text = _oneline(reason) if isinstance(reason, str) and reason.strip() else "paused"
    if not text.startswith("paused"):
        text = f"paused: {text}"
    until = fmt.num(pause.get("until"))
    left = None if until is None else until - (time.time() if now is None else now)
    if left is not None and left > 0:
        text += f" (resumes in {fmt.duration(left)})"
    return text


def _oneline(text: str) -> str:
    return " ".join(text.split())
