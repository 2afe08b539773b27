"""What the resource rules read from the machine: user idle time, battery, others' CPU.

Each reader answers ``None`` when it cannot tell, and says how it measures (``method``), so
``volunteer status`` is honest about what was detected:

- ``IdleSource``: under X11 ``xprintidle`` when it is installed and ``$DISPLAY`` is set;
  otherwise the newest access time of the terminals (``/dev/pts/*``, ``/dev/tty[0-9]*``:
  what ``w`` shows as IDLE; a terminal's access time moves when someone types into it) and
  of the input devices (``/dev/input/event*``, when readable). A Wayland session that does
  not read input through those devices, or a machine without any, reads ``None``
  ("unknown"): the idle rule then never pauses.
- ``BatterySource``: ``psutil.sensors_battery()``; no battery reads ``None``.
- ``CpuSource``: the other processes' share of the machine's CPU (all CPUs = 100%), from
  the system's busy time minus this process's own CPU time between two readings, averaged
  over at least ``CPU_WINDOW_S`` so one busy tick does not pause the node.

Test seam: ``TEST_SOURCES_ENV`` (``VOLUNTEER_TEST_RULE_SOURCES``) names a JSON file read on
every tick, ``{"now": epoch, "idle_s": s, "on_battery": bool, "other_cpu_pct": pct}`` (each
key optional, null = unknown); ``sources_from_env`` then returns fake sources and a fake
clock over that file instead of the machine's. Only the tests set it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

TEST_SOURCES_ENV = "VOLUNTEER_TEST_RULE_SOURCES"
CPU_WINDOW_S = 5.0
XPRINTIDLE_TIMEOUT_S = 1.0
IDLE_GLOBS = ("/dev/pts/[0-9]*", "/dev/tty[0-9]*", "/dev/input/event*")


class IdleSource:
    """Seconds since the last user input, or None (see module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.method = "unknown"
        self._xprintidle = shutil.which("xprintidle") if os.environ.get("DISPLAY") else None

    def __call__(self) -> float | None:
        if self._xprintidle:
            try:
                out = subprocess.run([self._xprintidle], capture_output=True, text=True,
                                     timeout=XPRINTIDLE_TIMEOUT_S, check=True).stdout
                self.method = "X11 (xprintidle)"
                return max(0.0, int(out.strip()) / 1000.0)
            except (OSError, ValueError, subprocess.SubprocessError):
                self._xprintidle = None  # broken once, not asked again
        newest = None
        for pattern in IDLE_GLOBS:
            for path in glob.glob(pattern):
                try:
                    atime = os.stat(path).st_atime
                except OSError:
                    continue
                newest = atime if newest is None else max(newest, atime)
        if newest is None:
            self.method = "unknown (no terminal, input device or X11 idle time readable)"
            return None
        self.method = "terminal and input device access times"
        return max(0.0, self.clock() - newest)


class BatterySource:
    """True while running on battery; None without a battery (or where psutil cannot tell)."""

    method = "psutil.sensors_battery"

    def __call__(self) -> bool | None:
        try:
            battery = psutil.sensors_battery()
        except (AttributeError, NotImplementedError, OSError, RuntimeError):
            return None
        if battery is None or battery.power_plugged is None:
            return None
        return not battery.power_plugged


class CpuSource:
    """The other processes' CPU share in percent of the whole machine, or None."""

    method = "system busy time minus this process's CPU time"

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = CPU_WINDOW_S) -> None:
        self.clock = clock
        self.window_s = window_s
        self._proc = psutil.Process()
        self._last: tuple[float, float, float] | None = None
        self._value: float | None = None

    def _sample(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        own = sum(self._proc.cpu_times()[:4])  # user, system, children user, children system
        return self.clock(), busy, own

    def __call__(self) -> float | None:
        try:
            now = self._sample()
        except (psutil.Error, OSError):
            return None
        if self._last is None:
            self._last = now
            return self._value
        wall = now[0] - self._last[0]
        if wall < self.window_s:
            return self._value
        cpus = psutil.cpu_count() or 1
        other = (now[1] - self._last[1]) - (now[2] - self._last[2])
        self._last = now
        self._value = max(0.0, min(100.0, 100.0 * other / (wall * cpus)))
        return self._value


@dataclass
class RuleSources:
    """The clock and readers the pause controller uses (real, or the test file's)."""

    clock: Callable[[], float]
    idle: Callable[[], Any]
    battery: Callable[[], Any]
    cpu: Callable[[], Any]
    test_file: str | None = None

    def methods(self) -> dict[str, str]:
        if self.test_file:
            return {"idle": f"test file {self.test_file}", "battery": "test file", "cpu": "test file"}
        return {name: str(getattr(src, "method", "?")) for name, src in
                (("idle", self.idle), ("battery", self.battery), ("cpu", self.cpu))}


class _TestFile:
    """The ``VOLUNTEER_TEST_RULE_SOURCES`` file: re-read at most once per clock tick."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def read(self) -> Mapping[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def value(self, key: str) -> Any:
        return self.read().get(key)

    def now(self) -> float:
        value = self.read().get("now")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else time.time()


def sources_from_env(env: Mapping[str, str] | None = None) -> RuleSources:
    """The machine's readers, or the test file's fakes when ``TEST_SOURCES_ENV`` is set."""
    path = (os.environ if env is None else env).get(TEST_SOURCES_ENV, "").strip()
    if path:
        log.warning("resource rules read %s (%s is a test seam, not for real nodes)", path, TEST_SOURCES_ENV)
        f = _TestFile(path)
        return RuleSources(clock=f.now, idle=lambda: f.value("idle_s"), battery=lambda: f.value("on_battery"),
                           cpu=lambda: f.value("other_cpu_pct"), test_file=path)
    return RuleSources(clock=time.time, idle=IdleSource(), battery=BatterySource(), cpu=CpuSource())
