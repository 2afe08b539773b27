"""The network section of ``volunteer status``: labelled rows from ``snapshot["network"]``.

Both views (plain and rich) show the same rows: peer id, addresses, reachability, relay in
use, connected peers (direct / relayed / hole-punched), the DHT announce state (records
announced, hosted uids, last announce, heartbeats), bootstrap progress and expert-RPC
counters. ``--json`` carries the whole section. Unknown or odd values render as "n/a";
a section that is not a mapping renders as "not connected".

The addresses others pass to ``--bootstrap`` are not table cells (a cell wraps or cuts them):
``copy_addresses`` lists them for both views to print on lines of their own, whole, under
``COPY_HEADING``; the ``addresses`` row only counts them.
"""

from __future__ import annotations

from typing import Any

from volunteer.status import fmt
from volunteer.status.announce import NOT_ANNOUNCED, announced_where

MAX_ADDRS_SHOWN = 4
MAX_CIRCUITS_SHOWN = 2
COPY_HEADING = "addresses to copy (others join with --bootstrap ADDRESS):"


def network_rows(snapshot: dict[str, Any]) -> list[tuple[str, str]]:
    """``(label, text)`` rows; empty when the node has no network section (disabled)."""
    net = snapshot.get("network")
    if not isinstance(net, dict) or not net:
        return []
    if net.get("error") and not net.get("peer_id"):
        return [("error", str(net["error"]))]
    rows = [
        ("peer id", str(net.get("peer_id") or "n/a")),
        ("addresses", _addrs_count(net)),
        ("reachability", _reachability(net)),
        ("relay", _relay(net)),
        ("peers", _peers(net)),
        ("dht", _dht(net)),
        ("bootstrap", _bootstrap(net)),
    ]
    rpc = net.get("rpc")
    if isinstance(rpc, dict):
        rows.append(("expert rpc", f"{_int(rpc.get('requests'))} request(s) over libp2p, "
                                   f"{_int(rpc.get('streams_open'))} stream(s) open"
                     + (f", errors {fmt.errors_text(rpc.get('errors'))}" if rpc.get("errors") else "")))
    nat = net.get("nat")
    if isinstance(nat, dict) and nat.get("advice") and net.get("reachability") != "public" and not _alone(net):
        rows.append(("advice", str(nat["advice"])))
    if net.get("error"):
        rows.append(("error", str(net["error"])))
    return rows


def _alone(net: dict[str, Any]) -> bool:
    """The node started the swarm and nobody has joined yet: nobody could test reachability."""
    return bool(net.get("new_swarm")) and net.get("reachability") == "unknown"


def _reachability(net: dict[str, Any]) -> str:
    text = str(net.get("reachability") or "n/a")
    return text + " (new swarm: no peer has dialled back yet)" if _alone(net) else text


def _int(value: Any) -> str:
    v = fmt.num(value)
    return "n/a" if v is None else str(int(v))


def copy_addresses(snapshot: dict[str, Any]) -> list[str]:
    """The node's multiaddrs to print whole (the first ``MAX_ADDRS_SHOWN`` direct ones, then
    up to ``MAX_CIRCUITS_SHOWN`` relay circuits), a ``(+N more)`` line when some are left out."""
    net = snapshot.get("network")
    if not isinstance(net, dict):
        return []
    out: list[str] = []
    for key, limit in (("addrs", MAX_ADDRS_SHOWN), ("relay_addrs", MAX_CIRCUITS_SHOWN)):
        value = net.get(key)
        addrs = [a for a in value if _printable_addr(a)] if isinstance(value, list) else []
        out += addrs[:limit]
        if len(addrs) > limit:
            out.append(f"(+{len(addrs) - limit} more)")
    return out


def _printable_addr(addr: Any) -> bool:
    """A multiaddr never holds spaces or control characters (a relay's may come from a peer)."""
    return isinstance(addr, str) and bool(addr) and addr.isprintable() and not any(c.isspace() for c in addr)


def _addrs_count(net: dict[str, Any]) -> str:
    direct = net.get("addrs") if isinstance(net.get("addrs"), list) else []
    circuits = net.get("relay_addrs") if isinstance(net.get("relay_addrs"), list) else []
    if not direct and not circuits:
        return "none"
    text = f"{len(direct)} direct" + (f", {len(circuits)} relay circuit(s)" if circuits else "")
    return text + " (listed on their own lines to copy)"


def _relay(net: dict[str, Any]) -> str:
    relay = net.get("relay")
    circuits = net.get("relay_addrs") if isinstance(net.get("relay_addrs"), list) else []
    if not relay and not circuits:
        return "none (not needed)" if net.get("reachability") == "public" else "none"
    text = str(relay) if relay else "reserved"
    return text + (f" ({len(circuits)} circuit address(es))" if circuits else "")


def _peers(net: dict[str, Any]) -> str:
    peers = net.get("peers") if isinstance(net.get("peers"), dict) else {}
    return (f"{_int(net.get('connected_peers'))} connected: {_int(peers.get('direct'))} direct, "
            f"{_int(peers.get('relayed'))} relayed, {_int(peers.get('hole_punched'))} hole-punched")


def _dht(net: dict[str, Any]) -> str:
    """The announce state; claims "announced" only by the rule the daemon's ready line uses."""
    routing = f"routing table {_int(net.get('routing_table'))}"
    if announced_where(net) is None:
        return (f"{_int(net.get('announced_uids'))} expert(s) not announced ({NOT_ANNOUNCED}; "
                f"announced once a bootstrap peer answers), {routing}")
    last = net.get("last_announce_ok")
    last_text = "ok" if last is True else ("failed" if last is False else "n/a")
    return (f"{_int(net.get('announced_uids'))} expert(s) announced as {net.get('state') or 'n/a'}, "
            f"{_int(net.get('records_announced'))} record(s) written, last announce {last_text}, "
            f"{_int(net.get('heartbeats'))} heartbeat(s), {routing}")


def _bootstrap(net: dict[str, Any]) -> str:
    if net.get("new_swarm"):
        return "new swarm (others join with --bootstrap <one of the addresses to copy>)"
    boot = net.get("bootstrap") if isinstance(net.get("bootstrap"), dict) else {}
    text = (f"{_int(boot.get('peers'))} peer(s) configured, {_int(boot.get('successes'))} of "
            f"{_int(boot.get('attempts'))} round(s) succeeded")
    return text + (f", last error: {boot['last_error']}" if boot.get("last_error") else "")
