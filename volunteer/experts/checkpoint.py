"""Per-expert checkpoints: atomic, fingerprinted, loaded without pickle's code execution.

One file per hosted expert uid in ``<home>/checkpoints/<experiment>/<uid>.pt`` holding
``{"format", "uid", "fingerprint", "saved_at", "state"}`` where ``state`` is the backend's
``state_dict()`` (module weights, optimizer state, ``updates_applied``).

- Writes are atomic (``volunteer.fsutil.atomic_write``): ``torch.save`` into a temp file in
  the same directory, fsync, rename, fsync the directory. A crash (even ``kill -9``) leaves
  either the old or the new file.
- Loads use ``torch.load(weights_only=True)``: tensors and plain containers only.
- The manifest fingerprint (architecture + optimizer kind) is stored and checked, so a
  changed architecture is never loaded silently: ``CheckpointMismatchError`` names both
  fingerprints and ``CheckpointStore.set_aside`` keeps the old file next to the new ones.
- ``clone_state`` copies a state dict (tensors to CPU) so the caller can snapshot under
  ``Runtime.exclusive()`` and do the slow disk write after compute resumes.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from volunteer.fsutil import atomic_write

CHECKPOINT_FORMAT = 1
_UID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for another architecture (different fingerprint)."""

    def __init__(self, path: Path, found: str, expected: str) -> None:
        super().__init__(
            f"{path}: written for manifest fingerprint {found}, this experiment has {expected} "
            "(the expert architecture or optimizer changed)"
        )
        self.found = found
        self.expected = expected


def clone_state(obj: Any) -> Any:
    """Deep copy of a state dict: tensors detached and copied to CPU, containers rebuilt."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_state(v) for v in obj)
    return obj


def non_finite_tensor(obj: Any, path: str = "state") -> str | None:
    """Where the first floating tensor with NaN or infinity sits in a state dict (None: none).

    Checked before a checkpoint is written, a shard handed out or a downloaded one loaded:
    non-finite weights never overwrite good ones (a sum per tensor: NaN/inf make it non-finite).
    """
    import math

    import torch

    if isinstance(obj, torch.Tensor):
        return path if obj.is_floating_point() and not math.isfinite(obj.sum().item()) else None
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = non_finite_tensor(value, f"{path}.{key}")
        if found is not None:
            return found
    return None


def save_checkpoint(path: Path, uid: str, fingerprint: str, state: Mapping[str, Any]) -> int:
    """Atomically write one expert's checkpoint; returns the file size in bytes."""
    import torch

    payload = {
        "format": CHECKPOINT_FORMAT,
        "uid": uid,
        "fingerprint": fingerprint,
        "saved_at": time.time(),
        "state": dict(state),
    }
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: Path, uid: str, fingerprint: str, map_location: str = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; returns its ``state``.

    Raises ``FileNotFoundError`` when absent, ``CheckpointMismatchError`` for another
    architecture, ``CheckpointError`` for anything unreadable or inconsistent.
    """
    import torch

    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for corrupt/truncated files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a volunteer checkpoint (format {CHECKPOINT_FORMAT})")
    if payload.get("uid") != uid:
        raise CheckpointError(f"{path}: holds expert {payload.get('uid')!r}, expected {uid!r}")
    if payload.get("fingerprint") != fingerprint:
        raise CheckpointMismatchError(path, str(payload.get("fingerprint")), fingerprint)
    state = payload.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: missing expert state")
    return state


class CheckpointStore:
    """The checkpoint directory of one experiment on one node."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    def path(self, uid: str) -> Path:
        if not _UID_RE.match(uid) or ".." in uid:
            raise ValueError(f"expert uid {uid!r} is not usable as a file name")
        return self.directory / f"{uid}.pt"

    def saved_uids(self) -> list[str]:
        """Uids that have a checkpoint file (any fingerprint), sorted."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name[:-3] for p in self.directory.glob("*.pt") if _UID_RE.match(p.name[:-3]))

    def save(self, uid: str, state: Mapping[str, Any]) -> int:
        return save_checkpoint(self.path(uid), uid, self.fingerprint, state)

    def load(self, uid: str) -> dict[str, Any] | None:
        """The checkpointed state of ``uid``, or None when there is none."""
        try:
            return load_checkpoint(self.path(uid), uid, self.fingerprint)
        except FileNotFoundError:
            return None

    def set_aside(self, uid: str, reason: str) -> Path:
        """Rename an unusable checkpoint out of the way (kept for the volunteer to inspect)."""
        src = self.path(uid)
        dst = src.with_name(f"{uid}.{reason}-{int(time.time())}.bak")
        os.replace(src, dst)
        return dst

