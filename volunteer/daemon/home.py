"""The node home: one directory per node holding everything it owns, and its lock.

Layout (created 0700)::

    <home>/config.yaml              local settings (optional, written by the volunteer)
    <home>/node.lock                flock'ed while a daemon runs; holds its pid
    <home>/control.json             control API address, written atomically once ready
    <home>/network.json             the libp2p port last listened on (reused: see below)
    <home>/run/control.sock         the control socket (0600) when its path is short enough
    <home>/cache/                   self-benchmark results and other caches
    <home>/checkpoints/<experiment>/  one checkpoint file per hosted expert
    <home>/logs/volunteer.log       the daemon log
    <home>/identity/                the network identity (owned by volunteer.net)

Several nodes with different homes run side by side; the flock makes a second daemon on
the same home fail fast with the pid of the first.

The libp2p port is kept across restarts (``keep_listen_port`` / ``kept_listen_port``): the
``--bootstrap`` address a first volunteer prints names its port, and other volunteers keep
copying it, so a restart that moved to another free port would strand them.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import platformdirs

from volunteer.fsutil import atomic_write_bytes

HOME_ENV = "VOLUNTEER_HOME"
CONTROL_FILE = "control.json"
NETWORK_FILE = "network.json"
MAX_CONTROL_FILE_BYTES = 4096
MAX_NETWORK_FILE_BYTES = 4096


class HomeLockedError(Exception):
    """Another daemon holds this home's lock."""

    def __init__(self, home: Path, pid: int | None) -> None:
        self.home = home
        self.pid = pid
        who = f"(pid {pid}) " if pid else ""
        super().__init__(
            f"another volunteer daemon {who}is already running with home {home}: "
            f"stop it with `volunteer leave --home {home}` or pick another --home"
        )


def default_home() -> Path:
    """The user's data directory for volunteer (platformdirs)."""
    return Path(platformdirs.user_data_dir("volunteer", appauthor=False))


def resolve_home(flag: str | os.PathLike[str] | None, env: dict[str, str] | None = None) -> Path:
    """``--home`` flag > ``VOLUNTEER_HOME`` > the platform default, made absolute."""
    env = dict(os.environ) if env is None else env
    raw = flag or env.get(HOME_ENV) or default_home()
    return Path(raw).expanduser().resolve()


class NodeHome:
    """Paths inside a node home, directory creation and the single-daemon lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None

    config_file = property(lambda self: self.root / "config.yaml")
    lock_file = property(lambda self: self.root / "node.lock")
    control_file = property(lambda self: self.root / CONTROL_FILE)
    run_dir = property(lambda self: self.root / "run")
    cache_dir = property(lambda self: self.root / "cache")
    logs_dir = property(lambda self: self.root / "logs")
    log_file = property(lambda self: self.root / "logs" / "volunteer.log")
    identity_dir = property(lambda self: self.root / "identity")
    network_file = property(lambda self: self.root / NETWORK_FILE)

    def checkpoint_dir(self, experiment: str) -> Path:
        return self.root / "checkpoints" / experiment

    def create(self) -> None:
        """Create the home and its sub-directories with owner-only permissions."""
        for path in (self.root, self.run_dir, self.cache_dir, self.logs_dir, self.root / "checkpoints"):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)

    def acquire_lock(self) -> None:
        """Take the home's exclusive lock or raise ``HomeLockedError`` (never blocks)."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise HomeLockedError(self.root, pid) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def is_locked(self) -> bool:
        """True when some process holds the lock (a daemon is running on this home)."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def write_control_file(self, info: dict[str, Any]) -> None:
        """Atomically publish the control API address (temp file + rename)."""
        atomic_write_bytes(self.control_file, json.dumps(info, indent=2).encode() + b"\n")

    def read_control_file(self) -> dict[str, Any] | None:
        """The published control address, or None when absent/unreadable."""
        try:
            with self.control_file.open("rb") as fh:
                data = fh.read(MAX_CONTROL_FILE_BYTES + 1)
        except OSError:
            return None
        if len(data) > MAX_CONTROL_FILE_BYTES:
            return None
        try:
            info = json.loads(data)
        except ValueError:
            return None
        return info if isinstance(info, dict) and isinstance(info.get("socket"), str) else None

    def kept_listen_port(self) -> int | None:
        """The libp2p port this home listened on last, or None (none kept, or unreadable)."""
        try:
            with self.network_file.open("rb") as fh:
                data = fh.read(MAX_NETWORK_FILE_BYTES + 1)
            info = json.loads(data) if len(data) <= MAX_NETWORK_FILE_BYTES else None
        except (OSError, ValueError):
            return None
        port = info.get("listen_port") if isinstance(info, dict) else None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
            return None
        return port

    def keep_listen_port(self, port: int) -> None:
        """Remember the libp2p port for the next start (atomic; the home must exist)."""
        if port == self.kept_listen_port():
            return
        atomic_write_bytes(self.network_file, json.dumps({"listen_port": int(port)}).encode() + b"\n")

    def remove_control_file(self) -> None:
        try:
            self.control_file.unlink()
        except FileNotFoundError:
            pass


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
