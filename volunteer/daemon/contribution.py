"""Lifetime contribution per experiment, kept in the node home across restarts.

What a volunteer gave an experiment, BOINC's "credit": ``samples`` computed (forward and
backward rows), ``updates`` applied to hosted experts, ``uptime_s`` (time the daemon ran
for the experiment, paused or not) and ``bytes_served`` (expert replies sent to trainers),
``since`` (when this home first served it). ``volunteer status`` shows them and
``volunteer receipt`` signs them (``volunteer.daemon.receipt``).

``ContributionLedger`` adds what the runtime's per-expert counters moved since its last
look (counters restart with each process and with each expert the node takes on, so only
forward deltas count: an expert seen for the first time counts from its current
``updates_applied``, which includes weights downloaded or resumed, i.e. others' work).
It is written atomically to ``<home>/contribution.json`` at the checkpoint cadence (at
most every ``SAVE_EVERY_S``) and on leave, so a ``kill -9`` loses at most that much. A
file that cannot be read or parsed is set aside as ``contribution.json.corrupt`` with a
warning and the count starts fresh: it never keeps a node from starting.

File: ``{"version": 1, "last": experiment, "experiments": {name: {samples, updates,
uptime_s, bytes_served, since, updated_at}}}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from volunteer.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

FILE_NAME = "contribution.json"
FILE_VERSION = 1
MAX_FILE_BYTES = 1 << 20
MAX_EXPERIMENTS = 256
SAVE_EVERY_S = 60.0
COUNTERS = ("samples", "updates", "uptime_s", "bytes_served")


class ContributionError(Exception):
    """No contribution to report (no file, or no entry for the experiment): one line."""


def read_file(path: Path) -> dict[str, Any]:
    """The validated contents of a contribution file; ``ValueError`` when it is unusable,
    ``FileNotFoundError`` when there is none."""
    with path.open("rb") as fh:
        data = fh.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    doc = json.loads(data.decode("utf-8"))
    if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION:
        raise ValueError(f"not a version {FILE_VERSION} contribution file")
    experiments = doc.get("experiments")
    if not isinstance(experiments, dict) or len(experiments) > MAX_EXPERIMENTS:
        raise ValueError("no experiments table")
    clean = {}
    for name, entry in experiments.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise ValueError("malformed experiment entry")
        clean[name] = _entry(entry)
    last = doc.get("last") if isinstance(doc.get("last"), str) else None
    return {"version": FILE_VERSION, "last": last, "experiments": clean}


def _entry(raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in (*COUNTERS, "since", "updated_at"):
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"bad {key}: {value!r}")
        out[key] = float(value) if key in ("uptime_s", "since", "updated_at") else int(value)
    return out


class ContributionLedger:
    """Running totals of one experiment on top of what the home kept (thread-safe)."""

    def __init__(self, home: Path, experiment: str, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(home) / FILE_NAME
        self.experiment = experiment
        self.clock = clock
        self._lock = threading.Lock()
        self._doc = self._load()
        now = clock()
        entry = self._doc["experiments"].get(experiment)
        if entry is None:
            entry = {"samples": 0, "updates": 0, "uptime_s": 0.0, "bytes_served": 0, "since": now, "updated_at": now}
            self._doc["experiments"][experiment] = entry
        self._doc["last"] = experiment
        self._entry = entry
        self._seen: dict[str, tuple[int, int, int]] = {}  # uid -> (samples, updates, bytes_out) last read
        self._next_save = 0.0

    def _load(self) -> dict[str, Any]:
        try:
            return read_file(self.path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            log.warning("contribution file %s is unreadable (%s): set aside as %s, counting afresh",
                        self.path, exc, aside.name)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
        return {"version": FILE_VERSION, "last": None, "experiments": {}}

    def observe(self, stats: Mapping[str, Mapping[str, Any]], elapsed_s: float) -> None:
        """Add the counters' progress since the last call (``runtime.stats()``) and
        ``elapsed_s`` of uptime."""
        with self._lock:
            seen: dict[str, tuple[int, int, int]] = {}
            for uid, s in stats.items():
                now = (_int(s.get("samples")), _int(s.get("updates_applied")), _int(s.get("bytes_out")))
                # first sight: samples and bytes count from 0 (fresh counters), updates from now
                before = self._seen.get(uid, (0, now[1], 0))
                self._entry["samples"] += max(0, now[0] - before[0])
                self._entry["updates"] += max(0, now[1] - before[1])
                self._entry["bytes_served"] += max(0, now[2] - before[2])
                seen[uid] = now
            self._seen = seen
            if math.isfinite(elapsed_s) and elapsed_s > 0:
                self._entry["uptime_s"] += elapsed_s
            self._entry["updated_at"] = self.clock()

    def maybe_save(self, every_s: float = SAVE_EVERY_S) -> None:
        """Save when ``every_s`` passed since the last save (the supervisor's tick)."""
        now = time.monotonic()
        if now >= self._next_save:
            self._next_save = now + every_s
            self.save()

    def save(self) -> None:
        """Write the file atomically; a failure is logged, never raised (the node serves on)."""
        with self._lock:
            data = json.dumps(self._doc, sort_keys=True, indent=1).encode()
        try:
            atomic_write_bytes(self.path, data)
        except OSError as exc:
            log.warning("could not save the contribution totals to %s: %s", self.path, exc)

    def section(self) -> dict[str, Any]:
        """The snapshot's ``contribution`` section."""
        with self._lock:
            e = dict(self._entry)
        return {"experiment": self.experiment, "samples": e["samples"], "updates": e["updates"],
                "uptime_s": round(e["uptime_s"], 1), "bytes_served": e["bytes_served"], "since": e["since"]}


def load_totals(home: Path, experiment: str | None = None) -> dict[str, Any]:
    """The recorded totals of ``experiment`` (default: the one this home served last), in
    the snapshot section's shape; ``ContributionError`` when there are none."""
    path = Path(home) / FILE_NAME
    try:
        doc = read_file(path)
    except FileNotFoundError:
        raise ContributionError(f"no contribution recorded in {home} yet: join an experiment first "
                                f"(`volunteer join demo --home {home}`)") from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ContributionError(f"{path} is unreadable ({exc}); the daemon sets it aside and counts afresh "
                                "on its next start") from None
    name = experiment or doc["last"]
    entry = doc["experiments"].get(name) if name else None
    if entry is None:
        known = ", ".join(sorted(doc["experiments"])) or "none"
        raise ContributionError(f"no contribution to experiment {name!r} in {home} (recorded: {known})")
    return {"experiment": name, **{k: entry[k] for k in COUNTERS}, "since": entry["since"]}


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0
    return max(0, int(value))
