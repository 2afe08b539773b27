"""Replica averaging (``volunteer.daemon.replicas``): two or three holders of one uid.

Unit tests run ``ReplicaSync`` rounds by hand over ``LocalGroup`` (the in-process averaging
group, same contract as the swarm's) with real ``ExpertBackend`` experts, a fake DHT view and
a fake clock: the elastic pull and its arithmetic, who is answered (known holders only, not
too often, matching shapes, finite weights), the lock (taken for the copy and the pull, never
across the exchange), a cached forward graph that survives a pull, uids dropped or replaced,
``stop``, and the thread. The last test runs two real ``NetworkService`` hosts on loopback that
announce the same uid, each with a real ``Runtime`` and different weights, wired as the
daemon wires them (``start_replicas``): their divergence shrinks to ~0 over libp2p.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from volunteer.client.averaging.local_group import LocalGroup, LocalHub
from volunteer.daemon.replicas import (
    EXCHANGE_MAX_S,
    ReplicaSync,
    exchange_timeout,
    start_replicas,
    weight_aliases,
)
from volunteer.experts.backend import ExpertBackend
from volunteer.manifest.schema import AveragingSection

UID = "rep.ffn.0"


@dataclass
class Entry:
    """What ``SwarmView`` reads of a DHT entry."""

    peer_id: str
    state: str = "serving"
    addrs: tuple[str, ...] = ()

    def freshness(self) -> tuple:
        return ()


class Pause:
    """A fake ``runtime.exclusive``: counts entries and says whether it is held."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entered = 0
        self.held = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            self.entered += 1
            self.held = True
            try:
                yield
            finally:
                self.held = False


class FilteredGroup(LocalGroup):
    """``LocalGroup`` whose members are what the sync lists (as ``SwarmGroup``'s provider),
    and that checks no exchange runs while the sender's lock is held."""

    def __init__(self, hub: LocalHub, me: str, provider, pause: Pause) -> None:
        super().__init__(hub, me)
        self.provider = provider
        self.pause = pause

    def members(self) -> list[str]:
        return [p for p, _ in self.provider()]

    def exchange(self, peer, request, timeout):
        assert not self.pause.held, "an exchange must never run under the runtime's lock"
        return super().exchange(peer, request, timeout)


class Node:
    """One fake volunteer: hosted backends, a DHT view, a clock, and its ReplicaSync."""

    def __init__(self, name: str, hubs: dict[str, LocalHub], period: float = 10.0, alpha: float = 0.5) -> None:
        self.name = name
        self.backends: dict[str, ExpertBackend] = {}
        self.view: dict[str, list[Entry]] = {}
        self.pause = Pause()
        self.now = 1000.0
        self.lookups = 0

        def lookup(uids):
            self.lookups += 1
            return {u: list(self.view.get(u, [])) for u in uids}

        def make_group(uid, members):
            return FilteredGroup(hubs.setdefault(uid, LocalHub()), name, members, self.pause)

        self.sync = ReplicaSync(name, lambda: self.backends, self.pause, lookup, make_group, period, alpha,
                                seed=1, clock=lambda: self.now, wall=lambda: self.now)

    def host(self, uid: str = UID, seed: int = 0, hidden: int = 8) -> ExpertBackend:
        self.backends[uid] = ExpertBackend(uid, "ffn", hidden, seed=seed)
        return self.backends[uid]

    def sees(self, *peers: str, uid: str = UID, state: str = "serving") -> None:
        self.view[uid] = [Entry(p, state) for p in peers]

    def weights(self, uid: str = UID) -> list[torch.Tensor]:
        return [t.clone() for t in weight_aliases(self.backends[uid])]

    def uid_status(self, uid: str = UID) -> dict:
        return self.sync.status()["uids"][uid]


@pytest.fixture
def pair() -> Iterator[tuple[Node, Node]]:
    hubs: dict[str, LocalHub] = {}
    a, b = Node("peer-a", hubs), Node("peer-b", hubs)
    a.host(seed=1)
    b.host(seed=2)
    a.sees("peer-b")
    b.sees("peer-a")
    try:
        yield a, b
    finally:
        a.sync.stop()
        b.sync.stop()


def _dist(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((p - q).pow(2).sum()) for p, q in zip(x, y, strict=True)))


def test_one_elastic_exchange_meets_halfway_and_records_divergence(pair) -> None:
    a, b = pair
    b.sync.round()  # b reads its view and serves; its own exchange is refused (a not ready)
    assert b.uid_status()["exchanges_failed"] == 1  # a has no group yet: unreachable
    wa, wb = a.weights(), b.weights()
    assert a.sync.round() == 1
    mean = [(x + y) / 2 for x, y in zip(wa, wb, strict=True)]
    for got in (a.weights(), b.weights()):  # alpha 0.5, symmetric: both at the mean
        assert _dist(got, mean) < 1e-5
    st = a.uid_status()
    expected = _dist(wa, wb) / math.sqrt(sum(float(t.pow(2).sum()) for t in wa))
    assert st["last_divergence"] == pytest.approx(expected, rel=1e-6) and expected > 0.1
    assert st["replicas"] == ["peer-b"] and st["replica_count"] == 1 and st["last_peer"] == "peer-b"
    assert st["exchanges_ok"] == 1 and st["exchanges_failed"] == 0 and st["last_exchange_at"] == a.now
    assert b.uid_status()["inbound_ok"] == 1
    # Both sides' weights moved without an optimizer step: their revision says so.
    assert a.backends[UID].weights_revision == 1 and b.backends[UID].weights_revision == 1
    assert a.backends[UID].updates_applied == 0
    # The copy and the pull took the lock on both sides.
    assert a.pause.entered >= 2 and b.pause.entered >= 1

    a.now += 10.0
    b.now += 10.0
    assert a.sync.round() == 1
    assert a.uid_status()["last_divergence"] < 1e-6  # already equal: it shrank to ~0
    snap = a.sync.status()
    assert snap["rounds"] == 2 and snap["period_s"] == 10.0 and snap["alpha"] == 0.5


def test_alpha_moves_each_side_part_of_the_way() -> None:
    hubs: dict[str, LocalHub] = {}
    a, b = Node("peer-a", hubs, alpha=0.25), Node("peer-b", hubs, alpha=0.25)
    try:
        a.host(seed=1)
        b.host(seed=2)
        a.sees("peer-b")
        b.sees("peer-a")
        b.sync.round()
        wa, wb = a.weights(), b.weights()
        a.sync.round()
        for got, mine, theirs in ((a.weights(), wa, wb), (b.weights(), wb, wa)):
            want = [m - 0.25 * (m - t) for m, t in zip(mine, theirs, strict=True)]
            assert _dist(got, want) < 1e-5
    finally:
        a.sync.stop()
        b.sync.stop()


def test_unknown_holder_and_too_frequent_exchanges_are_refused(pair) -> None:
    a, b = pair
    b.sees()  # b's view does not list a (yet)
    b.sync.round()
    before_a, before_b = a.weights(), b.weights()
    assert a.sync.round() == 0
    assert a.uid_status()["failures"] == {"overloaded": 1}
    assert _dist(a.weights(), before_a) == 0 and _dist(b.weights(), before_b) == 0
    assert b.uid_status()["inbound_refused"] == {"overloaded": 1}
    assert not hasattr(b.backends[UID], "weights_revision")  # refused: nothing moved

    b.sees("peer-a")  # b's next read lists a
    b.now += 10.0
    b.sync.round()  # b -> a: b is known to a, so a answers
    assert b.uid_status()["exchanges_ok"] == 1
    a.now += 1.0  # a -> b: b answers a at most once per period / 2 ... a has not asked yet
    assert a.sync.round() == 1
    a.now += 1.0
    assert a.sync.round() == 0  # too soon after the last one
    assert b.uid_status()["inbound_refused"]["overloaded"] == 2
    b.now += 5.0  # period / 2 later
    assert a.sync.round() == 1


def test_draining_holders_are_answered_but_never_chosen(pair) -> None:
    a, b = pair
    a.sees("peer-b", state="draining")
    b.sync.round()
    assert a.sync.round() == 0 and a.uid_status()["replicas"] == []
    assert a.uid_status()["exchanges_failed"] == 0  # nobody to ask is not a failure


def test_mismatched_shapes_and_non_finite_weights_are_refused(pair) -> None:
    a, b = pair
    b.host(hidden=16)  # another architecture under the same uid
    b.sync.round()
    before = b.weights()
    assert a.sync.round() == 0 and a.uid_status()["failures"] == {"bad_request": 1}
    assert _dist(b.weights(), before) == 0

    b.host(seed=2)  # a new backend: a fresh averager on b's next round
    b.now += 10.0
    b.sync.round()
    with torch.no_grad():
        weight_aliases(a.backends[UID])[0][0, 0] = float("nan")
    before_b = b.weights()
    a.now += 10.0
    assert a.sync.round() == 0
    assert a.uid_status()["failures"].get("non_finite") == 1
    assert _dist(b.weights(), before_b) == 0  # nothing non-finite reached b's expert


def test_a_cached_forward_graph_survives_a_pull(pair) -> None:
    a, b = pair
    backend = a.backends[UID]
    graph = backend.forward_graph([torch.randn(3, 8)])
    b.sync.round()
    assert a.sync.round() == 1
    grads_in, grads_params = backend.gradients(graph, torch.ones_like(graph.output))
    assert grads_in[0].shape == (3, 8) and any(g is not None for g in grads_params)


def test_dropped_and_replaced_uids(pair) -> None:
    a, b = pair
    b.sync.round()
    a.sync.round()
    assert UID in a.sync.status()["uids"]
    old = a.backends.pop(UID)
    a.now += 10.0
    a.sync.round()
    assert a.sync.status()["uids"] == {}
    a.backends[UID] = old  # hosted again: a fresh averager and group
    a.sees("peer-b")
    a.now += 10.0
    b.now += 10.0
    assert a.sync.round() == 1 and a.uid_status()["exchanges_ok"] == 1


def test_stop_refuses_inbound_and_calls_on_stop_once() -> None:
    hubs: dict[str, LocalHub] = {}
    a, b = Node("peer-a", hubs), Node("peer-b", hubs)
    calls: list[int] = []
    b.sync._on_stop = lambda: calls.append(1)
    a.host(seed=1)
    b.host(seed=2)
    a.sees("peer-b")
    b.sees("peer-a")
    b.sync.round()
    b.sync.stop()
    b.sync.stop()
    assert calls == [1] and b.sync.stopped and b.sync.status()["enabled"] is False
    before = b.weights()
    assert a.sync.round() == 0 and a.uid_status()["exchanges_failed"] == 1
    assert _dist(b.weights(), before) == 0
    with pytest.raises(Exception, match="leaving"):
        b.sync._admit(UID, "peer-a")
    a.sync.stop()


def test_the_thread_runs_rounds_until_stopped() -> None:
    hubs: dict[str, LocalHub] = {}
    a = Node("peer-a", hubs, period=0.02)
    a.host()
    a.sync.start()
    try:
        deadline = time.monotonic() + 30
        while a.sync.status()["rounds"] < 3:
            assert time.monotonic() < deadline, "no rounds ran"
            time.sleep(0.01)
    finally:
        a.sync.stop(timeout=10)
    assert a.lookups >= 3 and not a.sync._thread.is_alive()


def test_a_node_without_replicas_backs_off_its_reads() -> None:
    from volunteer.daemon.replicas import MAX_IDLE_BACKOFF

    node = Node("a", {})
    node.host()
    delays = []
    for _ in range(6):
        node.sync.round()
        delays.append(node.sync.next_backoff())
    assert delays == [1, 2, 4, MAX_IDLE_BACKOFF, MAX_IDLE_BACKOFF, MAX_IDLE_BACKOFF]
    node.host("x.0.1")  # a new hosted uid: read again at once
    node.sync.round()
    assert node.sync.next_backoff() == 1
    node.sync.round()
    assert node.sync.next_backoff() == 2
    node.sees("b")  # a replica appeared: every period again
    node.sync.round()
    assert node.sync.next_backoff() == 1
    node.sync.stop()


def test_lookup_failure_keeps_the_last_view(pair) -> None:
    a, b = pair
    b.sync.round()
    a.sync.round()
    a.sync.lookup = lambda uids: (_ for _ in ()).throw(TimeoutError("dht"))
    a.now += 10.0
    b.now += 10.0
    assert a.sync.round() == 1  # the last view still lists b
    assert a.sync.status()["lookup_errors"] == 1


def test_exchange_timeout_grows_with_size_and_is_bounded() -> None:
    assert exchange_timeout(0) == 10.0
    assert 10.0 < exchange_timeout(8 << 20) < exchange_timeout(64 << 20) <= EXCHANGE_MAX_S
    assert exchange_timeout(1 << 40) == EXCHANGE_MAX_S
    with pytest.raises(ValueError):
        ReplicaSync("x", dict, contextlib.nullcontext, dict, None, 0.0, 0.5)  # type: ignore[arg-type]


def test_start_replicas_is_off_without_network_or_with_period_zero() -> None:
    sup = SimpleNamespace(manifest=SimpleNamespace(averaging=AveragingSection()), network=None)
    assert start_replicas(sup) is None
    sup = SimpleNamespace(manifest=SimpleNamespace(averaging=AveragingSection(replica_period_s=0)),
                          network=object())
    assert start_replicas(sup) is None


@pytest.mark.timeout(120)
def test_two_hosts_over_libp2p_converge(tmp_path) -> None:
    """Two real ``NetworkService`` hosts announce the same uid with different weights, each
    behind a real ``Runtime``, wired by ``start_replicas`` as the daemon wires them: the
    relative divergence each records shrinks from its start to ~0, and so does the distance."""
    from volunteer.net.config import NetworkConfig
    from volunteer.net.service import NetworkService
    from volunteer.runtime.limits import ServingLimits
    from volunteer.runtime.runtime import Runtime

    averaging = AveragingSection(replica_period_s=0.5, replica_alpha=0.5)
    services: list[NetworkService] = []
    runtimes: list[Runtime] = []
    syncs: list[ReplicaSync] = []
    try:
        for i in range(2):
            boot = tuple(services[0].multiaddrs) if services else ()
            svc = NetworkService(tmp_path / f"n{i}", "exp", NetworkConfig(bootstrap=boot),
                                 listen_host="127.0.0.1", enable_nat=False).start()
            services.append(svc)
            runtime = Runtime({}, ServingLimits())
            runtime.start()
            runtimes.append(runtime)
            runtime.add_expert(UID, ExpertBackend(UID, "ffn", 16, seed=10 + i))
        for svc in services:
            assert svc.announce([UID], "serving", 0.0).ok
        w0 = [[t.clone() for t in weight_aliases(r.backends[UID])] for r in runtimes]
        start = _dist(*w0) / math.sqrt(sum(float(t.pow(2).sum()) for t in w0[0]))
        assert start > 0.1
        for svc, runtime in zip(services, runtimes, strict=True):
            sup = SimpleNamespace(manifest=SimpleNamespace(averaging=averaging), network=svc, runtime=runtime)
            sync = start_replicas(sup)
            assert sync is not None
            syncs.append(sync)

        def converged() -> bool:
            sts = [s.status()["uids"].get(UID) or {} for s in syncs]
            return (all(st.get("exchanges_ok", 0) >= 1 for st in sts)
                    and any((st.get("last_divergence") if st.get("last_divergence") is not None else 1.0)
                            < 1e-3 * start for st in sts))

        deadline = time.monotonic() + 90
        while not converged():
            assert time.monotonic() < deadline, [s.status() for s in syncs]
            time.sleep(0.1)
        for s, other in zip(syncs, reversed(services), strict=True):
            st = s.status()["uids"][UID]
            assert st["replicas"] == [other.peer_id] and st["replica_count"] == 1
        w1 = [[t.clone() for t in weight_aliases(r.backends[UID])] for r in runtimes]
        assert _dist(*w1) < 1e-2 * _dist(*w0)
        channel = services[0].channels["/volunteer/averaging/1.0.0"].snapshot()
        assert channel["server"]["requests"] >= 1 and channel["client"]["calls"] >= 1
    finally:
        for s in syncs:
            s.stop()
        for svc in services:
            svc.stop()
        for r in runtimes:
            r.stop()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_two_daemons_holding_one_uid_converge(tmp_path) -> None:
    """Two ``volunteer join`` processes host the one uid of a small grid (replication 2), each
    resuming its own checkpoint of different weights; ``status --json`` shows the replica and a
    divergence that shrinks to ~0 under elastic averaging (period 1 s, alpha 0.5)."""
    import json

    from tests.conftest import DaemonFactory, cli_env, run_cli
    from tests.integration.shard_helpers import hosted, load_checkpoint_state, poll, status
    from volunteer.experts.checkpoint import save_checkpoint
    from volunteer.manifest.loader import parse_manifest

    path = tmp_path / "m.yaml"
    path.write_text("""
experiment: {name: reps, version: "1", seed: 7}
expert: {kind: ffn, hidden_dim: 32}
grid: {prefix: reps.ffn, dims: [1]}
optimizer: {name: adam, lr: 0.001}
shards: {replication: 2, rebalance_interval_s: 600, snapshot_interval_s: 600}
averaging: {replica_period_s: 1, replica_alpha: 0.5}
""")
    uid = "reps.ffn.0"
    fingerprint = parse_manifest(path.read_bytes(), str(path)).fingerprint()
    states = []
    for i in range(2):  # same version on both: the second keeps its own instead of downloading
        backend = ExpertBackend(uid, "ffn", 32, seed=100 + i)
        backend.updates_applied = 5
        states.append([t.clone() for t in weight_aliases(backend)])
        save_checkpoint(tmp_path / f"v{i}" / "checkpoints" / "reps" / f"{uid}.pt", uid, fingerprint,
                        backend.state_dict())
    start = _dist(*states) / math.sqrt(sum(float(t.pow(2).sum()) for t in states[0]))
    assert start > 0.1

    daemons = DaemonFactory(tmp_path)
    try:
        v0 = daemons.start(tmp_path / "v0", "--new-swarm", "--num-experts", "1", experiment=str(path),
                           network=True)
        boot = status(v0)["network"]["addrs"][0]
        v1 = daemons.start(tmp_path / "v1", "--bootstrap", boot, "--num-experts", "1", experiment=str(path),
                           network=True)
        poll(lambda: uid in hosted(status(v1)), 60, "v1 to serve the uid")
        assert hosted(status(v1))[uid]["weights_from"].startswith("local checkpoint")

        def replica(d) -> dict:
            return ((status(d).get("replicas") or {}).get("uids") or {}).get(uid) or {}

        def converged() -> bool:
            r0, r1 = replica(v0), replica(v1)
            divs = [r.get("last_divergence") for r in (r0, r1) if r.get("last_divergence") is not None]
            return r0.get("exchanges_ok", 0) + r1.get("exchanges_ok", 0) >= 2 and any(d < 1e-3 * start for d in divs)

        poll(converged, 90, "the replicas' divergence to shrink", every=0.2)
        out = run_cli("status", "--json", "--home", str(v1.home), env=cli_env(network=True))
        assert out.returncode == 0, out.stderr
        section = json.loads(out.stdout)["replicas"]
        peer0 = status(v0)["network"]["peer_id"]
        assert section["alpha"] == 0.5 and section["uids"][uid]["replicas"] == [peer0]
        assert section["uids"][uid]["replica_count"] == 1
        assert "divergence" in run_cli("status", "--home", str(v1.home), env=cli_env(network=True)).stdout
        # No optimizer step ran, yet the weights moved: a checkpoint pass writes them.
        from volunteer.daemon.control_client import call

        report = call(v1.home, "checkpoint", wait_s=30.0)
        assert uid in report["written"], report
        saved = load_checkpoint_state(v1.home, "reps", uid, fingerprint)["module"]
        assert not torch.equal(next(iter(saved.values())), states[1][0])
    finally:
        daemons.cleanup()
