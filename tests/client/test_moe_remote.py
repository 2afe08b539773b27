"""RemoteMixtureOfExperts against real Runtime + ZmqFrontend servers on loopback."""

from __future__ import annotations

import copy
import re
import threading
from collections import Counter

import pytest
import torch

from tests.client.helpers import LocalExpert, reference_moe
from volunteer.client.directory import StaticDirectory, make_uid
from volunteer.client.moe import NotEnoughExpertsError, RemoteMixtureOfExperts
from volunteer.client.zmq_transport import ZmqTransport

HIDDEN = 16
GRID = (2, 3)
PREFIX = "r.ffn"
UIDS = [make_uid(PREFIX, (i, j)) for i in range(GRID[0]) for j in range(GRID[1])]


def _local_copies(*servers) -> dict[str, LocalExpert]:
    return {
        uid: LocalExpert(copy.deepcopy(backend.module))
        for server in servers
        for uid, backend in server.backends.items()
    }


def _moe(directory, **kwargs) -> RemoteMixtureOfExperts:
    kwargs.setdefault("k_best", 3)
    torch.manual_seed(1)
    return RemoteMixtureOfExperts(HIDDEN, GRID, PREFIX, directory, beam_size=6, **kwargs)


class _GatedTransport:
    """Wraps a real transport; holds each request until ``release`` is set (a slow link)."""

    def __init__(self, inner, release: threading.Event):
        self.inner, self.release = inner, release

    def request(self, frames, timeout):
        self.release.wait(timeout)
        return self.inner.request(frames, timeout)

    def close(self):
        self.inner.close()


@pytest.mark.timeout(60)
def test_matches_local_moe_with_same_weights(expert_servers):
    a = expert_servers(UIDS[:3], HIDDEN, seed=1)
    b = expert_servers(UIDS[3:], HIDDEN, seed=2)
    local = _local_copies(a, b)
    with StaticDirectory.from_endpoints([a.endpoint, b.endpoint]) as directory:
        assert directory.uids == sorted(UIDS)
        moe = _moe(directory, forward_timeout=20, backward_timeout=20)
        try:
            x = torch.randn(12, HIDDEN, requires_grad=True)
            w = torch.randn(12, HIDDEN)
            out = moe(x)
            (out * w).sum().backward()
            gate_grads = {n: p.grad.clone() for n, p in moe.named_parameters()}

            x_ref = x.detach().clone().requires_grad_(True)
            moe.zero_grad()
            ref = reference_moe(moe.gate, local, PREFIX, x_ref, k=3)
            (ref * w).sum().backward()
            assert torch.allclose(out, ref, atol=1e-5)
            assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
            for n, p in moe.named_parameters():
                assert torch.allclose(gate_grads[n], p.grad, atol=1e-5), n
            assert not moe.last_report.failed and not moe.last_report.backward_failed
            # every expert that answered got exactly one backward, hence one optimizer step
            stats = {**a.runtime.stats(), **b.runtime.stats()}
            used = set(moe.last_report.answered)
            assert {u for u, s in stats.items() if s["updates_applied"] == 1} == used
        finally:
            moe.close()


@pytest.mark.timeout(60)
def test_dead_server_dropped_and_softmax_renormalised(expert_servers):
    a = expert_servers(UIDS[:3], HIDDEN, seed=1)
    b = expert_servers(UIDS[3:], HIDDEN, seed=2)
    local = _local_copies(a, b)
    with StaticDirectory.from_endpoints([a.endpoint, b.endpoint]) as directory:
        moe = _moe(directory, forward_timeout=1.0, avoid_for=0)
        try:
            x = torch.randn(10, HIDDEN)
            with torch.no_grad():
                moe(x)  # warm connections to both servers
            b.stop()
            with torch.no_grad():
                out = moe(x)
            failed = set(moe.last_report.failed)
            chosen = set(moe.last_report.answered) | failed
            assert failed == chosen & set(UIDS[3:]) and failed
            assert all(r.split(":")[0] in ("timeout", "unreachable") for r in moe.last_report.failed.values())
            ref = reference_moe(moe.gate, local, PREFIX, x, k=3, drop=frozenset(UIDS[3:]))
            assert torch.allclose(out, ref, atol=1e-5)
        finally:
            moe.close()


@pytest.mark.timeout(60)
def test_fewer_than_k_min_answering_raises(expert_servers):
    a = expert_servers(UIDS[:1], HIDDEN)
    b = expert_servers(UIDS[1:], HIDDEN)
    with StaticDirectory.from_endpoints([a.endpoint, b.endpoint]) as directory:
        moe = _moe(directory, k_best=2, k_min=2, forward_timeout=0.5)
        try:
            b.stop()
            with pytest.raises(NotEnoughExpertsError, match="k_min=2"):
                moe(torch.randn(4, HIDDEN))
        finally:
            moe.close()


@pytest.mark.timeout(60)
def test_draining_server_is_avoided(expert_servers):
    a = expert_servers(UIDS[:3], HIDDEN)
    b = expert_servers(UIDS[3:], HIDDEN)
    with StaticDirectory.from_endpoints([a.endpoint, b.endpoint]) as directory:
        moe = _moe(directory, k_best=6, forward_timeout=10)
        try:
            x = torch.randn(4, HIDDEN)
            b.runtime.drain(timeout=5)
            moe(x).sum().backward()
            assert set(moe.last_report.failed) == set(UIDS[3:])
            assert all(r.startswith("draining") for r in moe.last_report.failed.values())
            assert sorted(moe.last_report.answered) == UIDS[:3]
            def refused() -> int:
                return sum(s["errors"].get("draining", 0) for s in b.runtime.stats().values())

            assert refused() == len(UIDS[3:])
            moe(x).sum().backward()
            assert sorted(moe.last_report.answered) == UIDS[:3]
            assert moe.last_report.failed == {}
            assert refused() == len(UIDS[3:])  # not asked again
        finally:
            moe.close()


class _CachingDirectory:
    """Like DhtDirectory: answers from a cached copy of the registry (``live``), which only
    ``invalidate(uids)`` refreshes, so a volunteer that just left is still offered."""

    def __init__(self, live: dict):
        self.live = live
        self.cached = StaticDirectory(dict(live))
        self.invalidated: list[list[str]] = []

    def children(self, prefixes):
        return self.cached.children(prefixes)

    def resolve(self, uids):
        return self.cached.resolve(uids)

    def invalidate(self, uids):
        self.invalidated.append(list(uids))
        self.cached = StaticDirectory(dict(self.live))


@pytest.mark.timeout(60)
def test_leaver_is_forgotten_by_a_caching_directory_and_the_next_step_replans(expert_servers):
    a = expert_servers(UIDS[:3], HIDDEN)
    b = expert_servers(UIDS[3:], HIDDEN)
    ta, tb = ZmqTransport(a.endpoint), ZmqTransport(b.endpoint)
    live = {u: (ta if u in UIDS[:3] else tb) for u in UIDS}
    directory = _CachingDirectory(live)
    moe = RemoteMixtureOfExperts(HIDDEN, GRID, PREFIX, directory, k_best=1, beam_size=1,
                                 forward_timeout=10, backward_timeout=10)
    try:
        with torch.no_grad():  # every sample prefers b's first coordinate (1, *)
            moe.gate.proj.weight.zero_()
            moe.gate.proj.bias.copy_(torch.tensor([0.0, 5.0, 2.0, 1.0, 0.0]))
        x = torch.randn(4, HIDDEN)
        moe(x).sum().backward()
        assert moe.last_report.answered == [make_uid(PREFIX, (1, 0))]
        b.runtime.drain(timeout=5)  # b leaves: the registry drops it, the cache does not know
        for uid in UIDS[3:]:
            del live[uid]
        with pytest.raises(NotEnoughExpertsError, match="draining"):
            moe(x)  # this step only had b's expert: skipped
        assert directory.invalidated == [[make_uid(PREFIX, (1, 0))]]
        out = moe(x)  # re-planned with the fresh registry: a's experts
        out.sum().backward()
        assert moe.last_report.answered == [make_uid(PREFIX, (0, 0))] and not moe.last_report.failed
        assert sum(s["errors"].get("draining", 0) for s in b.runtime.stats().values()) == 1
    finally:
        moe.close()
        ta.close()
        tb.close()


@pytest.mark.timeout(60)
def test_narrow_beam_replans_around_an_avoided_expert_without_invalidate(expert_servers):
    a = expert_servers(UIDS[:3], HIDDEN)
    b = expert_servers(UIDS[3:4], HIDDEN)  # the only expert under first coordinate 1
    with StaticDirectory.from_endpoints([a.endpoint, b.endpoint]) as directory:  # never refreshed
        assert not hasattr(directory, "invalidate")
        moe = RemoteMixtureOfExperts(HIDDEN, GRID, PREFIX, directory, k_best=1, beam_size=1,
                                     forward_timeout=10, backward_timeout=10)
        try:
            with torch.no_grad():
                moe.gate.proj.weight.zero_()
                moe.gate.proj.bias.copy_(torch.tensor([0.0, 5.0, 2.0, 1.0, 0.0]))
            x = torch.randn(3, HIDDEN)
            b.runtime.drain(timeout=5)
            with pytest.raises(NotEnoughExpertsError, match="draining"):
                moe(x)
            moe(x).sum().backward()  # "r.ffn.1." holds only the avoided expert: the beam looks further
            assert moe.last_report.answered == [make_uid(PREFIX, (0, 0))] and not moe.last_report.failed
        finally:
            moe.close()


@pytest.mark.timeout(60)
def test_late_server_cut_off_after_k_min(expert_servers):
    a = expert_servers(UIDS[:3], HIDDEN)
    b = expert_servers(UIDS[3:], HIDDEN)
    release = threading.Event()
    fast, slow = ZmqTransport(a.endpoint), _GatedTransport(ZmqTransport(b.endpoint), release)
    directory = StaticDirectory({u: (fast if u in UIDS[:3] else slow) for u in UIDS})
    moe = _moe(directory, k_best=6, k_min=1, forward_timeout=30, timeout_after_k_min=0.1)
    try:
        x = torch.randn(5, HIDDEN, requires_grad=True)
        moe(x).sum().backward()
        assert sorted(moe.last_report.answered) == UIDS[:3]
        assert set(moe.last_report.failed) == set(UIDS[3:])
        assert x.grad is not None and torch.isfinite(x.grad).all()
    finally:
        release.set()
        moe.close()
        fast.close()
        slow.close()


@pytest.mark.timeout(90)
def test_training_through_real_servers_lowers_loss(expert_servers):
    torch.manual_seed(0)
    server = expert_servers(UIDS, HIDDEN, lr=3e-3)
    with StaticDirectory.from_endpoints([server.endpoint]) as directory:
        moe = _moe(directory, k_best=2, forward_timeout=20, backward_timeout=20)
        model = torch.nn.Sequential(torch.nn.Linear(8, HIDDEN), moe, torch.nn.Linear(HIDDEN, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        target_w = torch.randn(8, 1, generator=gen)
        losses = []
        try:
            for _ in range(150):
                x = torch.randn(32, 8, generator=gen)
                y = torch.sin(x @ target_w) + 0.5 * (x @ target_w)
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        finally:
            moe.close()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert sum(s["updates_applied"] for s in server.runtime.stats().values()) >= 150


@pytest.mark.timeout(90)
def test_training_continues_when_a_volunteer_vanishes(expert_servers):
    a = expert_servers(UIDS[:3], HIDDEN)
    b = expert_servers(UIDS[3:], HIDDEN)
    with StaticDirectory.from_endpoints([a.endpoint, b.endpoint]) as directory:
        moe = _moe(directory, k_best=2, forward_timeout=1.0, backward_timeout=1.0)
        model = torch.nn.Sequential(torch.nn.Linear(8, HIDDEN), moe, torch.nn.Linear(HIDDEN, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        failed_steps: list[int] = []
        failures: Counter[str] = Counter()
        losses: list[float] = []
        try:
            for step in range(40):
                if step == 10:
                    b.stop()
                x = torch.randn(16, 8, generator=gen)
                try:
                    loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
                except NotEnoughExpertsError:
                    loss = None  # a sample whose chosen experts all vanished: skip the step
                if moe.last_report.failed:
                    failed_steps.append(step)
                    assert set(moe.last_report.failed) <= set(UIDS[3:])
                    failures.update(list(moe.last_report.failed))
                if loss is None:
                    continue
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if step > 10:
                    assert set(moe.last_report.answered) <= set(UIDS[:3])
        finally:
            moe.close()
    # each of the vanished volunteer's experts costs one timeout, then it is avoided
    assert failed_steps and failed_steps[0] == 10 and len(failed_steps) <= len(UIDS[3:])
    assert all(n == 1 for n in failures.values())
    assert set(moe.last_report.answered) <= set(UIDS[:3])
    assert len(losses) >= 40 - len(failed_steps) and sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.timeout(30)
def test_from_endpoints_skips_unreachable(expert_servers, dead_endpoint):
    a = expert_servers(UIDS[:2], HIDDEN)
    with StaticDirectory.from_endpoints([dead_endpoint, a.endpoint], timeout=0.5) as directory:
        assert directory.uids == UIDS[:2]
        assert list(directory.failed_endpoints) == [dead_endpoint]
        assert directory.expert_info[UIDS[0]]["input_shapes"] == [[HIDDEN]]
        assert set(directory.resolve(UIDS)) == set(UIDS[:2])


@pytest.mark.timeout(60)
def test_adaptive_deadlines_cut_a_hung_server_at_its_own_deadline(expert_servers):
    from volunteer.client.latency import LatencyTracker, endpoint_key

    a = expert_servers(UIDS[:3], HIDDEN)
    b = expert_servers(UIDS[3:], HIDDEN)
    tracker = LatencyTracker(floor=0.2, window=16, min_samples=2)
    with StaticDirectory.from_endpoints([a.endpoint, b.endpoint]) as directory:
        moe = _moe(directory, k_best=6, k_min=1, forward_timeout=30, backward_timeout=30,
                   latency=tracker)
        try:
            # no history: the first step's calls wait the configured 30 s if they must
            assert tracker.deadline(endpoint_key(directory.resolve([UIDS[3]])[UIDS[3]],
                                                 "forward"), 30.0) == 30.0
            for _ in range(3):
                moe(torch.randn(4, HIDDEN)).sum().backward()
                assert sorted(moe.last_report.backward_answered) == UIDS
            learnt = tracker.snapshot()
            assert {f"{s.endpoint}|{op}" for s in (a, b) for op in ("forward", "backward")} \
                <= set(learnt)
            with b.runtime.exclusive():  # b hangs: it accepts requests and never answers
                x = torch.randn(4, HIDDEN, requires_grad=True)
                moe(x).sum().backward()
            report = moe.last_report
            assert sorted(report.answered) == UIDS[:3]
            assert set(report.failed) == set(UIDS[3:])
            for reason in report.failed.values():
                # cut at b's own short deadline (by its transport or by dispatch, whichever
                # came first), not at the layer's 30 s
                found = re.search(r"within (?:its own )?([0-9.]+) ?s", reason)
                assert reason.startswith("timeout: ") and found, reason
                assert float(found.group(1)) < 30.0
            assert x.grad is not None and torch.isfinite(x.grad).all()
        finally:
            moe.close()
