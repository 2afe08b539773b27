"""Reading a lab router's conntrack table: which TCP flows its NAT saw, per far end.

The routers' tables (``NatLab.conntrack(lan)``, the text of ``/proc/net/nf_conntrack``) are
the NAT's own account of a path, independent of what the nodes report: a flow between a
LAN host and another NAT's public address that got an answer (not ``[UNREPLIED]``) proves
packets went both ways directly; a blocked path leaves at most unanswered attempts.

``tcp_flows(table)`` parses the TCP lines; ``with_peer(flows, ip)`` keeps the flows whose
far end is ``ip``; ``answered(flows)`` keeps those that got packets back.
"""

from __future__ import annotations


def tcp_flows(table: str) -> list[dict]:
    """TCP flows of a conntrack table: state, original src/dst/ports, the reply's source,
    bytes both ways (with ``nf_conntrack_acct=1``), whether the flow was ever answered."""
    flows = []
    for line in table.splitlines():
        parts = line.split()
        if "tcp" not in parts:
            continue
        kv: dict[str, list[str]] = {}
        for p in parts:
            if "=" in p:
                k, v = p.split("=", 1)
                kv.setdefault(k, []).append(v)
        if "src" not in kv or "dst" not in kv or "sport" not in kv or "dport" not in kv:
            continue
        at = parts.index("tcp")
        state = parts[at + 3] if len(parts) > at + 3 else ""
        flows.append({"state": state, "src": kv["src"][0], "dst": kv["dst"][0],
                      "sport": int(kv["sport"][0]), "dport": int(kv["dport"][0]),
                      "reply_src": kv["src"][-1], "reply_sport": int(kv["sport"][-1]),
                      "bytes": sum(int(b) for b in kv.get("bytes", [])),
                      "answered": "[UNREPLIED]" not in parts})
    return flows


def with_peer(flows: list[dict], ip: str) -> list[dict]:
    """Flows whose far end (as seen from the LAN) is ``ip``."""
    return [f for f in flows if ip in (f["dst"], f["reply_src"])]


def answered(flows: list[dict]) -> list[dict]:
    """Flows that got packets back from their far end (a path that worked)."""
    return [f for f in flows if f["answered"]]
