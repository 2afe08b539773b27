"""The swarm as the DHT shows it, derived from a ``Census`` without any I/O (pure).

``summarise(census, experiment)`` -> a JSON-ready dict (the shape ``volunteer swarm --json``
prints and ``volunteer.status.swarm_table`` renders):

- ``volunteers``: one row per peer (its freshest entry): reachability class, state, load,
  free slots, how many uids it lists, its first addresses;
- ``reachability``: the mix, each volunteer counted once: ``public`` (its record says so),
  ``relayed`` (private, or not yet checked with only ``/p2p-circuit`` addresses: reachable
  through a relay), ``private`` (private, no relay: nobody can dial it), ``unknown`` (not yet
  checked; it announces direct addresses that may well be dialable, e.g. the founder of a
  new swarm that also holds a relay slot);
- ``uids``: every uid of the grid with its replicas (peer, version = updates applied, load,
  state), ``unserved``: the uids no serving replica lists;
- ``totals`` and ``lookups`` (prefixes that did not answer, whether the grid was cut).

Every number comes from signed records, which proves only who wrote it: the record reader
already bounded each field (``record_fields``: load in [0, 1], versions <= 2^53, at most 16
addresses), and here replicas are one per peer per uid (``record_fields.freshest_per_peer``, the rule
``daemon.swarm_view.SwarmView.others`` applies too), so a peer cannot inflate a uid's replica
count by announcing it twice.
"""

from __future__ import annotations

from typing import Any

from volunteer.doctor.census import Census
from volunteer.net.record_fields import freshest_per_peer
from volunteer.net.records import ServerEntry

PUBLIC = "public"
RELAYED = "relayed"
PRIVATE = "private"
UNKNOWN = "unknown"
CLASSES = (PUBLIC, RELAYED, PRIVATE, UNKNOWN)
SHOWN_ADDRS = 2


def reach_class(entry: ServerEntry) -> str:
    """public / relayed / private / unknown for one record (see module docstring)."""
    if entry.reachability == PUBLIC:
        return PUBLIC
    relayed = any("/p2p-circuit" in a for a in entry.addrs)
    if entry.reachability == PRIVATE:
        return RELAYED if relayed else PRIVATE
    direct = any("/p2p-circuit" not in a for a in entry.addrs)
    return RELAYED if relayed and not direct else UNKNOWN


def summarise(census: Census, experiment: str) -> dict[str, Any]:
    """The JSON-ready view of ``census`` (see module docstring)."""
    seen: list[ServerEntry] = []
    listed: dict[str, int] = {}
    uids: list[dict[str, Any]] = []
    unserved: list[str] = []
    for uid in census.uids:
        child = uid.rsplit(".", 1)[1]
        rows = []
        for e in sorted(freshest_per_peer(census.entries.get(uid, ())), key=lambda e: e.peer_id):
            info = e.shard(child)
            rows.append({"peer_id": e.peer_id, "version": info.version if info else None,
                         "load": e.load, "state": e.state})
            listed[e.peer_id] = listed.get(e.peer_id, 0) + 1
            seen.append(e)
        uids.append({"uid": uid, "replicas": rows})
        if not any(r["state"] == "serving" for r in rows):
            unserved.append(uid)
    volunteers = [{"peer_id": pid, "reachability": reach_class(e), "state": e.state, "load": e.load,
                   "free": e.free, "uids": listed[pid], "addrs": list(e.addrs[:SHOWN_ADDRS])}
                  for pid, e in sorted((e.peer_id, e) for e in freshest_per_peer(seen))]
    mix = {c: sum(1 for v in volunteers if v["reachability"] == c) for c in CLASSES}
    replicas = sum(len(u["replicas"]) for u in uids)
    return {
        "experiment": experiment,
        "grid": {"prefix": census.prefix, "dims": list(census.dims), "size": len(census.uids),
                 "truncated": census.truncated},
        "volunteers": volunteers,
        "reachability": mix,
        "uids": uids,
        "unserved": unserved,
        "totals": {"volunteers": len(volunteers), "uids": len(uids), "served": len(uids) - len(unserved),
                   "unserved": len(unserved), "replicas": replicas,
                   "draining": sum(1 for v in volunteers if v["state"] == "draining")},
        "lookups": {"unanswered": list(census.unanswered)},
    }
