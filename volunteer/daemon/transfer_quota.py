"""The daily transfer cap: bytes in + out per UTC day, kept in the home across restarts.

``TransferQuota(path, daily_cap)`` counts the expert and shard bytes that the bandwidth hooks
report (its ``add`` is the ``meter`` of ``volunteer.net.rate_limit.Traffic``), per UTC day.
Once the day's total reaches the cap, ``limit_state()`` says so, with a reason the pause
engine shows as is; at 00:00 UTC the count starts again.

The count lives in ``<home>/transfer.json`` (``{"day": "YYYY-MM-DD", "bytes_in": N,
"bytes_out": N}``), written atomically (``volunteer.fsutil``) at most every
``flush_interval_s`` from ``limit_state`` / ``flush`` (never from ``add``, which runs in IO
threads), at once when the cap is first reached, and on ``close``: a restart (even after
``kill -9``) loses at most ``flush_interval_s`` of counting and never forgets a reached cap.
A file from another day, a missing one or a malformed one starts the day at zero (a
malformed one is logged).
"""

from __future__ import annotations

import calendar
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from volunteer.fsutil import atomic_write_bytes
from volunteer.net.rate_limit import format_bytes

log = logging.getLogger(__name__)

FILE_NAME = "transfer.json"
MAX_FILE_BYTES = 4096
FLUSH_INTERVAL_S = 60.0
DAY_S = 86400


def _day_of(ts: float) -> tuple[str, float]:
    """(UTC date as YYYY-MM-DD, the epoch second its next day starts) of ``ts``."""
    t = time.gmtime(ts)
    start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    return time.strftime("%Y-%m-%d", t), float(start + DAY_S)


class TransferQuota:
    """Counts bytes per UTC day against ``daily_cap`` (see module docstring); thread-safe."""

    def __init__(self, path: Path, daily_cap: int, clock: Callable[[], float] = time.time,
                 flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        """``path``: the JSON file (its directory must exist); ``daily_cap``: bytes per UTC
        day, in + out together (0: count only, never pause); ``clock``: epoch seconds."""
        if daily_cap < 0:
            raise ValueError(f"daily_cap must be >= 0, got {daily_cap}")
        self.path = Path(path)
        self.daily_cap = int(daily_cap)
        self._clock = clock
        self._flush_interval = flush_interval_s
        self._lock = threading.Lock()
        self._day, self._day_end = _day_of(clock())
        self._in = self._out = 0
        self._dirty = False
        self._flushed_at = clock()
        self._reached_saved = False
        self._load()

    @classmethod
    def for_home(cls, home_root: Path, daily_cap: int, **kw: Any) -> TransferQuota:
        """The quota kept in ``<home>/transfer.json``."""
        return cls(Path(home_root) / FILE_NAME, daily_cap, **kw)

    # -- counting (any thread, cheap) --

    def add(self, n_in: int, n_out: int) -> None:
        """Count ``n_in`` bytes received and ``n_out`` sent (the ``Traffic`` meter)."""
        with self._lock:
            if self._clock() >= self._day_end:
                self._roll()
            self._in += n_in
            self._out += n_out
            self._dirty = True

    def _roll(self) -> None:
        self._day, self._day_end = _day_of(self._clock())
        self._in = self._out = 0
        self._dirty = True
        self._reached_saved = False

    # -- reading --

    def usage(self) -> dict[str, Any]:
        """Today's figures: day, bytes_in, bytes_out, bytes, cap (0: none), resets_at (epoch)."""
        with self._lock:
            if self._clock() >= self._day_end:
                self._roll()
            return {"day": self._day, "bytes_in": self._in, "bytes_out": self._out,
                    "bytes": self._in + self._out, "cap": self.daily_cap, "resets_at": self._day_end}

    def reached(self) -> bool:
        """True while today's bytes are at or over the cap."""
        usage = self.usage()
        return bool(self.daily_cap) and usage["bytes"] >= self.daily_cap

    def limit_state(self) -> dict[str, Any]:
        """``{"paused": bool, "reason": str | None, "until": epoch | None, "rule": str | None}``
        for the pause engine (the fields of its ``PauseDecision``), e.g. ``reason`` "daily
        transfer cap of 5.0 GB reached (resets 00:00 UTC)", ``until`` the next 00:00 UTC,
        ``rule`` "transfer_cap"; also persists the count when due (call it periodically,
        e.g. every supervisor tick)."""
        usage = self.usage()
        reached = bool(self.daily_cap) and usage["bytes"] >= self.daily_cap
        self.flush(force=reached and not self._reached_saved)
        if not reached:
            return {"paused": False, "reason": None, "until": None, "rule": None}
        self._reached_saved = True
        return {"paused": True, "until": usage["resets_at"], "rule": "transfer_cap",
                "reason": f"daily transfer cap of {format_bytes(self.daily_cap)} reached (resets 00:00 UTC)"}

    # -- persistence --

    def flush(self, force: bool = False) -> None:
        """Write the count if it changed and ``flush_interval_s`` passed (or ``force``)."""
        with self._lock:
            now = self._clock()
            if not self._dirty or (not force and now - self._flushed_at < self._flush_interval):
                return
            doc = {"day": self._day, "bytes_in": self._in, "bytes_out": self._out}
            self._dirty = False
            self._flushed_at = now
        try:
            atomic_write_bytes(self.path, json.dumps(doc).encode() + b"\n", mode=0o600)
        except OSError as e:
            log.warning("cannot save the daily transfer count to %s: %s", self.path, e.strerror or e)
            with self._lock:
                self._dirty = True

    def close(self) -> None:
        """Save the count now (at shutdown)."""
        self.flush(force=True)

    def _load(self) -> None:
        try:
            with self.path.open("rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("cannot read %s (%s): the daily transfer count starts at 0", self.path, e)
            return
        try:
            if len(data) > MAX_FILE_BYTES:
                raise ValueError("file too large")
            doc = json.loads(data.decode("utf-8"))
            if not isinstance(doc, dict) or not isinstance(doc.get("day"), str):
                raise ValueError("not a map with a day")
            counts = [doc.get("bytes_in"), doc.get("bytes_out")]
            if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in counts):
                raise ValueError("byte counts must be non-negative integers")
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("ignoring a malformed %s (%s): the daily transfer count starts at 0", self.path, e)
            return
        if doc["day"] == self._day:
            self._in, self._out = counts
