"""Read the swarm from a throwaway client peer: the data behind ``volunteer swarm``.

``swarm_targets(...)`` gathers the peers to join through: ``--bootstrap`` flags first, then
the addresses of the daemon running on this home (asked read-only through the control API's
``status``: it is in the swarm already), then the manifest's bootstrap peers.
``read_swarm(...)`` probes them by TCP (``bootstrap.probe_tcp``: a dead peer is reported as
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

TCP_TIMEOUT_S = 3.0
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


def swarm_targets(flags: Sequence[str], daemon: Sequence[str], manifest: Sequence[str]) -> list[boot.Target]:
    out: dict[str, boot.Target] = {}
    for source, addrs in (("flag", flags), ("daemon", daemon), ("manifest", manifest)):
        for addr in addrs:
            if addr in out:
                continue
            try:
                out[addr] = boot.parse_target(addr, source)
            except ValueError:
                continue
    return list(out.values())


def read_swarm(experiment: str, prefix: str, dims: Sequence[int], targets: Sequence[boot.Target],
               listen_host: str, lookup_timeout: float = LOOKUP_TIMEOUT_S) -> dict[str, Any]:
    """Join through ``targets`` and summarise the grid (see module docstring)."""
    if not targets:
        raise NoBootstrapError("no peer to ask: the manifest names no bootstrap peer and no daemon runs on "
                               "this home; pass --bootstrap <address of a running volunteer> "
                               "(`volunteer status` on it prints its address)")
    results = [boot.probe_tcp(t, TCP_TIMEOUT_S) for t in targets]
    live = [r.target.addr for r in results if r.error is None]
    if not live:
        why = "; ".join(f"{r.error} (from the {r.target.source})" for r in results[:4])
        raise SwarmUnreachableError(f"cannot reach any peer of the swarm: {why}")
    from volunteer.client.node import ClientNode  # libp2p loads only when there is a peer to ask
    from volunteer.doctor.census import read_grid
    from volunteer.doctor.swarm_summary import summarise

    family = "ip6" if ":" in listen_host else "ip4"
    client = ClientNode(experiment, live, listen_addrs=(f"/{family}/{listen_host}/tcp/0",), nat=False,
                        lookup_timeout=lookup_timeout)
    client.start(timeout=START_TIMEOUT_S)
    try:
        if not client.connected_peers():
            state = client.node.bootstrap_state
            raise SwarmUnreachableError("the peers answer TCP but no libp2p handshake completed "
                                        f"({state.last_error or 'no answer'}): check the /p2p/<peer id> "
                                        "part of the address")
        census = client.call(read_grid, client.registry, prefix, list(dims), lookup_timeout)
    finally:
        client.stop()
    summary = summarise(census, experiment)
    summary["joined_through"] = live
    return summary
