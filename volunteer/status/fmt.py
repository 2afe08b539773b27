"""Formatting helpers shared by the plain and rich status views. Never raise on odd input."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def bytes_(value: Any) -> str:
    v = num(value)
    if v is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "n/a"


def duration(value: Any) -> str:
    """The one way durations are shown to users: ``0.4s``, ``45s``, ``3m 05s``, ``2h 07m``,
    ``3d 04h`` (two units at most, the second zero-padded so columns line up; whole seconds
    are cut, not rounded, so an uptime never runs ahead). Sub-10-second fractions keep one
    decimal (a leave that took 1.3 s). Negative values get a ``-``; odd input gives ``n/a``.
    """
    v = num(value)
    if v is None or v != v or v in (float("inf"), float("-inf")):
        return "n/a"
    if v < 0:
        return "-" + duration(-v)
    if v < 10 and v != int(v) and round(v, 1) < 10:
        return f"{v:.1f}s"
    s = int(v)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {(s % 3600) // 60:02d}m"
    return f"{s // 86400}d {(s % 86400) // 3600:02d}h"


def clock(when: Any, now: Any = None) -> str:
    """A local wall-clock time a user reads: ``14:05`` today, ``Mon 14:05`` within the coming
    week, ``Mon 7 Dec 14:05`` further on (a pause of two days must not read like one ending
    today). ``when`` and ``now`` are unix times (``now`` defaults to the current time)."""
    t, n = num(when), num(now)
    if t is None or t != t or t in (float("inf"), float("-inf")):
        return "n/a"
    try:
        at = datetime.fromtimestamp(t)
        today = datetime.now() if n is None else datetime.fromtimestamp(n)
    except (OverflowError, OSError, ValueError):
        return "n/a"
    days = (at.date() - today.date()).days
    if days == 0:
        return f"{at:%H:%M}"
    if 0 < days < 7:
        return f"{at:%a %H:%M}"
    return f"{at:%a} {at.day} {at:%b %H:%M}"


def ago(value: Any) -> str:
    """``12s ago`` / ``never`` (no age known) for the age of a last event."""
    return "never" if num(value) is None else duration(value) + " ago"


def rate(value: Any) -> str:
    v = num(value)
    if v is None:
        return "n/a"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def pct(value: Any) -> str:
    v = num(value)
    return "n/a" if v is None else f"{v:.0f}%"


def ms(value: Any) -> str:
    v = num(value)
    if v is None:
        return "n/a"
    return f"{v:.0f}ms" if v >= 10 else f"{v:.1f}ms"


def traffic(total: Any, per_s: Any) -> str:
    """Bytes so far and their recent rate, e.g. ``340.0 MiB (1.2 MiB/s)``."""
    if num(total) is None:
        return "n/a"
    if num(per_s) is None:
        return bytes_(total)
    return f"{bytes_(total)} ({bytes_(per_s)}/s)"


def wire_text(experiment: dict[str, Any]) -> str:
    """``   wire bf16`` when the manifest sets trainers' default compression, else empty."""
    wire = experiment.get("wire")
    c = wire.get("compression") if isinstance(wire, dict) else None
    return f"   wire {c}" if isinstance(c, str) and c else ""


def source_text(source: Any) -> str:
    """Where the manifest came from, without nested parentheses: the loader's
    ``demo (shipped: volunteer/configs/demo.yaml)`` reads ``shipped manifest demo
    (volunteer/configs/demo.yaml)``, a path ``manifest PATH``; nothing gives ``n/a``."""
    text = " ".join(str(source).split()) if isinstance(source, str) else ""
    name, sep, rest = text.partition(" (shipped: ")
    if sep and rest.endswith(")"):
        return f"shipped manifest {name} ({rest[:-1]})"
    return f"manifest {text}" if text else "n/a"


def used_of(used: Any, total: Any) -> str:
    if num(used) is None:
        return "n/a"
    if num(total) is None:
        return bytes_(used)
    return f"{bytes_(used)} / {bytes_(total)}"


def errors_text(errors: Any) -> str:
    if not isinstance(errors, dict) or not errors:
        return "0"
    parts = [f"{code}={count}" for code, count in sorted(errors.items()) if num(count)]
    return ", ".join(parts) if parts else "0"


def says_level(level: Any, why: Any) -> bool:
    """The "why" already names the level ("paused by you" for level "paused"): show it alone."""
    return isinstance(level, str) and isinstance(why, str) and bool(level) and why.startswith(level)


def health_text(health: dict[str, Any]) -> str:
    """``idle: no trainer has sent work ...``; a why that starts with the level stands alone."""
    level, why = health.get("level", "n/a"), health.get("why")
    if not why:
        return str(level)
    return str(why) if says_level(level, why) else f"{level}: {why}"


def section(snapshot: dict[str, Any], name: str) -> dict[str, Any]:
    value = snapshot.get(name)
    return value if isinstance(value, dict) else {}
