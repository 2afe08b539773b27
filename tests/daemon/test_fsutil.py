"""volunteer.fsutil: atomic replace, permissions, size, no temp files left on failure."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import BinaryIO

import pytest

from volunteer.fsutil import atomic_write, atomic_write_bytes, fsync_dir


def test_replaces_the_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    assert atomic_write_bytes(target, b"one") == 3
    assert atomic_write_bytes(target, b"second") == 6
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_mode_is_applied(tmp_path: Path) -> None:
    target = tmp_path / "shared.txt"
    atomic_write_bytes(target, b"x", mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"old")

    def half_then_fail(fh: BinaryIO) -> None:
        fh.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_missing_directory_raises_and_fsync_dir_is_best_effort(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "absent" / "f", b"x")
    fsync_dir(tmp_path / "absent")  # no error: best effort
    fsync_dir(tmp_path)
