"""Read the swarm from a throwaway client peer: the data behind ``volunteer swarm``.

``swarm_targets(...)`` gathers the peers to join through: ``--bootstrap`` flags first, then
the addresses of the daemon running on this home (asked read-only through the control API's
``status``: it is in the swarm already), then the manifest's bootstrap peers.
``read_swarm(...)`` dials each once (``bootstrap.probe``: a dead peer is reported as
"connection refused at HOST:PORT", never a libp2p trace), joins the DHT through the ones
that answer with a ``ClientNode`` (DHT client mode, ephemeral identity, no NAT traversal: it
only reads), reads the grid's records (``census.read_grid``) and returns the summary
(``swarm_summary.summarise``). The client stops before it returns, also on errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from volunteer.doctor import bootstrap as boot

START_TIMEOUT_S = 30.0
LOOKUP_TIMEOUT_S = 8.0


class SwarmUnreachableError(Exception):
    """No peer to join through answered; ``str(err)`` names each address and its failure."""


class NoBootstrapError(Exception):
    """Nothing to join through (no flag, no daemon on the home, none in the manifest)."""


def daemon_view(home: Path) -> Mapping[str, Any] | None:
    """The status snapshot of the daemon running on ``home``, or None when none answers."""
    from volunteer.daemon.control_client import call
    from volunteer.daemon.home import NodeHome

    if not home.is_dir() or not NodeHome(home).is_locked():
        return None
    try:
        snap = call(home, "status", wait_s=3.0)
    except Exception:
        return None
    return snap if isinstance(snap, Mapping) else None


def daemon_addrs(snap: Mapping[str, Any] | None) -> list[str]:
    """The running daemon's own multiaddrs (bounded, strings with /p2p/ only)."""
    net = snap.get("network") if snap else None
    addrs = net.get("addrs") if isinstance(net, Mapping) else None
    if not isinstance(addrs, list):
        return []
    return [a for a in addrs[:16] if isinstance(a, str) and "/p2p/" in a and len(a) <= 512]


FROM_DAEMON = "the daemon running on this home"
FROM_MANIFEST = "the manifest's network.bootstrap"


def swarm_targets(flags: Sequence[str], daemon: Sequence[str], manifest: Sequence[str]) -> dict[str, str]:
    """address -> where it came from: the flags first, then the daemon's, then the manifest's."""
    from volunteer.daemon.network import FROM_FLAG

    out: dict[str, str] = {}
    for origin, addrs in ((FROM_FLAG, flags), (FROM_DAEMON, daemon), (FROM_MANIFEST, manifest)):
        for addr in addrs:
            out.setdefault(addr, origin)
    return out


def read_swarm(experiment: str, prefix: str, dims: Sequence[int], targets: Mapping[str, str],
               listen_host: str, lookup_timeout: float = LOOKUP_TIMEOUT_S) -> dict[str, Any]:
    """Join through ``targets`` (address -> origin) and summarise the grid (module docstring)."""
    if not targets:
        raise NoBootstrapError("no peer to ask: the manifest names no bootstrap peer and no daemon runs on "
                               "this home; pass --bootstrap <address of a running volunteer> "
                               "(`volunteer status` on it prints its address)")
    results = boot.probe(list(targets)[:boot.MAX_ADDRS])
    live = [r.addr for r in results if r.ok]
    if not live:
        why = "; ".join(f"{r.problem} (address from {targets.get(r.addr, '?')})" for r in results[:4])
        raise SwarmUnreachableError(f"cannot reach any peer of the swarm: {why}")
    from volunteer.client.node import ClientNode  # libp2p's host loads only when a peer answered
    from volunteer.doctor.census import read_grid
    from volunteer.doctor.swarm_summary import summarise

    family = "ip6" if ":" in listen_host else "ip4"
    client = ClientNode(experiment, live, listen_addrs=(f"/{family}/{listen_host}/tcp/0",), nat=False,
                        lookup_timeout=lookup_timeout)
    client.start(timeout=START_TIMEOUT_S)
    try:
        if not client.connected_peers():
            raise SwarmUnreachableError("the peers answered a dial, but joining the DHT through them failed "
                                        f"({client.node.bootstrap_state.last_error or 'no answer'})")
        census = client.call(read_grid, client.registry, prefix, list(dims), lookup_timeout)
    finally:
        client.stop()
    summary = summarise(census, experiment)
    summary["joined_through"] = live
    return summary
