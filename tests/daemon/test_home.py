"""Node home: layout, permissions, the single-daemon lock, atomic control file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from volunteer.daemon.home import HomeLockedError, NodeHome, resolve_home


def test_create_makes_owner_only_dirs(tmp_path: Path) -> None:
    node = NodeHome(tmp_path / "home")
    node.create()
    for path in (node.root, node.run_dir, node.cache_dir, node.logs_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_resolve_home_precedence(tmp_path: Path) -> None:
    assert resolve_home(tmp_path / "flag", {"VOLUNTEER_HOME": str(tmp_path / "env")}) == tmp_path / "flag"
    assert resolve_home(None, {"VOLUNTEER_HOME": str(tmp_path / "env")}) == tmp_path / "env"
    assert resolve_home(None, {}).name == "volunteer"


def test_second_lock_on_same_home_is_refused_with_pid(tmp_path: Path) -> None:
    first, second = NodeHome(tmp_path), NodeHome(tmp_path)
    first.acquire_lock()
    try:
        assert second.is_locked()
        with pytest.raises(HomeLockedError) as info:
            second.acquire_lock()
        assert info.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(info.value) and "--home" in str(info.value)
    finally:
        first.release_lock()
    assert not second.is_locked()
    second.acquire_lock()
    second.release_lock()


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    code = (
        "import sys,time; from pathlib import Path; from volunteer.daemon.home import NodeHome;"
        "n=NodeHome(Path(sys.argv[1])); n.acquire_lock(); print('locked', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(HomeLockedError) as info:
            NodeHome(tmp_path).acquire_lock()
        assert info.value.pid == proc.pid
    finally:
        proc.communicate("", timeout=30)
    NodeHome(tmp_path).acquire_lock()  # released when the holder exits


def test_control_file_roundtrip_and_garbage(tmp_path: Path) -> None:
    node = NodeHome(tmp_path)
    assert node.read_control_file() is None
    node.write_control_file({"socket": "/x/control.sock", "pid": 1})
    assert node.read_control_file() == {"socket": "/x/control.sock", "pid": 1}
    assert stat.S_IMODE(node.control_file.stat().st_mode) == 0o600
    node.control_file.write_text("{not json")
    assert node.read_control_file() is None
    node.control_file.write_text('{"pid": 3}')
    assert node.read_control_file() is None
    node.remove_control_file()
    node.remove_control_file()
    assert not node.control_file.exists()
