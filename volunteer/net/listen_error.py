"""Who holds a TCP port, and ``ListenError``: why the libp2p host cannot listen there.

py-libp2p 0.8.1 only logs a listen that fails (port taken, address not local) and runs on
with no address; the network service checks that its host listens and raises this one-line
``OSError`` instead of returning a node nobody can dial.

A second libp2p host does not even fail: py-libp2p's TCP listener sets ``SO_REUSEPORT`` (DCUtR
hole punching dials *from* the listen port, which on Linux needs the flag on both sockets),
so two daemons of one user bind the same port and the kernel splits incoming connections
between them. The listener keeps the flag (hole punching needs it); ``run_host``
(``volunteer.net.host``) refuses a shared port instead, with two checks of this module:

- ``port_holder_error(host, port)`` before listening: a probe bind *without* ``SO_REUSEPORT``
  fails whenever anything listens on the port, a reuse-port listener included
  (``SO_REUSEADDR`` keeps a port in TIME_WAIT from our own last run from looking held);
- ``shared_port_error(host, port, own)`` after listening: more listening sockets on the port
  than this host opened means another program bound it between the probe and our listen
  (two daemons started at once both refuse; neither serves half the connections).

Both return a ``ListenError`` naming the holder (``pid N (name)``) when the OS shows it; the
doctor (``volunteer doctor``) calls them too, so a held port reads the same everywhere.
"""

from __future__ import annotations

import errno
import os
import socket

ADDRESS_IN_USE = "Address already in use"


class ListenError(OSError):
    """The libp2p host could not listen on its address (``str(err)`` is one line).

    ``address`` is "host:port", ``reason`` the probe's answer (e.g. "Address already in use"),
    ``holder`` the process holding the port ("pid 123 (volunteer)") when the OS tells us.
    """

    def __init__(self, code: int, address: str, reason: str, holder: str | None = None) -> None:
        held = f" by {holder}" if holder else ""
        super().__init__(code, f"the peer network cannot listen on {address}: {reason}{held}")
        self.address = address
        self.reason = reason
        self.holder = holder

    @property
    def in_use(self) -> bool:
        """True when the port is held by another socket (as opposed to a bad address)."""
        return self.errno == errno.EADDRINUSE


def where(host: str, port: int) -> str:
    """``host:port`` (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_error(host: str, port: int) -> ListenError:
    """Why listening on host:port failed, as far as a probe bind can tell (libp2p hides it)."""
    return _probe(host, port) or ListenError(errno.EADDRNOTAVAIL, where(host, port), "the address was refused")


def port_holder_error(host: str, port: int) -> ListenError | None:
    """None when ``host:port`` (TCP) is free to listen on, else why not (see module docstring):
    in use (``err.in_use``, ``err.holder`` names the process when visible), or not an address
    of this machine. A probe bind without ``SO_REUSEPORT``, released at once; port 0 (any free
    port) is free whenever the address is usable."""
    return _probe(host, port)


def _probe(host: str, port: int) -> ListenError | None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        code = exc.errno or errno.EADDRNOTAVAIL
        holders = port_holders(port) if code == errno.EADDRINUSE and port else []
        return ListenError(code, where(host, port), exc.strerror or str(exc), holders[0] if holders else None)
    return None


def shared_port_error(host: str, port: int, own: int = 1) -> ListenError | None:
    """After this process listened on ``host:port`` with ``own`` socket(s): a ``ListenError``
    when more sockets listen on that port (another program shares it through SO_REUSEPORT).

    Counts the listening sockets the OS lists (``psutil``); where it cannot list them (no
    permission), None: the probe before listening still caught every earlier holder.
    """
    if port == 0:
        return None
    listeners = _listeners(port)
    if listeners is None:
        return None
    overlapping = [pid for ip, pid in listeners if _overlap(ip, host)]
    if len(overlapping) <= own:
        return None
    others = [pid for pid in overlapping if pid != os.getpid()]
    holder = _describe(others[0]) if others and others[0] else None
    return ListenError(errno.EADDRINUSE, where(host, port),
                       f"{ADDRESS_IN_USE} (another listener shares it through SO_REUSEPORT)", holder)


def find_listen_error(exc: BaseException) -> ListenError | None:
    """The ``ListenError`` inside ``exc`` (trio nests it in exception groups), if any."""
    stack, seen = [exc], 0
    while stack and seen < 64:
        e, seen = stack.pop(), seen + 1
        if isinstance(e, ListenError):
            return e
        inner = getattr(e, "exceptions", None)
        if isinstance(inner, tuple):
            stack.extend(x for x in inner if isinstance(x, BaseException))
    return None


def port_holders(port: int) -> list[str]:
    """``pid N (name)`` of each process listening on TCP ``port`` that the OS shows us."""
    listeners = _listeners(port) or []
    return [_describe(pid) for pid in dict.fromkeys(pid for _, pid in listeners) if pid]


def _overlap(a: str, b: str) -> bool:
    """True when listeners on addresses ``a`` and ``b`` take the same connections."""
    return a == b or a in _WILDCARDS or b in _WILDCARDS


_WILDCARDS = ("0.0.0.0", "::", "")


def _listeners(port: int) -> list[tuple[str, int | None]] | None:
    """(address, pid) of each socket listening on TCP ``port``, the pid None where it is not
    ours to see; None when the OS does not let us list sockets (macOS without root)."""
    try:
        import psutil

        return [(c.laddr.ip, c.pid) for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
    except Exception:  # psutil.AccessDenied and friends: no answer, not an error
        return None


def _describe(pid: int) -> str:
    try:
        import psutil

        name = psutil.Process(pid).name()
    except Exception:
        name = "?"
    return f"pid {pid} ({name})"


def held_port_line(err: ListenError, what: str, flag: str, origin: str = "") -> str:
    """One plain line for a port that cannot be listened on, e.g. "the libp2p port 31337 on
    0.0.0.0 is in use by pid 123 (python); pick another with --listen-port N (0 = any free
    port) or stop what holds it". ``origin`` names a manifest that fixed the port."""
    if not err.in_use:
        return (f"cannot listen on {err.address} for the {what} ({err.reason}); set the host to an "
                "address of this machine (0.0.0.0: all, 127.0.0.1: loopback)")
    held = f"in use by {err.holder}" if err.holder else "in use"
    set_in = f" (set by {origin})" if origin.startswith("the manifest") else ""
    return (f"the {what} port {err.address} is {held}{set_in}; pick another with {flag} N "
            "(0 = any free port) or stop what holds it")
