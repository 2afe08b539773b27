"""Are the node's ports free? A probe bind (the network layer's), and the fix per port.

The daemon binds two TCP ports: the ZeroMQ frontend (settings ``zmq_host``/``zmq_port``)
and the libp2p host (``listen_host`` and ``listen_port``: the setting, else the manifest's
``network.listen_port``, else, for 0, the port this home used last, which the daemon reuses
when it is free). Port 0 means "any free port" and cannot clash. The probe is
``volunteer.net.listen_error.port_holder_error``: a bind without ``SO_REUSEPORT`` (so a libp2p
listener that set it still counts as a holder), naming the holder's pid where the OS shows it.
"""

from __future__ import annotations

import errno

from volunteer.doctor.report import Check, failed, ok, warn


def check_port(name: str, host: str, port: int, what: str, fix: str,
               own_ports: frozenset[int] = frozenset(), movable: bool = False) -> Check:
    """A ``Check`` for one port. ``fix``: how to choose another port; ``own_ports``: ports this
    home's running daemon holds (fine); ``movable``: a kept port the daemon replaces when it
    is taken (a warning: the address printed before changes)."""
    from volunteer.net.listen_error import port_holder_error, where

    at = where(host, port)
    if port == 0:
        return ok(name, f"{what}: any free port on {host} (port 0)", host=host, port=0)
    if port in own_ports:
        return ok(name, f"{what}: {at} is held by this home's running daemon", host=host, port=port)
    err = port_holder_error(host, port)
    if err is None:
        kept = " (the port this home used last)" if movable else ""
        return ok(name, f"{what}: {at} is free{kept}", host=host, port=port)
    if err.in_use:
        who = f" by {err.holder}" if err.holder else ""
        if movable:
            return warn(name, f"{what}: {at}, the port this home used last, is in use{who}: the daemon "
                        "will listen on a new one, and the --bootstrap address it printed before changes",
                        f"share the new address, or fix one: {fix}", host=host, port=port, holder=err.holder)
        return failed(name, f"{what}: {at} is already in use{who}", fix, host=host, port=port, holder=err.holder)
    if err.errno in (errno.EACCES, errno.EPERM):
        return failed(name, f"{what}: cannot bind {at}: {err.reason}",
                      "ports below 1024 need privileges: pick one above 1024", host=host, port=port)
    return failed(name, f"{what}: cannot bind {at}: {err.reason}",
                  "use an address of this machine (0.0.0.0 for all, 127.0.0.1 for loopback)",
                  host=host, port=port)
