"""The averager through ``LocalGroup`` with threads: hand-computed rounds, vanished and hung
peers, hostile exchanges, and ``CollaborativeOptimizer`` keeping three workers together."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from volunteer.client.averaging.averager import ROUND_WINDOW, Averager
from volunteer.client.averaging.group import Exchange
from volunteer.client.averaging.local_group import LocalGroup, LocalHub
from volunteer.client.averaging.methods import AveragingConfig, divergence
from volunteer.client.averaging.optimizer import CollaborativeOptimizer
from volunteer.wire.errors import (
    BadRequestError,
    NonFiniteError,
    OverloadedError,
    RemoteTimeoutError,
    TooLargeError,
    UnreachableError,
)

GUARD_S = 30.0  # generous upper bound: a call that has not returned by then has hung


def param(*values: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def make(hub: LocalHub, name: str, values: list[list[float]], config: AveragingConfig,
         grads: list[list[float]] | None = None) -> Averager:
    params = [param(*v) for v in values]
    if grads is not None:
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g, dtype=torch.float32)
    return Averager(params, LocalGroup(hub, name), config, seed=0)


def run_all(calls: list[Callable[[], object]]) -> list[object]:
    """Run every call in its own thread; fail if one has not returned within GUARD_S."""
    results: list[object] = [None] * len(calls)

    def target(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(len(calls))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(GUARD_S)
        assert not th.is_alive(), "an averaging call hung"
    return results


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def hang_until(event: threading.Event) -> Callable[[str, Exchange], list[torch.Tensor]]:
    def handler(sender: str, request: Exchange) -> list[torch.Tensor]:
        event.wait(GUARD_S)
        return []
    return handler


def grads_of(a: Averager) -> list[list[float]]:
    return [p.grad.tolist() for p in a.params]


def values_of(a: Averager) -> list[list[float]]:
    return [p.detach().tolist() for p in a.params]


ALL_REDUCE = AveragingConfig("gradAllReduce", timeout=20.0)


def test_all_reduce_two_peers(hub: LocalHub) -> None:
    a = make(hub, "a", [[0.0, 0.0], [0.0]], ALL_REDUCE, grads=[[1.0, 2.0], [4.0]])
    b = make(hub, "b", [[0.0, 0.0], [0.0]], ALL_REDUCE, grads=[[3.0, -2.0], [0.0]])
    assert run_all([lambda: a.all_reduce_grads(1), lambda: b.all_reduce_grads(1)]) == [1, 1]
    assert grads_of(a) == grads_of(b) == [[2.0, 0.0], [2.0]]
    assert a.stats()["peers_in_last_round"] == 1 and a.stats()["rounds"] == 1


def test_all_reduce_three_peers_two_rounds(hub: LocalHub) -> None:
    avs = [make(hub, n, [[0.0]], ALL_REDUCE, grads=[[g]]) for n, g in (("a", 3.0), ("b", 6.0),
                                                                       ("c", 0.0))]
    assert run_all([lambda av=av: av.all_reduce_grads(1) for av in avs]) == [2, 2, 2]
    assert [grads_of(av) for av in avs] == [[[3.0]]] * 3
    for av, g in zip(avs, (1.0, 2.0, 6.0), strict=True):
        av.params[0].grad = torch.tensor([g])
    assert run_all([lambda av=av: av.all_reduce_grads(2) for av in avs]) == [2, 2, 2]
    assert [grads_of(av) for av in avs] == [[[3.0]]] * 3


def test_peer_killed_mid_round_is_dropped(hub: LocalHub) -> None:
    # timeout far above the guard: the survivors must notice the kill, not wait it out
    cfg = AveragingConfig("gradAllReduce", timeout=120.0)
    a = make(hub, "a", [[0.0]], cfg, grads=[[2.0]])
    b = make(hub, "b", [[0.0]], cfg, grads=[[4.0]])
    c = make(hub, "c", [[0.0]], cfg, grads=[[100.0]])
    results: list[object] = []
    threads = [threading.Thread(target=lambda av=av: results.append(av.all_reduce_grads(1)),
                                daemon=True) for av in (a, b)]
    for th in threads:
        th.start()
    wait_for(lambda: a.buffered() == 1 and b.buffered() == 1, "a and b to swap gradients")
    assert all(th.is_alive() for th in threads)  # still waiting for c
    c.group.kill()  # type: ignore[attr-defined]
    for th in threads:
        th.join(GUARD_S)
        assert not th.is_alive(), "a survivor hung on the killed peer"
    assert results == [1, 1]
    assert grads_of(a) == grads_of(b) == [[3.0]]


def test_hung_peer_times_out_and_round_completes(hub: LocalHub) -> None:
    cfg = AveragingConfig("gradAllReduce", timeout=1.0)
    a = make(hub, "a", [[0.0]], cfg, grads=[[1.0]])
    b = make(hub, "b", [[0.0]], cfg, grads=[[5.0]])
    release = threading.Event()
    hung = LocalGroup(hub, "hung")
    hung.serve(hang_until(release))
    try:
        assert run_all([lambda: a.all_reduce_grads(1), lambda: b.all_reduce_grads(1)]) == [1, 1]
        assert grads_of(a) == grads_of(b) == [[3.0]]
        # the push to the hung peer fails at the round's deadline, maybe just after the round
        wait_for(lambda: a.stats()["exchanges_failed"].get("timeout", 0) == 1,
                 "a's push to time out")
    finally:
        release.set()


def test_elastic_exchange_hand_computed(hub: LocalHub) -> None:
    cfg = AveragingConfig("elasticGossip", alpha=0.25, timeout=20.0)
    a = make(hub, "a", [[0.0, 4.0], [2.0]], cfg)
    b = make(hub, "b", [[8.0, 0.0], [6.0]], cfg)
    assert a.gossip(1) == "b"
    assert values_of(a) == [[2.0, 3.0], [3.0]]  # a - 0.25 (a - b)
    assert values_of(b) == [[8.0, 0.0], [6.0]]  # b's pull waits for b's next step
    assert b.apply_pending() == 1
    assert values_of(b) == [[6.0, 1.0], [5.0]]  # b - 0.25 (b - a)
    assert a.stats()["last_divergence"] == pytest.approx(
        ((8.0**2 + 4.0**2 + 4.0**2) / (4.0**2 + 2.0**2)) ** 0.5)


def test_elastic_uses_the_smaller_alpha(hub: LocalHub) -> None:
    a = make(hub, "a", [[0.0]], AveragingConfig("elasticGossip", alpha=1.0))
    b = make(hub, "b", [[8.0]], AveragingConfig("elasticGossip", alpha=0.25))
    a.gossip(1)
    b.apply_pending()
    assert values_of(a) == [[8.0]] and values_of(b) == [[6.0]]


def test_gossip_push_and_pull_three_peers(hub: LocalHub) -> None:
    push = AveragingConfig("gossipingSgd", gossip="push")
    a = make(hub, "a", [[0.0, 2.0]], push)
    b = make(hub, "b", [[4.0, 4.0]], push)
    assert a.gossip(1) == "b"
    assert b.apply_pending() == 1
    assert values_of(a) == [[0.0, 2.0]] and values_of(b) == [[2.0, 3.0]]
    pull = AveragingConfig("gossipingSgd", gossip="pull")
    c = make(hub, "c", [[10.0, 10.0]], pull)
    b.group.close()  # type: ignore[attr-defined]  # leave a as c's only member
    assert c.gossip(2) == "a"
    assert values_of(c) == [[5.0, 6.0]] and values_of(a) == [[0.0, 2.0]]


def test_inbound_updates_wait_for_apply_pending_and_are_bounded(hub: LocalHub) -> None:
    a = Averager([param(0.0)], LocalGroup(hub, "a"), AveragingConfig("gossipingSgd"),
                 max_pending=2)
    peer = LocalGroup(hub, "peer")
    for v in (4.0, 8.0):
        peer.exchange("a", Exchange("gossip_push", 1, [torch.tensor([v])]), GUARD_S)
    with pytest.raises(OverloadedError):
        peer.exchange("a", Exchange("gossip_push", 1, [torch.tensor([100.0])]), GUARD_S)
    assert values_of(a) == [[0.0]]
    assert a.apply_pending() == 2 and values_of(a) == [[5.0]]  # (0+4)/2 = 2, (2+8)/2 = 5
    assert a.apply_pending() == 0


def test_immediate_inbound_updates(hub: LocalHub) -> None:
    a = Averager([param(0.0)], LocalGroup(hub, "a"), AveragingConfig("elasticGossip"),
                 defer_inbound=False)
    reply = LocalGroup(hub, "peer").exchange(
        "a", Exchange("elastic", 1, [torch.tensor([4.0])], alpha=0.5), GUARD_S)
    assert reply[0].tolist() == [0.0] and values_of(a) == [[2.0]]


def test_gossip_with_nobody_or_a_dead_peer(hub: LocalHub) -> None:
    cfg = AveragingConfig("elasticGossip", timeout=20.0)
    a = make(hub, "a", [[1.0]], cfg)
    assert a.gossip(1) is None
    silent = LocalGroup(hub, "silent")  # a member with no handler installed: overloaded
    assert a.gossip(2) is None
    silent.kill()
    assert a.stats()["exchanges_failed"] == {"overloaded": 1}
    assert values_of(a) == [[1.0]]


def attacker(hub: LocalHub, name: str = "evil") -> LocalGroup:
    return LocalGroup(hub, name)


@pytest.mark.parametrize(("tensors", "error"), [
    ([torch.zeros(3)], BadRequestError),  # wrong shape
    ([torch.zeros(2), torch.zeros(1)], BadRequestError),  # wrong count
    ([torch.tensor([1, 2])], BadRequestError),  # integer dtype
    ([torch.tensor([float("nan"), 0.0])], NonFiniteError),
    ([torch.tensor([float("inf"), 0.0])], NonFiniteError),
])
def test_hostile_tensors_are_refused(hub: LocalHub, tensors: list, error: type) -> None:
    a = make(hub, "a", [[1.0, 2.0]], AveragingConfig("elasticGossip"))
    evil = attacker(hub)
    with pytest.raises(error):
        evil.exchange("a", Exchange("elastic", 1, tensors), timeout=GUARD_S)
    assert values_of(a) == [[1.0, 2.0]]
    assert sum(a.stats()["inbound_refused"].values()) == 1


def test_other_methods_kinds_are_refused(hub: LocalHub) -> None:
    a = make(hub, "a", [[1.0, 2.0]], AveragingConfig("elasticGossip"))
    evil = attacker(hub)
    with pytest.raises(BadRequestError, match="averages by elasticGossip"):
        evil.exchange("a", Exchange("gossip_push", 1, [torch.zeros(2)]), timeout=GUARD_S)
    with pytest.raises(BadRequestError):
        evil.exchange("a", Exchange("grads", 1, [torch.zeros(2)]), timeout=GUARD_S)
    assert values_of(a) == [[1.0, 2.0]]


def test_fp16_is_converted(hub: LocalHub) -> None:
    a = make(hub, "a", [[0.0, 2.0]], AveragingConfig("gossipingSgd"))
    evil = attacker(hub, "peer")
    evil.exchange("a", Exchange("gossip_push", 1, [torch.tensor([2.0, 4.0]).half()]), GUARD_S)
    a.apply_pending()
    assert values_of(a) == [[1.0, 3.0]] and a.params[0].dtype == torch.float32


def test_flood_of_future_rounds_is_bounded(hub: LocalHub) -> None:
    a = make(hub, "a", [[0.0]], ALL_REDUCE, grads=[[1.0]])
    evil = attacker(hub)
    for r in range(200):
        evil.exchange("a", Exchange("grads", r, [torch.tensor([9.0])]), timeout=GUARD_S)
        evil.exchange("a", Exchange("grads", r, [torch.tensor([9.0])]), timeout=GUARD_S)
    assert a.buffered() == ROUND_WINDOW + 1  # one per round in the window, none beyond
    assert a.stats()["grads_dropped"] == 2 * (200 - ROUND_WINDOW - 1)


def test_many_senders_cannot_push_out_the_current_round(hub: LocalHub) -> None:
    a = Averager([param(0.0)], LocalGroup(hub, "a"), ALL_REDUCE, max_buffered=3)
    sybils = [attacker(hub, f"s{i}") for i in range(3)]
    for s in sybils:  # fill the buffer with far rounds
        s.exchange("a", Exchange("grads", ROUND_WINDOW, [torch.tensor([1.0])]), GUARD_S)
    honest = attacker(hub, "honest")
    honest.exchange("a", Exchange("grads", 0, [torch.tensor([2.0])]), GUARD_S)  # evicts one
    assert a.buffered() == 3
    late = attacker(hub, "late")
    with pytest.raises(TooLargeError):  # as far as the farthest: refused, not evicting
        late.exchange("a", Exchange("grads", ROUND_WINDOW, [torch.tensor([1.0])]), GUARD_S)
    assert a.buffered() == 3 and 0 in a._grads and "honest" in a._grads[0]


def test_hostile_reply_is_counted_not_applied(hub: LocalHub) -> None:
    a = make(hub, "a", [[1.0, 1.0]], AveragingConfig("gossipingSgd", gossip="pull"))
    evil = attacker(hub)
    evil.serve(lambda sender, req: [torch.tensor([float("nan"), 0.0])])
    assert a.gossip(1) is None
    assert values_of(a) == [[1.0, 1.0]]
    assert a.stats()["exchanges_failed"] == {"bad_reply": 1}


def test_local_group_contract(hub: LocalHub) -> None:
    a, b = LocalGroup(hub, "a"), LocalGroup(hub, "b")
    assert a.members() == ["b"] and b.members() == ["a"]
    with pytest.raises(ValueError, match="peer_id"):
        LocalGroup(hub, "a")
    with pytest.raises(OverloadedError):
        a.exchange("b", Exchange("gossip_pull", 0), GUARD_S)
    b.serve(lambda sender, req: [torch.tensor([float(len(sender))])])
    assert a.exchange("b", Exchange("gossip_pull", 0), GUARD_S)[0].tolist() == [1.0]
    b.serve(lambda sender, req: 1 / 0)  # a handler bug is a typed error, not a crash
    with pytest.raises(Exception) as err:
        a.exchange("b", Exchange("gossip_pull", 0), GUARD_S)
    assert getattr(err.value, "code", None) == "internal"
    gate = threading.Event()
    b.serve(hang_until(gate))
    with pytest.raises(RemoteTimeoutError):
        a.exchange("b", Exchange("gossip_pull", 0), 0.2)
    gate.set()
    b.kill()
    assert a.members() == []
    with pytest.raises(UnreachableError):
        a.exchange("b", Exchange("gossip_pull", 0), GUARD_S)


# ---- CollaborativeOptimizer: three workers on a tiny model ----------------------------


def train_three(hub: LocalHub, config: AveragingConfig, same_init: bool,
                steps: int) -> tuple[list[torch.nn.Module], list[CollaborativeOptimizer], float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=gen)
    y = (x.sum(dim=1) > 0).long()
    models = []
    for w in range(3):
        torch.manual_seed(0 if same_init else w + 1)
        models.append(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                          torch.nn.Linear(8, 2)))
    start = divergence(list(models[0].parameters()), list(models[1].parameters()))
    opts = [CollaborativeOptimizer(torch.optim.SGD(m.parameters(), lr=0.05),
                                   LocalGroup(hub, f"w{w}"), config, seed=w)
            for w, m in enumerate(models)]

    def work(w: int) -> None:
        xs, ys = x[w::3], y[w::3]
        for s in range(steps):
            batch = slice((s * 8) % 32, (s * 8) % 32 + 8)
            opts[w].zero_grad()
            loss = torch.nn.functional.cross_entropy(models[w](xs[batch]), ys[batch])
            loss.backward()
            opts[w].step()

    run_all([lambda w=w: work(w) for w in range(3)])
    return models, opts, start


def test_collaborative_all_reduce_keeps_copies_identical(hub: LocalHub) -> None:
    models, opts, _ = train_three(hub, AveragingConfig("gradAllReduce", timeout=20.0),
                                  same_init=True, steps=12)
    for m in models[1:]:
        for p, q in zip(models[0].parameters(), m.parameters(), strict=True):
            assert torch.equal(p, q)
    stats = opts[0].stats()
    assert stats["steps"] == 12 and stats["rounds"] == 12 and stats["peers_in_last_round"] == 2
    assert stats["exchanges_failed"] == {}
    for o in opts:
        o.close()


def test_collaborative_no_comm_drifts_apart(hub: LocalHub) -> None:
    models, opts, _ = train_three(hub, AveragingConfig("noComm"), same_init=True, steps=12)
    assert divergence(list(models[0].parameters()), list(models[1].parameters())) > 0
    assert opts[0].averager is None and opts[0].stats()["steps"] == 12


def test_collaborative_elastic_gossip_brings_copies_together(hub: LocalHub) -> None:
    cfg = AveragingConfig("elasticGossip", period=1, alpha=0.5, timeout=20.0)
    models, opts, start = train_three(hub, cfg, same_init=False, steps=30)
    end = max(divergence(list(a.parameters()), list(b.parameters()))
              for a in models for b in models if a is not b)
    assert start > 0.5 and end < start / 4
    assert sum(o.stats()["gossips"] for o in opts) >= 30
    for o in opts:
        o.close()


def test_collaborative_needs_a_group_to_average() -> None:
    opt = torch.optim.SGD([param(1.0)], lr=0.1)
    with pytest.raises(ValueError, match="group"):
        CollaborativeOptimizer(opt, None, AveragingConfig("elasticGossip"))
    with CollaborativeOptimizer(opt, None, AveragingConfig("local")) as co:
        co.optimizer.param_groups[0]["params"][0].grad = torch.tensor([1.0])
        co.step()
        assert co.params[0].tolist() == pytest.approx([0.9])


class _BrokenMembers(LocalGroup):
    """A group whose membership lookup fails (a DHT error, say)."""

    def members(self) -> list[str]:
        raise RuntimeError("lookup failed")


def test_a_failing_membership_lookup_is_counted_not_raised(hub: LocalHub) -> None:
    a = Averager([param(1.0)], _BrokenMembers(hub, "a"), ALL_REDUCE)
    a.params[0].grad = torch.tensor([2.0])
    assert a.all_reduce_grads(1) == 0 and grads_of(a) == [[2.0]]
    e = Averager([param(1.0)], _BrokenMembers(hub, "e"), AveragingConfig("elasticGossip"))
    assert e.gossip(1) is None and values_of(e) == [[1.0]]
    assert a.stats()["exchanges_failed"] == {"members": 1}
