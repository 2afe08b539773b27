"""The health snapshot served by the control API's ``status`` op (and ``status --json``).

Shape (all JSON; every section present, values may be null)::

    version       snapshot schema version (1)
    node          pid, home, node_id, version, started_at, uptime_s
    experiment    name, version, source, fingerprint, expert {kind, hidden_dim, options}, grid
    state         starting | serving | paused | draining | stopped (paused: serving, but taking no
                  new work; the supervisor's own state stays "serving", see ``paused_view``)
    endpoint      where trainers reach the node (tcp://host:port)
    device        name, description, utilization_pct, memory_used_bytes, memory_total_bytes
    system        cpu_pct, cpu_count, ram_used_bytes, ram_total_bytes
    process       cpu_pct, rss_bytes, threads
    experts       uid -> runtime stats (requests, samples, requests_per_s, samples_per_s,
                  mean_batch_size, batch_size_histogram, queue_depth, latency_ms {queue_p50,
                  queue_p99, compute_p50, compute_p99}, errors {code: n}, updates_applied)
                  + kind, resumed_from_updates
    totals        requests, samples, requests_per_s, samples_per_s, errors {code: n}
    checkpoints   directory, fingerprint, interval_s, last_at, last_age_s, passes, last_error,
                  last {written, unchanged, failed, ...}, resumed, set_aside
    selfbench     forward_samples_per_s, train_samples_per_s, batch_size, cached (or null)
    settings      the resolved local settings
    network       the network service's snapshot() (peer_id, addrs, reachability, relay,
                  peers {direct, relayed, hole_punched}, connected_peers, records_announced,
                  bootstrap, state, rpc, ...), or null when the network is disabled; built in
                  the network's trio thread, which owns that state (``NetworkService.snapshot``
                  runs there through the bridge and returns plain data)
    shards        replication, capacity, free, hosted {uid: state, version, root, weights_from, reason,
                  other_replicas, replica_versions, version_spread}, dropped {uid: why}, moves,
                  downloads {uid: progress}, cache {directory, bytes, max_bytes}
    replicas      replica averaging (``volunteer.daemon.replicas.ReplicaSync.status``): enabled,
                  period_s, alpha, rounds, last_round_at, lookup_errors, uids {uid: replicas
                  [peer ids], replica_count, last_divergence (relative L2 before the pull),
                  exchanges_ok, exchanges_failed, failures {code: n}, inbound_ok,
                  inbound_refused {code: n}, last_exchange_at, last_exchange_age_s, last_peer};
                  null without a peer network or with ``averaging.replica_period_s: 0``
    health        level (ok|idle|degraded|starting|draining|paused), why (one line or null);
                  while paused: paused, "paused: <reason>" (``rules.pause_text``)
    pause         paused, reason (a human phrase: "paused by you until 14:05", "on battery",
                  "until 18:00 by schedule", "the machine is in use", "other programs use 85%
                  CPU"), until (epoch s or null), rule (manual|schedule|battery|idle|cpu),
                  since, manual, readings {idle_s, on_battery, other_cpu_pct} and detection
                  {idle, battery, cpu: how each is measured} (``PauseController.status``)
    contribution  lifetime totals of this experiment in this home: experiment, samples,
                  updates, uptime_s, bytes_served, since (``ContributionLedger.section``)
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import psutil

from volunteer import __version__
from volunteer.daemon.hardware import live_usage
from volunteer.daemon.health import assess, totals
from volunteer.daemon.network import network_problem
from volunteer.daemon.rules import pause_text
from volunteer.status.fmt import duration
from volunteer.status.shards_view import download_line

if TYPE_CHECKING:
    from volunteer.daemon.supervisor import Supervisor

SNAPSHOT_VERSION = 1
_process_cache: dict[int, psutil.Process] = {}


def _process() -> psutil.Process:
    pid = os.getpid()
    if pid not in _process_cache:
        _process_cache.clear()
        _process_cache[pid] = psutil.Process(pid)
    return _process_cache[pid]


def build_snapshot(sup: Supervisor, stats: dict[str, dict[str, Any]], include_usage: bool = True) -> dict[str, Any]:
    m = sup.manifest
    ck = sup.checkpointer
    experts: dict[str, dict[str, Any]] = {}
    for uid in sup.backends:
        entry = dict(stats.get(uid, {}))
        entry["kind"] = m.expert.kind
        entry["resumed_from_updates"] = ck.resumed.get(uid) if ck is not None else None
        experts[uid] = entry
    requests, errors = totals(experts)
    usage = live_usage(sup.device, _process()) if include_usage else {"device": {"name": sup.device}}
    device = {**usage["device"], "description": sup.device_description, "torch_threads": sup.torch_threads}
    queue_fill = max(
        (float(e.get("queue_depth", 0) or 0) / max(1, m.serving.max_queue_size) for e in experts.values()),
        default=0.0,
    )
    network = None
    if sup.network is not None:
        try:
            network = sup.network.snapshot()
        except Exception as exc:  # the dashboard must render even when the network is unwell
            network = {"error": f"{type(exc).__name__}: {exc}"}
    recent_requests, recent_errors = sup.health.recent()
    level, why = assess(
        sup.state, recent_requests, recent_errors, sup.health.idle_for(), queue_fill,
        ck.last_error if ck is not None else None, sup.endpoint, network_problem=network_problem(network),
    )
    pause = _section(sup, "pause", "status")
    state, level, why = paused_view(sup.state, level, why, pause)
    return {
        "version": SNAPSHOT_VERSION,
        "node": {
            "pid": os.getpid(), "home": str(sup.home.root), "node_id": sup.node_id, "version": __version__,
            "started_at": sup.started_at, "uptime_s": round(time.time() - sup.started_at, 1),
        },
        "experiment": m.summary(),
        "state": state,
        "endpoint": sup.endpoint,
        "device": device,
        "system": usage.get("system"),
        "process": usage.get("process"),
        "experts": experts,
        "totals": {
            "requests": requests,
            "samples": sum(int(e.get("samples", 0) or 0) for e in experts.values()),
            "requests_per_s": round(sum(float(e.get("requests_per_s", 0) or 0) for e in experts.values()), 2),
            "samples_per_s": round(sum(float(e.get("samples_per_s", 0) or 0) for e in experts.values()), 2),
            "errors": errors,
        },
        "checkpoints": ck.summary(float(sup.settings.checkpoint_interval_s)) if ck is not None else None,
        "selfbench": sup.selfbench,
        "settings": sup.settings.as_dict(),
        "network": network,
        "shards": sup.shards.status() if sup.shards is not None else None,
        "replicas": _replicas(sup),
        "health": {"level": level, "why": why},
        "pause": pause,
        "contribution": _section(sup, "contribution", "section"),
        "transfer": _transfer(sup),
    }


def paused_view(state: str, level: str, why: str | None, pause: Any) -> tuple[str, str, str | None]:
    """The ``(state, health level, why)`` the status shows: a serving node that is paused shows
    state "paused" and health "paused" with the reason ("paused: on battery"). Only this view
    changes: the supervisor's own ``state`` stays "serving" (the control ops, ``leave`` and the
    records' lifecycle go by it); starting / draining nodes show their own state."""
    if state == "serving" and isinstance(pause, dict) and pause.get("paused") is True:
        return "paused", "paused", pause_text(pause)
    return state, level, why


def _transfer(sup: Supervisor) -> dict[str, Any] | None:
    """Bandwidth caps and today's transfer against the daily cap (None when neither is set)."""
    quota, traffic = getattr(sup, "quota", None), getattr(sup, "traffic", None)
    if quota is None and traffic is None:
        return None
    out: dict[str, Any] = dict(traffic.describe()) if traffic is not None else {}
    if quota is not None:
        out.update(quota.usage())
    return out


def _section(sup: Supervisor, attr: str, method: str) -> dict[str, Any] | None:
    """``getattr(sup, attr).method()``, None without that component, an error entry when it fails."""
    part = getattr(sup, attr, None)
    if part is None:
        return None
    try:
        return getattr(part, method)()
    except Exception as exc:  # the dashboard must render whatever one section does
        return {"error": f"{type(exc).__name__}: {exc}"}


def _replicas(sup: Supervisor) -> dict[str, Any] | None:
    """The replicas section (None when the supervisor runs no replica averaging)."""
    sync = getattr(sup, "replicas", None)
    if sync is None:
        return None
    try:
        return sync.status()
    except Exception as exc:  # the dashboard must render even when averaging is unwell
        return {"error": f"{type(exc).__name__}: {exc}"}


def live_line_text(snap: dict[str, Any]) -> str:
    """The compact one-line status shown at the bottom of the ``join`` terminal."""
    t = snap.get("totals") or {}
    health = snap.get("health") or {}
    pause = snap.get("pause") if isinstance(snap.get("pause"), dict) else {}
    updates = sum(int(e.get("updates_applied", 0) or 0) for e in (snap.get("experts") or {}).values())
    line = (f"{pause_text(pause)} | " if pause.get("paused") else "")
    state = "" if snap.get("state") == "paused" and pause.get("paused") else f"[{snap.get('state')}] "
    line += (f"{state}{len(snap.get('experts') or {})} experts | "
            f"{float(t.get('requests_per_s', 0) or 0):.1f} req/s | {float(t.get('samples_per_s', 0) or 0):.0f} samples/s"
            f" | {updates} updates | up {duration((snap.get('node') or {}).get('uptime_s'))}")
    net = snap.get("network")
    if isinstance(net, dict) and "connected_peers" in net:
        line += f" | {int(net.get('connected_peers') or 0)} peers"
    if health.get("why") and not pause.get("paused"):
        line += f" | {health['level']}: {health['why']}"
    downloading = download_line(snap)
    if downloading:
        line += f" | {downloading}"
    return line  # LiveLine fits it to the terminal's width
