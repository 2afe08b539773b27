"""Restoring hosted experts from checkpoints and writing consistent checkpoints of them.

A checkpoint pass takes ``runtime.exclusive()`` (no batch runs, so weights, optimizer state
and ``updates_applied`` are mutually consistent), copies every changed expert's state to CPU
memory, releases the runtime, and only then writes the files (atomically, one per uid), so
serving pauses for a memory copy, not for the disk.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from volunteer.experts.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointStore,
    clone_state,
    non_finite_tensor,
)

log = logging.getLogger(__name__)


@dataclass
class CheckpointReport:
    """What one checkpoint pass did."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    updates_applied: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    bytes_written: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {"written": self.written, "unchanged": self.unchanged, "failed": self.failed,
                "updates_applied": self.updates_applied, "duration_s": round(self.duration_s, 3),
                "bytes_written": self.bytes_written, "ok": self.ok}


class Checkpointer:
    """Owns the checkpoint store of the hosted backends (``uid -> ExpertBackend``)."""

    def __init__(self, store: CheckpointStore, backends: Mapping[str, Any]) -> None:
        self.store = store
        self.backends = dict(backends)
        self._saved_updates: dict[str, tuple[int, int]] = {}  # uid -> (updates, weights revision)
        self.resumed: dict[str, int] = {}
        self.set_aside: list[str] = []
        self.last_at: float | None = None
        self.last_report: CheckpointReport | None = None
        self.last_error: str | None = None
        self.passes = 0
        self._lock = threading.Lock()  # one pass at a time (periodic, control op, leave)

    def restore(self) -> None:
        """Load each backend's checkpoint if one exists; set aside unusable files loudly."""
        for uid, backend in self.backends.items():
            self.restore_one(uid, backend)

    def restore_one(self, uid: str, backend: Any) -> int | None:
        """Load ``uid``'s checkpoint into ``backend``; its version (updates applied) or None.

        An unusable file (another architecture, corrupt, not fitting) is set aside loudly and
        the backend keeps its fresh weights.
        """
        try:
            state = self.store.load(uid)
        except CheckpointMismatchError as exc:
            self._set_aside(uid, "mismatch", str(exc))
            return None
        except CheckpointError as exc:
            self._set_aside(uid, "corrupt", str(exc))
            return None
        if state is None:
            return None
        try:
            backend.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as exc:
            self._set_aside(uid, "incompatible", f"does not fit the expert ({exc})")
            return None
        self.resumed[uid] = int(backend.updates_applied)
        self._saved_updates[uid] = _version(backend)
        return int(backend.updates_applied)

    def _set_aside(self, uid: str, reason: str, why: str) -> None:
        moved = self.store.set_aside(uid, reason)
        self.set_aside.append(str(moved))
        log.warning("not loading %s: %s; kept it as %s and starting this expert fresh", uid, why, moved)

    def add(self, uid: str, backend: Any) -> None:
        """Checkpoint ``uid`` from now on (a shard moved in)."""
        with self._lock:
            self.backends = {**self.backends, uid: backend}

    def remove(self, uid: str) -> None:
        """Stop checkpointing ``uid`` (it moved out; its last file stays on disk)."""
        with self._lock:
            self.backends = {k: v for k, v in self.backends.items() if k != uid}

    def checkpoint(
        self,
        exclusive: Callable[[], AbstractContextManager[Any]] | None = None,
        force: bool = False,
    ) -> CheckpointReport:
        """Snapshot changed experts under ``exclusive()`` then write them; never raises."""
        with self._lock:
            return self._checkpoint(exclusive, force)

    def _checkpoint(
        self, exclusive: Callable[[], AbstractContextManager[Any]] | None, force: bool
    ) -> CheckpointReport:
        start = time.monotonic()
        report = CheckpointReport()
        snapshots: dict[str, Any] = {}
        versions: dict[str, tuple[int, int]] = {}
        with exclusive() if exclusive is not None else contextlib.nullcontext():
            for uid, backend in self.backends.items():
                versions[uid] = _version(backend)
                report.updates_applied[uid] = versions[uid][0]
                if not force and self._saved_updates.get(uid) == versions[uid] and self.store.path(uid).exists():
                    report.unchanged.append(uid)
                    continue
                try:
                    snapshots[uid] = clone_state(backend.state_dict())
                except Exception as exc:
                    report.failed[uid] = f"{type(exc).__name__}: {exc}"
        for uid, state in snapshots.items():
            bad = non_finite_tensor(state)
            if bad is not None:  # the last good checkpoint stays
                report.failed[uid] = f"non-finite values in {bad}: kept the last good checkpoint"
                continue
            try:
                report.bytes_written += self.store.save(uid, state)
            except Exception as exc:  # disk full, permissions...: report, keep serving
                report.failed[uid] = f"{type(exc).__name__}: {exc}"
                continue
            report.written.append(uid)
            self._saved_updates[uid] = versions[uid]
        report.duration_s = time.monotonic() - start
        self.passes += 1
        self.last_at = time.time()
        self.last_report = report
        self.last_error = "; ".join(f"{u}: {e}" for u, e in report.failed.items()) or None
        if report.failed:
            log.error("checkpoint failed for %s", self.last_error)
        elif report.written:
            log.info("checkpointed %d expert(s) in %.2fs (%d bytes)", len(report.written), report.duration_s,
                     report.bytes_written)
        return report

    def summary(self, interval_s: float) -> dict[str, Any]:
        return {
            "directory": str(self.store.directory),
            "fingerprint": self.store.fingerprint,
            "interval_s": interval_s,
            "last_at": self.last_at,
            "last_age_s": None if self.last_at is None else max(0.0, time.time() - self.last_at),
            "passes": self.passes,
            "last_error": self.last_error,
            "last": self.last_report.as_dict() if self.last_report else None,
            "resumed": self.resumed,
            "set_aside": self.set_aside,
        }


def _version(backend: Any) -> tuple[int, int]:
    """What says a saved copy is stale: optimizer steps, and changes without one (replica
    averaging bumps ``weights_revision``, ``volunteer.daemon.replicas``)."""
    return int(backend.updates_applied), int(getattr(backend, "weights_revision", 0))
