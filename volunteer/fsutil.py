"""Crash-safe file writes shared by every package that persists state in the node home.

``atomic_write`` writes through a temp file in the target's directory, fsyncs it, sets its
permissions, renames it over the target and fsyncs the directory, so a crash (even
``kill -9`` or power loss) leaves either the old or the new file, never a torn one, and a
failed write leaves no temp file behind. It lives at the top level (not in ``daemon``)
because ``experts`` writes checkpoints with it and imports flow experts -> runtime -> daemon.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], None], mode: int = 0o600) -> int:
    """Replace ``path`` with what ``write(fh)`` writes to a binary file; returns its size.

    The parent directory must exist. Any exception from ``write`` (or the file system)
    propagates after the temp file is removed; ``path`` is then untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return size


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> int:
    """``atomic_write`` of a byte string."""

    def write(fh: BinaryIO) -> None:
        fh.write(data)

    return atomic_write(path, write, mode)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
