"""An optional Prometheus endpoint with the figures of ``volunteer status``.

``MetricsServer(snapshot_fn, host, port)`` serves ``/metrics`` over HTTP with the standard
client library (``prometheus_client``), from a registry of its own holding one custom
collector, ``SnapshotCollector``: every scrape calls ``snapshot_fn()`` (the daemon's health
snapshot, ``volunteer.daemon.snapshot.build_snapshot``) and turns the sections it finds into
metric families, so the endpoint can never disagree with ``status`` and costs nothing
between scrapes. Sections that are missing or null are skipped; a snapshot that fails is
``volunteer_up 0`` (the scrape itself still succeeds).

Off by default (setting ``metrics_enabled``), bound to loopback by default (``metrics_host``,
``metrics_port``): the figures say what the node serves and to whom it is connected.
A port already taken is a ``MetricsError`` with a one-line message naming the setting.

Metric names (all prefixed ``volunteer_``): ``up``, ``node_info{version,node_id,experiment}``,
``state{state}``, ``health{level}``, ``uptime_seconds``; totals ``requests_total``,
``samples_total``, ``errors_total{code}``, ``requests_per_second``, ``samples_per_second``;
per expert (label ``uid``) ``expert_requests_total``, ``expert_samples_total``,
``expert_updates_applied_total``, ``expert_bytes_in_total``, ``expert_bytes_out_total``,
``expert_errors_total{code}``, ``expert_requests_per_second``, ``expert_samples_per_second``,
``expert_bytes_in_per_second``, ``expert_bytes_out_per_second``, ``expert_queue_depth``,
``expert_mean_batch_size``, ``expert_latency_seconds{phase,quantile}``; the machine
``device_utilization_ratio``, ``device_memory_used_bytes``, ``device_memory_total_bytes``,
``system_cpu_ratio``, ``process_cpu_ratio``, ``process_resident_memory_bytes``; the network
``connected_peers``, ``peers{path}``; shards ``shards_hosted``, ``shard_downloads``;
``checkpoint_age_seconds``; ``paused`` (1 while the node takes no new work: ``volunteer
pause``, a resource rule or the daily cap); the lifetime ``contribution_samples_total``,
``contribution_updates_total``, ``contribution_uptime_seconds_total`` and
``contribution_bytes_served_total``; and, when the snapshot has a ``transfer`` section (the
daily cap), ``transfer_bytes_today{direction}`` and ``transfer_daily_cap_bytes``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "volunteer_"
STATES = ("starting", "serving", "draining", "stopped", "paused")
HEALTH_LEVELS = ("ok", "idle", "degraded", "starting", "draining", "paused")

SnapshotFn = Callable[[], dict[str, Any]]


class MetricsError(OSError):
    """The endpoint could not start; ``str(err)`` is one line naming the fix (an OSError, like
    any other port the daemon cannot bind: ``join`` prints it and exits 1)."""


def _num(value: Any) -> float | None:
    """A finite number from a snapshot field, or None (missing, null, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def _gauge(name: str, doc: str, value: Any) -> Iterator[Metric]:
    v = _num(value)
    if v is not None:
        yield GaugeMetricFamily(PREFIX + name, doc, value=v)


def _counter(name: str, doc: str, value: Any) -> Iterator[Metric]:
    v = _num(value)
    if v is not None:
        yield CounterMetricFamily(PREFIX + name, doc, value=v)


class SnapshotCollector(Collector):
    """Turns one snapshot per scrape into metric families (see the module docstring)."""

    def __init__(self, snapshot_fn: SnapshotFn) -> None:
        self.snapshot_fn = snapshot_fn

    def describe(self) -> list[Metric]:
        return []  # no fixed set: families follow the snapshot (registry skips the probe)

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self.snapshot_fn()
            if not isinstance(snap, dict):
                raise TypeError(f"snapshot is a {type(snap).__name__}")
        except Exception as e:  # the scrape answers even when the daemon is unwell
            log.debug("metrics: snapshot failed: %r", e)
            yield GaugeMetricFamily(PREFIX + "up", "1 when the daemon's snapshot was read", value=0)
            return
        yield GaugeMetricFamily(PREFIX + "up", "1 when the daemon's snapshot was read", value=1)
        yield from self._node(snap)
        yield from self._totals(snap.get("totals") or {})
        yield from self._experts(snap.get("experts") or {})
        yield from self._machine(snap)
        yield from self._network(snap.get("network"))
        yield from self._shards(snap)
        yield from self._transfer(snap.get("transfer"))
        yield from self._contribution(snap)

    def _node(self, snap: dict[str, Any]) -> Iterator[Metric]:
        node = snap.get("node") or {}
        experiment = snap.get("experiment") or {}
        info = InfoMetricFamily(PREFIX + "node", "the node's version, id and experiment")
        info.add_metric([], {"version": str(node.get("version", "")), "node_id": str(node.get("node_id", "")),
                             "experiment": str(experiment.get("name", ""))})
        yield info
        state = snap.get("state")
        if isinstance(state, str):
            yield StateSetMetricFamily(PREFIX + "state", "the node's state as status shows it (paused too)",
                                       {s: s == state for s in (*STATES, *((state,) if state not in STATES else ()))})
        level = (snap.get("health") or {}).get("level")
        if isinstance(level, str):
            levels = (*HEALTH_LEVELS, *((level,) if level not in HEALTH_LEVELS else ()))
            yield StateSetMetricFamily(PREFIX + "health", "the health level status shows",
                                       {lv: lv == level for lv in levels})
        yield from _gauge("uptime_seconds", "seconds since the daemon started", node.get("uptime_s"))

    def _totals(self, t: dict[str, Any]) -> Iterator[Metric]:
        yield from _counter("requests", "requests served, all experts", t.get("requests"))
        yield from _counter("samples", "samples served, all experts", t.get("samples"))
        yield from _gauge("requests_per_second", "recent request rate, all experts", t.get("requests_per_s"))
        yield from _gauge("samples_per_second", "recent sample rate, all experts", t.get("samples_per_s"))
        errors = CounterMetricFamily(PREFIX + "errors", "error replies by code, all experts", labels=["code"])
        for code, n in sorted((t.get("errors") or {}).items()):
            if _num(n) is not None:
                errors.add_metric([str(code)], float(n))
        yield errors

    def _experts(self, experts: dict[str, Any]) -> Iterator[Metric]:
        def fam(kind: type, name: str, doc: str, labels: tuple[str, ...] = ()) -> Metric:
            return kind(PREFIX + "expert_" + name, doc, labels=["uid", *labels])

        counters = {key: fam(CounterMetricFamily, name, doc) for key, name, doc in (
            ("requests", "requests", "requests served by the expert"),
            ("samples", "samples", "samples served by the expert"),
            ("updates_applied", "updates_applied", "optimizer updates applied to the expert"),
            ("bytes_in", "bytes_in", "request bytes received for the expert"),
            ("bytes_out", "bytes_out", "reply bytes sent by the expert"))}
        gauges = {key: fam(GaugeMetricFamily, name, doc) for key, name, doc in (
            ("requests_per_s", "requests_per_second", "recent request rate of the expert"),
            ("samples_per_s", "samples_per_second", "recent sample rate of the expert"),
            ("bytes_in_per_s", "bytes_in_per_second", "recent request bytes per second"),
            ("bytes_out_per_s", "bytes_out_per_second", "recent reply bytes per second"),
            ("queue_depth", "queue_depth", "requests waiting for the expert"),
            ("mean_batch_size", "mean_batch_size", "mean rows per batch"))}
        errors = fam(CounterMetricFamily, "errors", "error replies of the expert by code", ("code",))
        latency = fam(GaugeMetricFamily, "latency_seconds", "queue and compute latency percentiles",
                      ("phase", "quantile"))
        for uid, e in sorted(experts.items()):
            if not isinstance(e, dict):
                continue
            for key, metric in (*counters.items(), *gauges.items()):
                v = _num(e.get(key))
                if v is not None:
                    metric.add_metric([str(uid)], v)
            for code, n in sorted((e.get("errors") or {}).items()):
                if _num(n) is not None:
                    errors.add_metric([str(uid), str(code)], float(n))
            lat = e.get("latency_ms") or {}
            for phase in ("queue", "compute"):
                for q, suffix in (("0.5", "p50"), ("0.99", "p99")):
                    v = _num(lat.get(f"{phase}_{suffix}"))
                    if v is not None:
                        latency.add_metric([str(uid), phase, q], v / 1000.0)
        yield from counters.values()
        yield from gauges.values()
        yield errors
        yield latency

    def _machine(self, snap: dict[str, Any]) -> Iterator[Metric]:
        device = snap.get("device") or {}
        system = snap.get("system") or {}
        process = snap.get("process") or {}
        util = _num(device.get("utilization_pct"))
        yield from _gauge("device_utilization_ratio", "compute device utilization (0-1)",
                          util / 100 if util is not None else None)
        yield from _gauge("device_memory_used_bytes", "device memory in use", device.get("memory_used_bytes"))
        yield from _gauge("device_memory_total_bytes", "device memory", device.get("memory_total_bytes"))
        cpu = _num(system.get("cpu_pct"))
        yield from _gauge("system_cpu_ratio", "the machine's CPU use (0-1)", cpu / 100 if cpu is not None else None)
        cpu = _num(process.get("cpu_pct"))
        yield from _gauge("process_cpu_ratio", "the daemon's CPU use (1 = one core)",
                          cpu / 100 if cpu is not None else None)
        yield from _gauge("process_resident_memory_bytes", "the daemon's resident memory",
                          process.get("rss_bytes"))
        ck = snap.get("checkpoints") or {}
        yield from _gauge("checkpoint_age_seconds", "seconds since the last checkpoint", ck.get("last_age_s"))

    def _network(self, net: Any) -> Iterator[Metric]:
        if not isinstance(net, dict):
            return
        yield from _gauge("connected_peers", "peers connected over libp2p", net.get("connected_peers"))
        peers = net.get("peers")
        if isinstance(peers, dict):
            fam = GaugeMetricFamily(PREFIX + "peers", "connected peers by path", labels=["path"])
            for path, n in sorted(peers.items()):
                if _num(n) is not None:
                    fam.add_metric([str(path)], float(n))
            yield fam

    def _shards(self, snap: dict[str, Any]) -> Iterator[Metric]:
        shards = snap.get("shards")
        if not isinstance(shards, dict):
            return
        hosted = shards.get("hosted")
        if isinstance(hosted, dict):
            yield GaugeMetricFamily(PREFIX + "shards_hosted", "expert shards this node hosts",
                                    value=len(hosted))
        downloads = shards.get("downloads")
        if isinstance(downloads, dict):
            yield GaugeMetricFamily(PREFIX + "shard_downloads", "shard downloads under way or recent",
                                    value=len(downloads))

    def _contribution(self, snap: dict[str, Any]) -> Iterator[Metric]:
        pause = snap.get("pause")
        if isinstance(pause, dict) and isinstance(pause.get("paused"), bool):
            yield GaugeMetricFamily(PREFIX + "paused", "1 while the node takes no new work",
                                    value=1 if pause["paused"] else 0)
        c = snap.get("contribution")
        if not isinstance(c, dict):
            return
        for key, name, doc in (("samples", "samples", "samples served, lifetime of this home"),
                               ("updates", "updates", "expert updates applied, lifetime of this home"),
                               ("uptime_s", "uptime_seconds", "seconds served, lifetime of this home"),
                               ("bytes_served", "bytes_served", "bytes served, lifetime of this home")):
            yield from _counter("contribution_" + name, doc, c.get(key))

    def _transfer(self, transfer: Any) -> Iterator[Metric]:
        if not isinstance(transfer, dict):
            return
        fam = GaugeMetricFamily(PREFIX + "transfer_bytes_today", "expert and shard bytes this UTC day",
                                labels=["direction"])
        for direction, key in (("in", "bytes_in"), ("out", "bytes_out")):
            v = _num(transfer.get(key))
            if v is not None:
                fam.add_metric([direction], v)
        yield fam
        yield from _gauge("transfer_daily_cap_bytes", "the daily transfer cap (0: none)", transfer.get("cap"))


class MetricsServer:
    """``/metrics`` over HTTP from ``snapshot_fn`` (see module docstring); start() / stop()."""

    def __init__(self, snapshot_fn: SnapshotFn, host: str = "127.0.0.1", port: int = 9477) -> None:
        """``snapshot_fn()`` -> the status snapshot dict (called in the HTTP server's thread,
        once per scrape); ``host``/``port``: where to listen (port 0: any free port)."""
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot_fn))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where the metrics are (valid once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        """Listen and serve in a daemon thread; ``MetricsError`` when the address is taken."""
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as e:
            raise MetricsError(
                f"cannot serve metrics on {self.host}:{self.port}: {e.strerror or e}; set metrics_port to a "
                f"free port (or metrics_enabled=false)") from None
        self.port = int(self._server.server_address[1])
        log.info("Prometheus metrics at %s", self.url)
        return self

    def stop(self) -> None:
        """Stop listening (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
