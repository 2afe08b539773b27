"""Client side of the control API, used by ``volunteer status``, ``leave``, ``pause`` and ``resume``.

Finds the daemon through ``<home>/control.json`` (published atomically once the daemon is
ready) and raises ``DaemonNotRunningError`` with the command that starts one when there is
no daemon, or ``DaemonStartingError`` when one holds the home lock but is not ready yet.
Imports nothing heavy, so these commands answer instantly.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from volunteer.daemon.control_protocol import (
    MAX_REPLY_BYTES,
    ProtocolError,
    recv_message,
    send_message,
)
from volunteer.daemon.home import NodeHome


class DaemonNotRunningError(Exception):
    """No daemon serves this home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        hint = "" if str(home) == "" else f" --home {home}"
        super().__init__(f"daemon not running (home {home}): start it with `volunteer join demo{hint}`")


class DaemonStartingError(Exception):
    """A daemon holds the home but has not published its control address yet."""

    def __init__(self, home: Path) -> None:
        super().__init__(f"daemon starting (home {home}): its control API is not ready yet, try again shortly")


class ControlError(Exception):
    """The daemon answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def call(home: Path, op: str, wait_s: float = 10.0, **args: Any) -> Any:
    """Send one request to the daemon of ``home`` and return its result."""
    node = NodeHome(home)
    info = node.read_control_file()
    if info is None:
        if node.is_locked():
            raise DaemonStartingError(home)
        raise DaemonNotRunningError(home)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(wait_s)
    try:
        try:
            sock.connect(info["socket"])
        except (FileNotFoundError, ConnectionRefusedError):
            if node.is_locked():  # a new daemon holds the home and has not replaced the file yet
                raise DaemonStartingError(home) from None
            raise DaemonNotRunningError(home) from None  # a stale control.json of a killed daemon
        send_message(sock, {"op": op, **args})
        try:
            reply = recv_message(sock, MAX_REPLY_BYTES)
        except ProtocolError as exc:
            raise ControlError("protocol", str(exc)) from None
    except TimeoutError:
        raise ControlError("timeout", f"the daemon did not answer {op!r} within {wait_s:g}s") from None
    except OSError as exc:  # the daemon closed or reset the connection mid-request
        raise ControlError("connection", f"lost the connection to the daemon: {exc}") from None
    finally:
        sock.close()
    if reply.get("ok") is True:
        return reply.get("result")
    if reply.get("ok") is not False:
        raise ControlError("protocol", "malformed reply (no ok field)")
    err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    raise ControlError(str(err.get("code", "unknown")), str(err.get("message", "malformed error reply")))
