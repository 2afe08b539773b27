"""The replicas section of ``volunteer status``: how far this node's experts are from their
other holders, and whether replica averaging keeps them together.

Rows from ``snapshot["replicas"]`` (``volunteer.daemon.replicas.ReplicaSync.status``), shown
by both the plain and the rich view: a header with the period and alpha, then per hosted uid
how many other replicas serve it, the relative divergence measured before the last elastic
pull (0: identical copies), exchanges completed and failed (by error code), inbound exchanges
answered, and how long ago the last one completed. Odd values render as "n/a"; no section
(an older daemon, or no peer network) gives no rows; averaging off says so.
"""

from __future__ import annotations

from typing import Any

from volunteer.status import fmt


def divergence_text(value: Any) -> str:
    """``0.0031`` / ``2.1e-07`` / ``n/a`` (relative L2 distance, a fraction)."""
    v = fmt.num(value)
    if v is None:
        return "n/a"
    return f"{v:.2g}" if 0 < v < 1e-3 else f"{v:.4f}"


def replica_rows(snapshot: dict[str, Any]) -> list[tuple[str, str]]:
    """``(label, text)`` rows; empty when the snapshot has no replicas section."""
    rep = snapshot.get("replicas")
    if not isinstance(rep, dict) or not rep:
        return []
    if rep.get("error"):
        return [("averaging", f"failed: {rep['error']}")]
    if rep.get("enabled") is False:
        return [("averaging", "stopped (this node is leaving)")]
    alpha = fmt.num(rep.get("alpha"))
    rows = [("averaging", f"elastic, every {fmt.duration(rep.get('period_s'))} with a random other "
                          f"holder, alpha {'n/a' if alpha is None else f'{alpha:g}'}"
                          f"; {rep.get('rounds', 'n/a')} round(s)"
                          + (f", {rep['lookup_errors']} failed DHT read(s)" if rep.get("lookup_errors") else ""))]
    uids = rep.get("uids") if isinstance(rep.get("uids"), dict) else {}
    for uid in sorted(uids):
        u = uids[uid] if isinstance(uids[uid], dict) else {}
        count = u.get("replica_count")
        if not isinstance(count, int):
            count = len(u["replicas"]) if isinstance(u.get("replicas"), list) else "n/a"
        if count == 0:
            rows.append((uid, "no other replica: nothing to average"))
            continue
        last = fmt.ago(u.get("last_exchange_age_s"))
        failures = fmt.errors_text(u.get("failures"))
        rows.append((uid, f"{count} other replica(s); divergence {divergence_text(u.get('last_divergence'))}; "
                          f"{u.get('exchanges_ok', 'n/a')} exchange(s), {u.get('exchanges_failed', 'n/a')} failed"
                          + (f" ({failures})" if failures != "0" else "")
                          + f", {u.get('inbound_ok', 'n/a')} answered; last {last}"))
    return rows
