"""``consensus.finish`` and the averager's shunning of gone peers, through ``LocalGroup``:
hand-computed midpoints, three members agreeing, a member still training (bounded wait), a
gone member listed on (shunned, not retried every step)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.client.averaging.test_averager import GUARD_S, make, run_all, values_of, wait_for
from volunteer.client.averaging import averager as averager_mod
from volunteer.client.averaging.consensus import finish
from volunteer.client.averaging.group import Exchange
from volunteer.client.averaging.local_group import LocalGroup, LocalHub
from volunteer.client.averaging.methods import AveragingConfig, divergence
from volunteer.client.averaging.optimizer import CollaborativeOptimizer

ELASTIC = AveragingConfig("elasticGossip", alpha=0.1, timeout=5.0)


def test_two_finishing_members_meet_at_the_midpoint(hub: LocalHub) -> None:
    a = make(hub, "a", [[0.0, 4.0]], ELASTIC)
    b = make(hub, "b", [[2.0, 0.0]], ELASTIC)
    b.begin_finish()  # b is finishing too: a's pull applies at once on its side
    report = finish(a, 10, timeout=GUARD_S, pause=0.0)
    # sweep 1: both move to the midpoint (alpha 1/2, not the config's 0.1); sweep 2: quiet
    assert values_of(a) == values_of(b) == [[1.0, 2.0]]
    assert report.ended == "agreed" and report.sweeps == 2 and report.exchanges_ok == 2
    assert report.last_divergence == 0.0


def test_three_members_finishing_together_agree(hub: LocalHub) -> None:
    members = [make(hub, n, [[float(i), -3.0 * i, 1.0 + i]], ELASTIC) for i, n in enumerate("abc")]
    reports = run_all([lambda m=m: finish(m, 5, timeout=GUARD_S, tol=1e-4, pause=0.01)
                       for m in members])
    assert {r.ended for r in reports} <= {"agreed", "alone"}
    worst = max(divergence(x.params, y.params) for x in members for y in members if x is not y)
    assert worst < 1e-3


def test_a_member_still_training_is_waited_for_but_only_until_timeout(hub: LocalHub) -> None:
    a = make(hub, "a", [[0.0]], ELASTIC)
    b = make(hub, "b", [[10.0]], ELASTIC)
    stop = threading.Event()

    def train_b() -> None:  # b keeps stepping far away and applies a's pulls between steps
        while not stop.is_set():
            with b.lock:
                b.params[0].data.add_(5.0)
            b.apply_pending()
            time.sleep(0.01)

    trainer = threading.Thread(target=train_b, daemon=True)
    trainer.start()
    try:
        started = time.monotonic()
        report = finish(a, 1, timeout=1.0, pause=0.05)
        took = time.monotonic() - started
    finally:
        stop.set()
        trainer.join(GUARD_S)
    assert report.ended == "timeout" and report.exchanges_ok >= 2
    assert took < 1.0 + ELASTIC.timeout


def test_finish_alone_returns_at_once(hub: LocalHub) -> None:
    a = make(hub, "a", [[3.0]], ELASTIC)
    report = finish(a, 1, timeout=GUARD_S)
    assert report.ended == "alone" and report.sweeps == 0 and values_of(a) == [[3.0]]


def test_consensus_is_taken_by_every_method_with_alpha_at_most_half(hub: LocalHub) -> None:
    a = make(hub, "a", [[0.0]], AveragingConfig("gradAllReduce"), grads=[[0.0]])
    a.begin_finish()
    peer = LocalGroup(hub, "peer")
    reply = peer.exchange("a", Exchange("consensus", 1, [torch.tensor([4.0])], alpha=1.0), GUARD_S)
    assert [t.tolist() for t in reply] == [[0.0]]  # a as it was
    assert values_of(a) == [[2.0]]  # moved half way, not all the way


class _Ghosts(LocalGroup):
    """A group whose DHT still lists a member that was killed (its entry not expired)."""

    def members(self) -> list[str]:
        return [*super().members(), "ghost"]


def test_a_gone_member_is_shunned_until_it_leaves_the_listing(hub: LocalHub,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(averager_mod, "SHUN_S", 2.0)
    a = averager_mod.Averager([torch.nn.Parameter(torch.tensor([1.0]))], _Ghosts(hub, "a"),
                              ELASTIC, seed=0)
    assert a.gossip(1) is None
    assert a.stats()["exchanges_failed"] == {"unreachable": 1}
    for step in range(2, 6):  # not retried while shunned: no wasted exchange per step
        assert a.gossip(step) is None
    assert a.stats()["exchanges_failed"] == {"unreachable": 1}
    assert a.members_to_average() == []
    wait_for(lambda: a.members_to_average() == ["ghost"], "the shun to end")
    assert a.gossip(6) is None  # shun over: tried again (and shunned again)
    assert a.stats()["exchanges_failed"] == {"unreachable": 2}
    a.close()


def test_collaborative_finish(hub: LocalHub) -> None:
    p, q = torch.nn.Parameter(torch.tensor([0.0])), torch.nn.Parameter(torch.tensor([8.0]))
    cfg = AveragingConfig("elasticGossip", timeout=5.0)
    ca = CollaborativeOptimizer(torch.optim.SGD([p], lr=0.1), LocalGroup(hub, "a"), cfg, seed=1)
    cb = CollaborativeOptimizer(torch.optim.SGD([q], lr=0.1), LocalGroup(hub, "b"), cfg, seed=2)
    reports = run_all([lambda: ca.finish(GUARD_S), lambda: cb.finish(GUARD_S)])
    assert p.tolist() == pytest.approx(q.tolist(), abs=1e-2)
    assert all(r is not None and r.ended in ("agreed", "alone") for r in reports)
    solo = CollaborativeOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
                                  None, AveragingConfig("local"))
    assert solo.finish() is None
    for c in (ca, cb):
        c.close()
