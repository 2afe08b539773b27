"""The daemon's control API server: a Unix socket in the node home, owner-only.

The socket lives in ``<home>/run`` (0700) and is chmod 0600 right after bind, so other users
can neither list nor connect to it. Unix socket paths are limited to ~107 bytes; when the
home is deeper than that the socket goes into a private ``mkdtemp`` directory instead, and
the address clients must use is what ``control.json`` says (written atomically once ready).

Each connection is served by its own short-lived thread (bounded count), one request per
connection, read within ``READ_TIMEOUT_S`` in total (not per byte: a client trickling bytes
cannot hold a slot longer). Handlers receive the request dict and return a JSON-serialisable
result or raise ``ControlRequestError``; anything else, a result that is not JSON included,
becomes an "internal" error reply. Garbage gets a "bad_request" reply; an accept() failure
(e.g. out of file descriptors) is logged and retried, never ends the accept loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from volunteer.daemon.control_protocol import (
    MAX_REQUEST_BYTES,
    ProtocolError,
    recv_message,
    send_message,
)

log = logging.getLogger(__name__)
MAX_SOCKET_PATH = 100
MAX_CONNECTIONS = 16
READ_TIMEOUT_S = 5.0
ACCEPT_RETRY_S = 0.05  # pause after a failed accept() (EMFILE would otherwise spin)

Handler = Callable[[dict[str, Any]], Any]


class ControlRequestError(Exception):
    """A request the daemon refuses; becomes ``{"ok": false, "error": {code, message}}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ControlServer:
    """Serves ``handlers`` (op name -> callable) on a Unix socket under ``run_dir``."""

    def __init__(self, run_dir: Path, handlers: Mapping[str, Handler]) -> None:
        self._handlers = dict(handlers)
        self._run_dir = Path(run_dir)
        self._private_dir: str | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._workers: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.path: str = ""

    def start(self) -> None:
        path = self._run_dir / "control.sock"
        if len(str(path)) > MAX_SOCKET_PATH:
            self._private_dir = tempfile.mkdtemp(prefix="volunteer-")  # created 0700
            path = Path(self._private_dir) / "control.sock"
        if path.exists() or path.is_symlink():
            path.unlink()  # stale socket of a daemon that died; we hold the home lock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(MAX_CONNECTIONS)
        sock.settimeout(0.2)
        self._sock = sock
        self.path = str(path)
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set() or self._sock is None:
                    return
                log.warning("control socket accept failed: %s", exc)
                time.sleep(ACCEPT_RETRY_S)
                continue
            if not self._slots.acquire(blocking=False):
                self._reply_and_close(conn, _error("busy", "too many concurrent control connections"))
                continue
            worker = threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True)
            with self._lock:
                self._workers.add(worker)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                request = recv_message(conn, MAX_REQUEST_BYTES, time.monotonic() + READ_TIMEOUT_S)
            except (ProtocolError, OSError) as exc:
                self._reply_and_close(conn, _error("bad_request", str(exc)))
                return
            self._reply_and_close(conn, self._dispatch(request))
        finally:
            self._slots.release()
            with self._lock:
                self._workers.discard(threading.current_thread())

    def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return _error("unknown_op", f"unknown op {op!r}; known: {', '.join(sorted(self._handlers))}")
        try:
            return {"ok": True, "result": handler(request)}
        except ControlRequestError as exc:
            return _error(exc.code, exc.message)
        except Exception as exc:
            log.exception("control op %s failed", op)
            return _error("internal", f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _reply_and_close(conn: socket.socket, reply: dict[str, Any]) -> None:
        try:
            conn.settimeout(READ_TIMEOUT_S)
            try:
                send_message(conn, reply)
            except (TypeError, ValueError) as exc:  # not JSON: nothing was sent yet
                log.warning("control reply is not JSON-serialisable: %s", exc)
                send_message(conn, _error("internal", f"reply not serialisable: {exc}"[:300]))
            _discard_unread(conn)
        except (OSError, TypeError, ValueError) as exc:
            log.debug("control reply not delivered: %s", exc)
        finally:
            conn.close()

    def stop(self, join_timeout: float = 2.0) -> None:
        """Stop accepting, give running handlers ``join_timeout`` to reply, remove the socket."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            if worker is not threading.current_thread():
                worker.join(timeout=join_timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None


def _discard_unread(conn: socket.socket) -> None:
    """Read (and drop) what a client sent beyond its request, without waiting: closing a
    Unix socket with unread bytes resets the connection, and the client would lose the
    reply it has not read yet (a "bad_request" answer to garbage, typically)."""
    conn.setblocking(False)
    for _ in range(MAX_REQUEST_BYTES // 65536 + 1):
        try:
            if not conn.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}
