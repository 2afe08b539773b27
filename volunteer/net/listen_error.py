"""``ListenError``: why the libp2p host could not listen, as far as a probe bind can tell.

py-libp2p 0.8.1 only logs a listen that fails (port taken, address not local) and runs on
with no address; the network service checks that its host listens and raises this one-line
``OSError`` instead of returning a node nobody can dial.
"""

from __future__ import annotations

import errno
import socket


class ListenError(OSError):
    """The libp2p host could not listen on its address (``str(err)`` is one line).

    ``address`` is "host:port", ``reason`` the probe's answer (e.g. "Address already in use").
    """

    def __init__(self, code: int, address: str, reason: str) -> None:
        super().__init__(code, f"the peer network cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason


def listen_error(host: str, port: int) -> ListenError:
    """Why listening on host:port failed, as far as a probe bind can tell (libp2p hides it)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    code, reason = errno.EADDRNOTAVAIL, "the address was refused"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        code, reason = exc.errno or code, exc.strerror or str(exc)
    return ListenError(code, where, reason)
