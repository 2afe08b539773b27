"""The supervisor: one volunteer node's lifecycle (start, ready, serve, drain, stop).

``start()`` runs the self-benchmark, starts the runtime (empty) and its ZeroMQ frontend, joins
the peer network, lets the ``ShardManager`` (``volunteer.daemon.shards``) choose and load the
hosted experts from the swarm's view (downloads continue in the background; a uid is served
and announced once loaded), then starts the control API and only then publishes
``control.json`` (readiness). ``run()`` is the main loop of the ``join`` process: it feeds
the health tracker, writes periodic checkpoints, refreshes the live line, and performs the
leave once one is requested (control ``leave`` op, SIGTERM/SIGINT):

1. state "draining": the DHT records say "draining" (trainers stop routing here), and the
   runtime answers new work with the typed "draining" error (the frontend keeps running so
   trainers get that answer and retry elsewhere);
2. ``runtime.drain(remaining)`` finishes in-flight requests;
3. a final checkpoint under ``runtime.exclusive()`` (always taken, even past the deadline:
   losing trained weights is worse than a late exit);
4. the hand-off (``volunteer.daemon.handoff``): every uid no serving peer holds at the same
   weights goes to an adopter, within the deadline; the network keeps serving shard chunks
   until then;
5. the network service (records withdrawn), frontend, runtime and control API stop,
   ``control.json`` is removed.

The peer network (``volunteer.daemon.network``) starts in ``node_network.join_network`` right after the
runtime and frontend serve, and before ``control.json`` is published, so "ready" means
"announced in the DHT". A network that cannot start is a one-line ``NetworkStartError``
(the ``join`` command exits 1); ``network_enabled=false`` skips it (ZeroMQ only). Each tick
updates the load that the DHT heartbeats carry. A leave calls ``set_draining()`` first (the
records say "draining" before the runtime drains, so trainers route elsewhere at once) and
stops the service (records withdrawn) in ``_shutdown``. The snapshot's ``network`` section is
the service's ``snapshot()``, built in the network's trio thread (which owns that state) and
handed back as plain data; the supervisor never reads the node, DHT or NAT state itself.
The manifest's ``serving`` section (``ServingLimits``) goes to the runtime, hence to the
ZeroMQ frontend, and to the network service's libp2p RPC server: one set of limits.

Pausing (``volunteer pause``/``resume``, the resource rules of the settings) is the
``PauseController`` of ``volunteer.daemon.pause``: each tick it re-reads the rules and, on a
change, closes or opens the runtime's pause gate (new work answered "paused", in-flight work
finishes) and re-announces the records as "paused" or "serving"; while paused the shard
manager's periodic work (snapshots, rebalancing, downloads) waits. The lifetime totals of
``volunteer.daemon.contribution`` are fed each tick and saved at the checkpoint cadence and
on leave. The control ops are in ``volunteer.daemon.control_ops``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from typing import Any

from volunteer import __version__
from volunteer.daemon.checkpointer import Checkpointer
from volunteer.daemon.contribution import ContributionLedger
from volunteer.daemon.control_ops import handlers as control_handlers
from volunteer.daemon.control_server import ControlServer
from volunteer.daemon.handoff import Handoff, hand_off
from volunteer.daemon.hardware import HardwareInfo, apply_torch_threads, describe_device
from volunteer.daemon.health import HealthTracker
from volunteer.daemon.home import NodeHome
from volunteer.daemon.leave_report import LeaveReport
from volunteer.daemon.logs import LiveLine
from volunteer.daemon.network import network_load
from volunteer.daemon.node_id import load_node_id
from volunteer.daemon.node_network import join_network, stop_network
from volunteer.daemon.pause import node_pause
from volunteer.daemon.ready_log import log_ready
from volunteer.daemon.settings import Settings
from volunteer.daemon.shards import ShardManager
from volunteer.daemon.snapshot import build_snapshot, live_line_text
from volunteer.daemon.transfer_quota import TransferQuota
from volunteer.experts.checkpoint import CheckpointStore
from volunteer.manifest import Manifest
from volunteer.net.rate_limit import Traffic
from volunteer.status.fmt import duration

log = logging.getLogger(__name__)
TICK_S = 0.5


class Supervisor:
    """Runs one node. The caller holds the home lock and handles signals."""

    def __init__(
        self, home: NodeHome, manifest: Manifest, settings: Settings, hardware: HardwareInfo,
        device: str | list[str], live: LiveLine | None = None,
    ) -> None:
        self.home = home
        self.manifest = manifest
        self.settings = settings
        self.hardware = hardware
        # every device the node computes on; experts go to the one holding the fewest
        self.devices = [device] if isinstance(device, str) else list(device)
        self.device = self.devices[0]  # the primary: self-benchmark, status usage, threads
        self.device_description = " + ".join(describe_device(d, hardware) for d in self.devices)
        self._placed = {d: weakref.WeakSet() for d in self.devices}  # live backends per device
        self.live = live
        self.state = "starting"
        self.started_at = time.time()
        self.endpoint: str | None = None
        self.node_id = ""
        self.selfbench: dict[str, Any] | None = None
        self.torch_threads: int | None = None
        self.runtime: Any = None
        self.shards: ShardManager | None = None
        self.replicas: Any = None  # ReplicaSync (volunteer.daemon.replicas) once started
        self.shard_server: Any = None
        self.handoffs: list[Handoff] = []
        self.frontend: Any = None
        self.network: Any = None
        self.network_ready_s: float | None = None
        self.checkpointer: Checkpointer | None = None
        self.control: ControlServer | None = None
        self.health = HealthTracker()
        self._leave_requested = threading.Event()
        self.leave_timeout = float(settings.leave_timeout_s)
        self._leave_reason = ""
        self._leave_done = threading.Event()
        self.leave_report: LeaveReport | None = None
        self._next_checkpoint = 0.0
        # Bandwidth caps and the daily transfer cap (None: unlimited, no shaping on the hot path);
        # the quota is also a pause rule ("daily transfer cap of 5.0 GB reached").
        self.quota = (TransferQuota.for_home(home.root, settings.daily_transfer_cap)
                      if settings.daily_transfer_cap else None)
        self.traffic = Traffic.build(settings.max_upload_rate, settings.max_download_rate,
                                     meter=self.quota.add if self.quota is not None else None)
        self.metrics: Any = None  # MetricsServer when metrics_enabled
        self.pause = node_pause(self)  # SettingsError for a bad schedule
        self.contribution = ContributionLedger(home.root, manifest.experiment.name)
        self._last_tick = time.monotonic()

    @property
    def backends(self) -> dict[str, Any]:
        """The hosted experts (uid -> backend): the runtime's, as shards move in and out."""
        return dict(self.runtime.backends) if self.runtime is not None else {}

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Bring the node up; returns once trainers can reach it and control.json exists."""
        from volunteer.experts.backend import ExpertBackend, OptimizerSpec, expert_seed
        from volunteer.runtime.pinned import frame_alloc_for
        from volunteer.runtime.runtime import Runtime
        from volunteer.runtime.zmq_frontend import ZmqFrontend

        m, s = self.manifest, self.settings
        # Process-global, so the daemon decides it once, before the experts, self-benchmark
        # and runtime threads first use torch's intra-op pool (each thread adopts it then).
        # On a CPU node ``auto`` is measured: the self-benchmark times the serving step at each
        # candidate thread count once per device model and expert (cached).
        choose = None
        if s.selfbench and self.device == "cpu":
            from volunteer.experts.selfbench import thread_chooser

            choose = thread_chooser(self.home.cache_dir / "selfbench.json", self.device_description,
                                    m.expert.kind, m.expert.hidden_dim, m.expert.options,
                                    min(256, m.serving.max_batch_size))
        self.torch_threads = apply_torch_threads(s.torch_threads, choose=choose, device=self.device)
        self.node_id = load_node_id(self.home.root)
        store = CheckpointStore(self.home.checkpoint_dir(m.experiment.name), m.fingerprint())
        if s.num_experts > m.grid.size:
            log.warning("num_experts=%d but the grid has only %d experts: hosting at most all of them",
                        s.num_experts, m.grid.size)
        o = m.optimizer
        spec = OptimizerSpec(name=o.name, lr=o.lr, clip_grad_norm=o.clip_grad_norm, momentum=o.momentum,
                             weight_decay=o.weight_decay)

        def make_backend(uid: str, seeded: bool) -> ExpertBackend:
            seed = expert_seed(m.experiment.seed, uid) if seeded else None
            device = self.place()
            backend = ExpertBackend(uid, m.expert.kind, m.expert.hidden_dim, spec, device=device,
                                    seed=seed, **m.expert.options)
            self._placed[device].add(backend)
            return backend

        self.checkpointer = Checkpointer(store, {})
        if s.selfbench:
            self.selfbench = self._run_selfbench()

        self.runtime = Runtime({}, m.serving)  # the manifest's serving section is ServingLimits
        self.runtime.start()
        self.frontend = ZmqFrontend(self.runtime, bind=f"tcp://{s.zmq_host}:{s.zmq_port}",
                                    alloc=frame_alloc_for(self.device),  # lists are GPUs only
                                    traffic=self.traffic)
        self.frontend.start()
        self.endpoint = _advertised_endpoint(self.frontend.endpoint, s.advertise_host)
        self.pause.tick()  # a rule that applies at start: paused before the first announce
        # Joins the network first: which experts to host depends on what the swarm serves.
        self.shards = ShardManager(self, make_backend)
        join_network(self)  # NetworkStartError (one line) when it cannot start
        self.shards.start()
        self._start_metrics()
        from volunteer.daemon.replicas import start_replicas

        self.replicas = start_replicas(self)  # elastic averaging with the other holders of each uid

        self.control = ControlServer(self.home.run_dir, control_handlers(self))
        self.control.start()
        self.state = "serving"
        self._next_checkpoint = time.monotonic() + float(s.checkpoint_interval_s)
        log_ready(self)  # before control.json: whoever sees the node ready finds these lines logged
        self.home.write_control_file({
            "socket": self.control.path, "pid": os.getpid(), "version": __version__,
            "endpoint": self.endpoint, "experiment": m.experiment.name, "started_at": self.started_at,
        })

    def _start_metrics(self) -> None:
        """The optional Prometheus endpoint over ``snapshot()`` (``metrics_enabled``); a taken
        port is a one-line ``MetricsError`` (an OSError: ``join`` prints it and exits 1)."""
        if not self.settings.metrics_enabled:
            return
        from volunteer.daemon.metrics import MetricsServer  # lazy: prometheus_client only when used

        self.metrics = MetricsServer(self.snapshot, self.settings.metrics_host, self.settings.metrics_port).start()

    def network_load(self) -> float:
        return network_load(self._expert_stats(), self.manifest.serving.max_queue_size)

    def _stop_replicas(self) -> None:
        if self.replicas is not None:
            try:
                self.replicas.stop(5.0)
            except Exception:
                log.exception("stopping replica averaging failed")

    def place(self) -> str:
        """The device a new expert goes to: the one holding the fewest live experts (a
        dropped backend leaves its device's count when it is garbage collected)."""
        return min(self.devices, key=lambda d: (len(self._placed[d]), self.devices.index(d)))

    def _run_selfbench(self) -> dict[str, Any] | None:
        from volunteer.experts.selfbench import cached_throughput

        m = self.manifest
        batch = min(64, m.serving.max_batch_size)
        try:
            return cached_throughput(self.home.cache_dir / "selfbench.json", self.device, self.device_description,
                                     m.expert.kind, m.expert.hidden_dim, m.expert.options, batch)
        except Exception as exc:  # a benchmark failure must not keep the node from serving
            log.warning("self-benchmark failed: %s", exc)
            return None

    # ------------------------------------------------------------------ run

    def run(self) -> LeaveReport:
        """Main loop until a leave is requested; then leave and return its report."""
        while not self._leave_requested.wait(TICK_S):
            self.tick()
        return self.leave()

    def tick(self) -> None:
        """One supervisor step: pause rules, health sample, contribution, periodic checkpoint,
        live line."""
        if self.runtime is None:
            return
        paused = self.pause.tick().paused
        stats = self._expert_stats()
        self.health.observe(stats)
        now = time.monotonic()
        self.contribution.observe(stats, now - self._last_tick)
        self._last_tick = now
        if self.network is not None:
            self.network.set_load(network_load(stats, self.manifest.serving.max_queue_size))
        if self.shards is not None and not paused:
            self.shards.tick()
        if time.monotonic() >= self._next_checkpoint and self.checkpointer is not None:
            self.checkpointer.checkpoint(self.runtime.exclusive)
            self._next_checkpoint = time.monotonic() + float(self.settings.checkpoint_interval_s)
        self.contribution.maybe_save(min(60.0, float(self.settings.checkpoint_interval_s)))
        if self.live is not None:
            self.live.update(live_line_text(self.snapshot(include_usage=False)))

    def request_leave(self, timeout: float | None, reason: str) -> bool:
        """Ask the main loop to leave; False when a leave is already under way."""
        if self._leave_requested.is_set():
            return False
        self.leave_timeout = float(timeout) if timeout is not None else float(self.settings.leave_timeout_s)
        self._leave_reason = reason
        self._leave_requested.set()
        return True

    @property
    def leaving(self) -> bool:
        return self._leave_requested.is_set()

    def wait_left(self, timeout: float) -> bool:
        """Wait until the leave finished (its report is set); False on timeout."""
        return self._leave_done.wait(timeout)

    def leave(self) -> LeaveReport:
        """Drain, checkpoint and stop (see the module docstring). Idempotent."""
        if self.leave_report is not None:
            return self.leave_report
        timeout = self.leave_timeout
        report = LeaveReport(reason=self._leave_reason or "leave", timeout_s=timeout)
        start = time.monotonic()
        deadline = start + timeout
        log.info("leaving (%s): refusing new work, finishing in-flight requests (deadline %.1fs)", report.reason,
                 timeout)
        self.state = "draining"
        if self.live is not None:
            self.live.finish()  # the leave reports through log lines from here on
            self.live = None
        if self.network is not None:
            try:
                self.network.set_draining()  # peers learn at once that this node is leaving
            except Exception:
                log.exception("announcing the drain to the network failed")
        self._stop_replicas()  # the weights stop moving before the final checkpoint
        if self.runtime is not None:
            drain = self.runtime.drain(max(0.0, deadline - time.monotonic()))
            report.completed, report.cut_short = int(drain.completed), int(drain.cut_short)
            if not drain.clean:
                report.problems.append(f"{drain.cut_short} in-flight request(s) did not finish before the deadline")
        if self.checkpointer is not None:
            ck = self.checkpointer.checkpoint(self.runtime.exclusive if self.runtime is not None else None)
            report.checkpoint = {**ck.as_dict(), "directory": str(self.checkpointer.store.directory)}
            for uid, err in ck.failed.items():
                report.problems.append(f"checkpoint of {uid} failed: {err}")
        self._hand_off(report, deadline)
        late = time.monotonic() - deadline
        if late > 0 and not report.problems:
            report.problems.append(f"leave took {duration(late)} longer than the {duration(timeout)} deadline")
        self._shutdown()
        self.contribution.save()
        report.duration_s = time.monotonic() - start
        self.leave_report = report
        self._leave_done.set()
        for line in report.summary_lines():
            (log.info if report.clean else log.warning)("%s", line)
        return report

    def _hand_off(self, report: LeaveReport, deadline: float) -> None:
        """Give every hosted uid that no other node holds to an adopter (``daemon.handoff``)."""
        if self.shards is None or self.runtime is None:
            return
        self.shards.stop(max(0.0, min(10.0, deadline - time.monotonic())))
        try:
            self.handoffs = hand_off(self.shards, deadline)
        except Exception as exc:  # the checkpoint is written: a failed hand-off loses no weights locally
            log.exception("hand-off failed")
            report.problems.append(f"hand-off failed: {exc}")
            return
        report.handoffs = [h.as_dict() for h in self.handoffs]

    def _shutdown(self) -> None:
        """Stop every component that was started, in reverse order; never raises."""
        self.state = "stopped"
        self.pause.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.quota is not None:
            self.quota.close()
        self._stop_replicas()
        stop_network(self.network)
        self.network = None
        if self.shard_server is not None:
            self.shard_server.close()
        for name, component in (("frontend", self.frontend), ("runtime", self.runtime)):
            if component is None:
                continue
            try:
                component.stop()
            except Exception:
                log.exception("stopping the %s failed", name)

    def close(self) -> None:
        """Release what is left after ``leave`` or a failed ``start``: control API, files."""
        if self.leave_report is None:
            self._shutdown()
        self.home.remove_control_file()
        if self.control is not None:
            self.control.stop()  # lets a waiting `leave` call receive its reply first
            self.control = None
        if self.live is not None:
            self.live.finish()

    # ------------------------------------------------------------------ snapshot

    def _expert_stats(self) -> dict[str, dict[str, Any]]:
        if self.runtime is None:
            return {}
        try:
            stats = self.runtime.stats()
        except Exception:
            log.exception("runtime stats failed")
            return {}
        return {uid: s for uid, s in stats.items() if isinstance(s, dict)}

    def snapshot(self, include_usage: bool = True) -> dict[str, Any]:
        """The JSON-serialisable health snapshot served by the ``status`` control op."""
        return build_snapshot(self, self._expert_stats(), include_usage)


def _advertised_endpoint(bound: str, advertise_host: str) -> str:
    """The endpoint trainers should dial: the bound one, with a reachable host name."""
    host_port = bound.removeprefix("tcp://")
    host, _, port = host_port.rpartition(":")
    if advertise_host:
        host = advertise_host
    elif host in ("0.0.0.0", "*", "[::]", "::"):
        host = socket.gethostname()
    return f"tcp://{host}:{port}"
