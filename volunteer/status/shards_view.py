"""The shards section of ``volunteer status``: what the node hosts, why, and what moves.

Rows from ``snapshot["shards"]`` (``volunteer.daemon.shards.ShardManager.status``), shown by
both the plain and the rich view: per hosted uid its version, where its weights came from,
why this node hosts it, and how many other replicas serve it at which versions (their
spread: replicas drift apart until they are averaged); downloads in progress as a bar with
bytes, rate and holders; recently dropped uids with the reason; the cache's size. Odd values
render as "n/a". ``download_line`` is the compact form for the ``join`` terminal's live line.
"""

from __future__ import annotations

from typing import Any

from volunteer.status import fmt

BAR_WIDTH = 20
MAX_DROPPED_SHOWN = 4


def bar(fraction: Any, width: int = BAR_WIDTH) -> str:
    """``[######--------------]  30%`` for a fraction in [0, 1]."""
    f = fmt.num(fraction)
    f = 0.0 if f is None else min(1.0, max(0.0, f))
    filled = round(f * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {f * 100:3.0f}%"


def _download_text(d: dict[str, Any]) -> str:
    sources = d.get("sources") if isinstance(d.get("sources"), dict) else {}
    text = (f"{bar(d.get('fraction'))} {fmt.bytes_(d.get('have_bytes'))} of {fmt.bytes_(d.get('total_bytes'))}, "
            f"{fmt.rate(d.get('mb_per_s'))} MB/s from {len(sources)} holder(s)")
    if d.get("resumed_bytes"):
        text += f", resumed {fmt.bytes_(d.get('resumed_bytes'))}"
    if d.get("bad_sources"):
        text += f", {len(d['bad_sources'])} bad holder(s) dropped"
    return text


def active_downloads(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sh = snapshot.get("shards")
    downloads = sh.get("downloads") if isinstance(sh, dict) and isinstance(sh.get("downloads"), dict) else {}
    return {u: d for u, d in downloads.items()
            if isinstance(d, dict) and d.get("state") in ("starting", "downloading", "verifying")}


def download_line(snapshot: dict[str, Any]) -> str:
    """``downloading demo.ffn.0.1 [####----] 40% ...`` for the live line ('' when idle)."""
    active = active_downloads(snapshot)
    if not active:
        return ""
    uid, d = sorted(active.items())[0]
    more = f" (+{len(active) - 1} more)" if len(active) > 1 else ""
    return f"downloading {uid} {_download_text(d)}{more}"


def shard_rows(snapshot: dict[str, Any]) -> list[tuple[str, str]]:
    """``(label, text)`` rows; empty when the snapshot has no shards section (older daemon)."""
    sh = snapshot.get("shards")
    if not isinstance(sh, dict) or not sh:
        return []
    rows = [("replication", f"target {sh.get('replication', 'n/a')} per uid; this node hosts up to "
                            f"{sh.get('capacity', 'n/a')} ({sh.get('free', 'n/a')} free; bound: "
                            f"{sh.get('capacity_reason') or 'n/a'}), {sh.get('moves', 0)} move(s)")]
    hosted = sh.get("hosted") if isinstance(sh.get("hosted"), dict) else {}
    for uid in sorted(hosted):
        h = hosted[uid] if isinstance(hosted[uid], dict) else {}
        versions = h.get("replica_versions") if isinstance(h.get("replica_versions"), dict) else {}
        replicas = (f"{len(versions)} other replica(s), versions {sorted(versions.values())}, spread "
                    f"{h.get('version_spread', 'n/a')}" if versions else "no other replica")
        version = f"v{h['version']}" if isinstance(h.get("version"), int) else "(no shard yet)"
        rows.append((uid, f"{h.get('state', 'n/a')} {version}; weights {h.get('weights_from') or 'n/a'}"
                          f"\nwhy: {h.get('reason') or 'n/a'}; {replicas}"))
    for uid, d in sorted(active_downloads(snapshot).items()):
        rows.append((f"download {uid}", _download_text(d)))
    dropped = sh.get("dropped") if isinstance(sh.get("dropped"), dict) else {}
    for uid in sorted(dropped)[:MAX_DROPPED_SHOWN]:
        rows.append((f"dropped {uid}", str(dropped[uid])))
    cache = sh.get("cache") if isinstance(sh.get("cache"), dict) else {}
    if cache:
        rows.append(("shard cache", f"{fmt.bytes_(cache.get('bytes'))} of {fmt.bytes_(cache.get('max_bytes'))} "
                                    f"in {cache.get('directory', 'n/a')}"))
    return rows
