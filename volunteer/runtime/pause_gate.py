"""``PauseGate``: the runtime's switch for "take no new work" while the node is paused.

A paused node (``volunteer pause``, or a resource rule: schedule, battery, idle, CPU) keeps
its experts loaded and its queues running: requests already admitted finish and are
answered as usual; a new forward or backward request is answered at once with the typed
"paused" error (``PausedError``), which trainers treat as "this server is unavailable for
now, use another replica" (never as a broken server). Everything else goes on: ``info``,
shard chunks (other nodes may still download this node's experts), replica exchanges.
Resuming is one flag: the next request is served. Thread-safe (a flag read is atomic).
"""

from __future__ import annotations

from volunteer.wire.errors import PausedError

PAUSED_MESSAGE = "this volunteer is paused and takes no new work; use another replica or retry later"


class PauseGate:
    """Open (serving) by default; ``close()`` pauses, ``open()`` resumes."""

    def __init__(self) -> None:
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Refuse new work from now on (in-flight work is not touched)."""
        self._paused = True

    def open(self) -> None:
        """Take new work again, at once."""
        self._paused = False

    def check(self) -> None:
        """Raise ``PausedError`` while paused (the runtime answers it as a typed error)."""
        if self._paused:
            raise PausedError(PAUSED_MESSAGE)
