"""Are the node's ports free? A probe bind, and who holds a port that is not.

The daemon binds two TCP ports: the ZeroMQ frontend (settings ``zmq_host``/``zmq_port``)
and the libp2p host (``listen_host`` and the manifest's ``network.listen_port``, or the
``listen_port`` setting where it exists). Port 0 means "any free port" and cannot clash.
A probe bind without ``SO_REUSEPORT`` fails whenever anything listens there, also a libp2p
listener that set ``SO_REUSEPORT`` itself (the case where a second daemon would otherwise
share the port silently); ``SO_REUSEADDR`` keeps a port in TIME_WAIT from looking held.
When the holder can be told (psutil sees the listening socket), the message names its pid.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from volunteer.doctor.report import Check, failed, ok


@dataclass(frozen=True)
class PortProbe:
    """What a probe bind of ``host:port`` found: ``error`` None means the port is free."""

    host: str
    port: int
    error: str | None = None
    code: int = 0
    holder: str | None = None

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def probe_port(host: str, port: int) -> PortProbe:
    """Bind ``host:port`` once (TCP) and release it; say why not when that fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        code = exc.errno or errno.EADDRINUSE
        holder = port_holder(port) if code == errno.EADDRINUSE else None
        return PortProbe(host, port, exc.strerror or str(exc), code, holder)
    return PortProbe(host, port)


def port_holder(port: int) -> str | None:
    """``pid N (name)`` of a process listening on TCP ``port``, when the OS tells us."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    name = psutil.Process(conn.pid).name()
                except Exception:
                    name = "?"
                return f"pid {conn.pid} ({name})"
    except Exception:  # no permission to list sockets (macOS without root), or no psutil
        return None
    return None


def check_port(name: str, host: str, port: int, what: str, setting: str,
               own_ports: frozenset[int] = frozenset()) -> Check:
    """A ``Check`` for one port. ``own_ports``: ports this home's running daemon holds (fine)."""
    if port == 0:
        return ok(name, f"{what}: any free port on {host} (port 0)", host=host, port=0)
    if port in own_ports:
        return ok(name, f"{what}: {host}:{port} is held by this home's running daemon", host=host, port=port)
    probe = probe_port(host, port)
    if probe.error is None:
        return ok(name, f"{what}: {probe.where} is free", host=host, port=port)
    if probe.code == errno.EADDRINUSE:
        who = f" by {probe.holder}" if probe.holder else ""
        return failed(name, f"{what}: {probe.where} is already in use{who}",
                      f"stop what holds it, or pick another port: --set {setting}=<port> (0 = any)",
                      host=host, port=port, holder=probe.holder)
    if probe.code in (errno.EACCES, errno.EPERM):
        return failed(name, f"{what}: cannot bind {probe.where}: {probe.error}",
                      f"ports below 1024 need privileges: pick one above 1024 (--set {setting}=<port>)",
                      host=host, port=port)
    return failed(name, f"{what}: cannot bind {probe.where}: {probe.error}",
                  "use an address of this machine (0.0.0.0 for all, 127.0.0.1 for loopback)",
                  host=host, port=port)
