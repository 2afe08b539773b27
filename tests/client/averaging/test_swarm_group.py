"""SwarmGroup over real ClientNodes on loopback, bootstrapped through a real DHT server.

Members find each other through the DHT and exchange tensors on libp2p streams; a member
that dies mid-exchange, a handler that raises, a full worker pool and a stranger without an
admission token all give the caller a typed error (or no listing), never a hang.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from volunteer.client.averaging.averager import Averager
from volunteer.client.averaging.group import Exchange
from volunteer.client.averaging.methods import AveragingConfig
from volunteer.client.averaging.swarm_group import ExchangeServer, SwarmGroup
from volunteer.client.averaging.wire import decode_answer, encode_exchange
from volunteer.client.node import ClientNode
from volunteer.net.admission import AdmissionPolicy, issue_token, new_signing_key, owner_key_text
from volunteer.net.config import NetworkConfig
from volunteer.net.service import NetworkService
from volunteer.wire.errors import (
    BadRequestError,
    InternalError,
    NonFiniteError,
    OverloadedError,
    RemoteTimeoutError,
    UnreachableError,
)

EXP = "avg-exp"
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
pytestmark = pytest.mark.timeout(180)


def poll(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def plus_one(seen: list | None = None):
    def handler(sender: str, request: Exchange) -> list[torch.Tensor]:
        if seen is not None:
            seen.append((sender, request.kind, request.round))
        return [t + 1 for t in request.tensors]
    return handler


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """One DHT server (a volunteer's network service) and three trainers' ClientNodes."""
    home: Path = tmp_path_factory.mktemp("avg")
    boot = NetworkService(home / "boot", EXP, NetworkConfig(), listen_host="127.0.0.1",
                          enable_nat=False).start()
    nodes: list[ClientNode] = []
    try:
        for _ in range(3):
            nodes.append(ClientNode(EXP, boot.multiaddrs, listen_addrs=LOOPBACK, nat=False).start())
        yield boot, nodes
    finally:
        for n in nodes:
            n.stop()
        boot.stop()


def join_all(nodes: list[ClientNode], run: str, **kw):
    groups = [n.averaging_group(run, cache_s=0.2, **kw) for n in nodes]
    for g in groups:
        others = {o.me for o in groups} - {g.me}
        poll(lambda g=g, others=others: set(g.members()) >= others)
    return groups


def test_three_members_find_each_other_and_exchange(swarm):
    _boot, nodes = swarm
    groups = join_all(nodes, "three")
    seen: dict[str, list] = {g.me: [] for g in groups}
    for g in groups:
        g.serve(plus_one(seen[g.me]))
    with pytest.raises(ValueError, match="already a member"):
        nodes[0].averaging_group("three")
    try:
        for g in groups:
            assert g.me not in g.members() and len(g.members()) == 2
            for peer in g.members():
                x = torch.randn(4, 3)
                out = g.exchange(peer, Exchange("elastic", 7, [x, torch.ones(2)], 0.5), 20.0)
                assert torch.allclose(out[0], x + 1) and torch.equal(out[1], torch.full((2,), 2.0))
        for g in groups:  # each answered both others, who were named by their connections
            assert sorted(s for s, _k, _r in seen[g.me]) == sorted(o.me for o in groups
                                                                   if o is not g)
            assert {(k, r) for _s, k, r in seen[g.me]} == {("elastic", 7)}
        out = groups[0].exchange(groups[1].me, Exchange("gossip_pull", 1, [torch.ones(3)]), 20.0)
        assert torch.equal(out[0], torch.full((3,), 2.0))
    finally:
        for g in groups:
            g.close()
    # Left: the handlers no longer answer, and the entries are withdrawn (tombstones).
    assert nodes[1].averaging.server.groups() == []
    with pytest.raises(OverloadedError):
        groups[0].exchange(groups[1].me, Exchange("elastic", 1, [torch.ones(1)]), 20.0)
    poll(lambda: nodes[2].lookup(["_avg.three."])["_avg.three."] == [])
    nodes[0].averaging_group("three").close()  # left, so it may join again


def test_entries_are_refreshed_before_they_expire(swarm):
    _boot, nodes = swarm
    a, b = join_all(nodes[:2], "fresh", ttl=2.0)
    try:
        # five publishes take ~2.7 s (one every ttl / 3): past the first entry's expiry
        poll(lambda: a.provider.publishes >= 5 and b.provider.publishes >= 5)
        assert a.provider.refresh() and [p for p, _ in a.provider.refresh()] == sorted(
            [a.me, b.me])
        assert a.members() == [b.me]
    finally:
        a.close()
        b.close()


def test_fp16_exchange(swarm):
    _boot, nodes = swarm
    a, b = join_all(nodes[:2], "fp16", compression="fp16")
    b.serve(plus_one())
    try:
        x = torch.randn(64)
        out = a.exchange(b.me, Exchange("elastic", 1, [x, torch.tensor([1e6])]), 20.0)
        assert out[0].dtype == torch.float32 and torch.allclose(out[0], x + 1, atol=1e-2)
        assert torch.equal(out[1], torch.tensor([1e6 + 1]))
    finally:
        a.close()
        b.close()


def test_a_handlers_error_comes_back_typed(swarm):
    _boot, nodes = swarm
    a, b = join_all(nodes[:2], "errors")

    def handler(sender: str, request: Exchange) -> list[torch.Tensor]:
        if request.round == 1:
            raise BadRequestError("expected 2 tensors of our shapes")
        if request.round == 2:
            raise NonFiniteError("nan in your parameters")
        if request.round == 3:
            raise ZeroDivisionError("a bug")
        return [torch.tensor([float("nan")])]  # a peer that answers garbage

    try:
        with pytest.raises(OverloadedError):  # a member whose handler is not installed yet
            a.exchange(b.me, Exchange("elastic", 0, [torch.ones(1)]), 20.0)
        b.serve(handler)
        for rnd, error in ((1, BadRequestError), (2, NonFiniteError), (3, InternalError),
                           (4, NonFiniteError)):
            with pytest.raises(error):
                a.exchange(b.me, Exchange("elastic", rnd, [torch.ones(1)]), 20.0)
        # the stream survived every refusal
        b.serve(plus_one())
        assert torch.equal(a.exchange(b.me, Exchange("grads", 5, [torch.ones(1)]), 20.0)[0],
                           torch.full((1,), 2.0))
    finally:
        a.close()
        b.close()


def test_a_full_pool_answers_overloaded_at_once():
    """The server's bound, without a network: ``max_pending`` messages queued or running,
    the next one answered ``overloaded`` by the submitting thread, each exactly once."""

    class Channel:
        def serve(self, submit):
            self.submit = submit

    channel = Channel()
    server = ExchangeServer(channel, workers=2, max_pending=3)
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow(sender: str, request: Exchange) -> list[torch.Tensor]:
        entered.release()
        release.wait(60)
        return [request.tensors[0] * 2]

    server.register("g", slow)
    replies: list[list] = []
    frames = [bytes(f) for f in encode_exchange("g", Exchange("elastic", 1, [torch.ones(1)]))]
    try:
        for _ in range(3):
            channel.submit("peer", frames, replies.append)
        assert entered.acquire(timeout=30) and entered.acquire(timeout=30)
        channel.submit("peer", frames, replies.append)  # the fourth: refused right here
        assert len(replies) == 1
        with pytest.raises(OverloadedError, match="busy"):
            decode_answer(replies[0])
        release.set()
        poll(lambda: len(replies) == 4)
        assert [decode_answer(r)[0].item() for r in replies[1:]] == [2.0, 2.0, 2.0]
        assert server.answered == 3 and server.refused == {"overloaded": 1}
    finally:
        release.set()
        server.close()
    channel.submit("peer", frames, replies.append)  # closed: answered, not dropped
    with pytest.raises(OverloadedError):
        decode_answer(replies[-1])


def test_a_member_killed_mid_exchange_fails_typed_and_nothing_hangs(swarm):
    boot, _nodes = swarm
    a_node = ClientNode(EXP, boot.multiaddrs, listen_addrs=LOOPBACK, nat=False).start()
    victim = ClientNode(EXP, boot.multiaddrs, listen_addrs=LOOPBACK, nat=False).start()
    release = threading.Event()
    try:
        a, v = join_all([a_node, victim], "crash")
        entered = threading.Event()

        def stuck(sender: str, request: Exchange) -> list[torch.Tensor]:
            entered.set()
            release.wait(60)
            return list(request.tensors)

        v.serve(stuck)
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(a.exchange, v.me, Exchange("elastic", 1, [torch.ones(8)]), 30.0)
            assert entered.wait(30)
            victim._thread.stop()  # a crash: no withdrawal, connections just vanish
            with pytest.raises((UnreachableError, RemoteTimeoutError)):
                call.result(60)
        # still listed (its entry outlives it) but unreachable: typed, bounded by the timeout
        with pytest.raises((UnreachableError, RemoteTimeoutError)):
            a.exchange(v.me, Exchange("elastic", 2, [torch.ones(8)]), 5.0)
    finally:
        release.set()
        victim.stop()
        a_node.stop()


def test_a_stranger_without_a_token_is_never_a_member(swarm):
    boot, _nodes = swarm
    owner = new_signing_key()
    policy = AdmissionPolicy(owner_key_text(owner), (), EXP)
    nodes = [ClientNode(EXP, boot.multiaddrs, listen_addrs=LOOPBACK, nat=False).start()
             for _ in range(3)]
    try:
        a_node, b_node, stranger_node = nodes

        def token(n: ClientNode) -> bytes:
            return issue_token(owner, EXP, n.peer_id, expires=time.time() + 3600)

        a = a_node.averaging_group("closed", admit=policy.admits_entry,
                                   admission_token=token(a_node), cache_s=0.2)
        b = b_node.averaging_group("closed", admit=policy.admits_entry,
                                   admission_token=token(b_node), cache_s=0.2)
        # The stranger signs valid entries and reads without a filter (an open reader).
        s = stranger_node.averaging_group("closed", cache_s=0.2)
        poll(lambda: {a.me, b.me} <= set(s.members()))  # the DHT holds every entry...
        poll(lambda: set(a.members()) == {b.me} and set(b.members()) == {a.me})
        a.serve(plus_one())
        assert s.me in {p for p, _ in s.provider()}  # ...the stranger's own included
        for _ in range(5):
            assert s.me not in a.members() and s.me not in b.members()
            time.sleep(0.2)
        # ...and its exchanges are refused, while a member's go through.
        with pytest.raises(OverloadedError, match="not a member"):
            s.exchange(a.me, Exchange("gossip_push", 1, [torch.ones(2)]), 20.0)
        assert torch.equal(b.exchange(a.me, Exchange("gossip_push", 1, [torch.ones(2)]),
                                      20.0)[0], torch.full((2,), 2.0))
    finally:
        for n in nodes:
            n.stop()


def test_hostile_bytes_to_the_server_are_refused_typed(swarm):
    """Frames that are not an exchange reach the server through the real channel and come
    back as typed refusals; the stream and the server keep working."""
    _boot, nodes = swarm
    a, b = join_all(nodes[:2], "hostile")
    b.serve(plus_one())
    channel = nodes[0].averaging.channel
    addrs = nodes[1].multiaddrs
    try:
        for frames, error in (([b"\xc1"], BadRequestError),
                              ([encode_exchange("_avg.nobody.", Exchange("elastic", 1))[0]],
                               OverloadedError)):
            with pytest.raises(error):
                decode_answer(channel.request(b.me, addrs, frames, 20.0))
        assert a.exchange(b.me, Exchange("elastic", 1, [torch.zeros(1)]), 20.0)[0].item() == 1.0
    finally:
        a.close()
        b.close()


def test_averagers_elastic_gossip_moves_two_trainers_together(swarm):
    """End to end: two ClientNodes' Averagers (elasticGossip, alpha 0.5) over SwarmGroup;
    one symmetric pull each way and both end at the pair's mean."""
    _boot, nodes = swarm
    a, b = join_all(nodes[:2], "elastic")
    pa, pb = torch.nn.Parameter(torch.zeros(16)), torch.nn.Parameter(torch.full((16,), 4.0))
    config = AveragingConfig("elasticGossip", period=1, alpha=0.5, timeout=20.0)
    av_a, av_b = Averager([pa], a, config, seed=0), Averager([pb], b, config, seed=1)
    try:
        assert av_a.gossip(1) == b.me  # a pulled halfway; b answered and queued its pull
        assert torch.allclose(pa.data, torch.full((16,), 2.0))
        poll(lambda: av_b.apply_pending() == 1)  # the trainer applies it between its steps
        assert torch.allclose(pb.data, torch.full((16,), 2.0))
        pb.data += 2.0  # b trains on; the pull now goes the other way over b's own stream
        assert av_b.gossip(2) == a.me
        poll(lambda: av_a.apply_pending() == 1)
        assert torch.allclose(pa.data, pb.data) and torch.allclose(pa.data, torch.full((16,), 3.0))
        assert av_a.stats()["exchanges_failed"] == {} and av_b.stats()["inbound_refused"] == {}
    finally:
        av_a.close()
        av_b.close()
        a.close()
        b.close()


def test_averagers_grad_all_reduce_over_the_swarm(swarm):
    _boot, nodes = swarm
    a, b = join_all(nodes[:2], "allreduce")
    pa, pb = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    pa.grad, pb.grad = torch.full((4,), 1.0), torch.full((4,), 3.0)
    config = AveragingConfig("gradAllReduce", timeout=20.0)
    av_a, av_b = Averager([pa], a, config), Averager([pb], b, config)
    try:
        with ThreadPoolExecutor(2) as pool:
            rounds = [pool.submit(av.all_reduce_grads, 1) for av in (av_a, av_b)]
            assert [r.result(60) for r in rounds] == [1, 1]
        assert torch.equal(pa.grad, torch.full((4,), 2.0))
        assert torch.equal(pb.grad, torch.full((4,), 2.0))
    finally:
        av_a.close()
        av_b.close()
        a.close()
        b.close()


def test_a_newcomer_missing_from_the_cached_view_is_looked_up_once():
    """A member that joined after our cached membership read is answered after one fresh read
    (the NAT lab's first exchange of a pair was refused); a stranger is still refused, and
    forced reads are throttled whatever senders ask (no DHT query per request)."""

    class Channel:
        def serve(self, submit):
            self.submit = submit

    class Provider:
        def __init__(self) -> None:
            self.cached = [("me", []), ("old", [])]
            self.fresh = [("me", []), ("old", []), ("new", [])]
            self.refreshes = 0

        def __call__(self):
            return list(self.cached)

        def refresh(self):
            self.refreshes += 1
            self.cached = list(self.fresh)
            return list(self.fresh)

    channel, provider = Channel(), Provider()
    server = ExchangeServer(channel, workers=1, max_pending=4)
    group = SwarmGroup(server, channel, "g", "me", provider)
    group.serve(lambda sender, request: [request.tensors[0] + 1])
    frames = [bytes(f) for f in encode_exchange("g", Exchange("elastic", 1, [torch.ones(1)]))]
    replies: list[list] = []
    try:
        channel.submit("new", frames, replies.append)
        poll(lambda: len(replies) == 1)
        assert decode_answer(replies[0])[0].item() == 2.0
        assert provider.refreshes == 1
        for _ in range(3):  # strangers: refused, at most one more forced read in this second
            channel.submit("stranger", frames, replies.append)
        poll(lambda: len(replies) == 4)
        for reply in replies[1:]:
            with pytest.raises(OverloadedError, match="not a member"):
                decode_answer(reply)
        assert provider.refreshes <= 2
    finally:
        group.close()
        server.close()
