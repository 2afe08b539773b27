"""The ``transfer`` line of ``volunteer status``: bandwidth caps and today's transfer.

``snapshot["transfer"]`` (None when neither a bandwidth cap nor a daily cap is set) holds
``upload_bytes_per_s`` / ``download_bytes_per_s`` (None: unlimited) and, with a daily
transfer cap, ``bytes`` (today's in + out), ``cap`` (0: none) and ``resets_at`` (epoch, the
next 00:00 UTC). ``transfer_text`` makes one line of it, in the units the settings take
(``volunteer.net.rate_limit.format_bytes``: SI, "5.0 GB"):
``up ≤ 2.0 MB/s, down unlimited; today 1.2 GB of 5.0 GB (resets 00:00 UTC)``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from volunteer.net.rate_limit import format_bytes
from volunteer.status import fmt

LABEL = "transfer"


def transfer_text(snapshot: dict[str, Any]) -> str | None:
    """One line about the transfer caps, or None when the snapshot has no such section."""
    t = snapshot.get("transfer")
    if not isinstance(t, dict) or not t:
        return None
    parts = [f"{name} {_rate(t.get(key))}" for name, key in
             (("up", "upload_bytes_per_s"), ("down", "download_bytes_per_s")) if key in t]
    text = ", ".join(parts)
    today = _today(t)
    if today:
        text = f"{text}; {today}" if text else today
    return text or None


def _rate(value: Any) -> str:
    v = fmt.num(value)
    return "unlimited" if v is None or v <= 0 or v != v else f"≤ {format_bytes(v)}/s"


def _today(t: dict[str, Any]) -> str:
    used, cap = fmt.num(t.get("bytes")), fmt.num(t.get("cap"))
    if used is None or used != used or used < 0:
        return ""
    if cap is None or cap <= 0 or cap != cap:
        return f"today {format_bytes(used)} (no daily cap)"
    text = f"today {format_bytes(used)} of {format_bytes(cap)}"
    resets = fmt.num(t.get("resets_at"))
    try:
        at = datetime.fromtimestamp(resets, tz=timezone.utc) if resets is not None else None
    except (OverflowError, OSError, ValueError):
        at = None
    return text + (f" (resets {at:%H:%M} UTC)" if at is not None else "")
