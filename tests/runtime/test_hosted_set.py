"""Experts moving in and out of a serving runtime: ``add_expert`` / ``remove_expert``."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.runtime.servers import Replies, make_backends, running, submit_sync, wait_for
from volunteer.wire.errors import DrainingError, UnknownExpertError
from volunteer.wire.messages import decode_reply, encode_request
from volunteer.wire.ops import decode_info_reply, encode_info_request

H = 16
pytestmark = pytest.mark.timeout(60)


def fwd(uid: str, rows: int, rid: int) -> list:
    return encode_request("forward", uid, [torch.randn(rows, H)], request_id=rid, timeout=30.0)



def test_expert_added_to_an_empty_runtime_is_served():
    new = make_backends({"g.0": ("ffn", H)}, seed=1)["g.0"]
    with running({}, zmq=False) as (rt, _):
        with pytest.raises(UnknownExpertError):
            decode_reply(submit_sync(rt, fwd("g.0", 2, 1)))
        assert rt.stats() == {} and decode_info_reply(submit_sync(rt, encode_info_request(1))) == {}
        rt.add_expert("g.0", new)
        x = torch.randn(3, H)
        out = decode_reply(submit_sync(rt, encode_request("forward", "g.0", [x], request_id=2))).tensors[0]
        with torch.no_grad():
            torch.testing.assert_close(out, new.module(x), rtol=1e-5, atol=1e-5)
        stats = rt.stats()
        assert set(stats) == {"g.0"} and stats["g.0"]["requests"] == 1 and stats["g.0"]["samples"] == 3
        info = decode_info_reply(submit_sync(rt, encode_info_request(3)))
        assert set(info) == {"g.0"} and info["g.0"]["kind"] == "ffn" and info["g.0"]["state"] == "serving"
        assert set(rt.info()) == {"g.0"}
        # the errors of the request sent before it was hosted were not charged to it
        assert stats["g.0"]["errors"] == {}
        assert rt.rejected.snapshot(0, 0)["errors"] == {"unknown_expert": 1}


def test_adding_a_hosted_uid_twice_raises():
    backends = make_backends({"g.0": ("nop", H)})
    other = make_backends({"g.0": ("nop", H)}, seed=2)["g.0"]
    with running(backends, zmq=False) as (rt, _):
        with pytest.raises(ValueError, match="already hosted"):
            rt.add_expert("g.0", other)
        assert rt.backends["g.0"] is backends["g.0"]  # the hosted one is untouched
        decode_reply(submit_sync(rt, fwd("g.0", 1, 1)))
        with pytest.raises(KeyError):
            rt.remove_expert("g.9")


def test_remove_answers_queued_work_with_draining_then_unknown():
    backends = make_backends({"g.0": ("nop", H), "g.1": ("nop", H)})
    replies = Replies()
    removed: list = []
    with running(backends, zmq=False) as (rt, _):
        with rt.exclusive():  # nothing runs: the requests stay queued
            for i in range(3):
                rt.submit(fwd("g.0", 1, i), replies.callback(f"g0-{i}"))
            rt.submit(fwd("g.1", 1, 9), replies.callback("g1"))
            wait_for(lambda: rt.stats()["g.0"]["queue_depth"] == 3, what="3 queued tasks")
            # remove_expert waits for the running batch (our pause) in another thread
            t = threading.Thread(target=lambda: removed.append(rt.remove_expert("g.0")))
            t.start()
            wait_for(lambda: rt._pause_requests == 2, what="remove_expert to wait for the pause")
            assert replies.count() == 0
        t.join(10)
        assert not t.is_alive() and removed == [backends["g.0"]]
        replies.wait(4)
        for i in range(3):
            with pytest.raises(DrainingError, match="moved to another volunteer"):
                replies.decoded(f"g0-{i}")
        assert replies.decoded("g1").tensors[0].shape == (1, H)  # other experts are unaffected
        with pytest.raises(UnknownExpertError):
            decode_reply(submit_sync(rt, fwd("g.0", 1, 20)))
        assert set(rt.stats()) == {"g.1"}
        assert set(decode_info_reply(submit_sync(rt, encode_info_request(4)))) == {"g.1"}
        assert rt.stats()["g.1"]["queue_depth"] == 0
        # the queued-bytes accounting was released: the same uid can come back and serve
        rt.add_expert("g.0", removed[0])
        assert decode_reply(submit_sync(rt, fwd("g.0", 2, 21))).tensors[0].shape == (2, H)
        assert rt.stats()["g.0"]["requests"] == 1  # fresh statistics


def test_queued_bytes_are_released_by_remove():
    from volunteer.runtime.limits import ServingLimits

    backends = make_backends({"g.0": ("nop", H), "g.1": ("nop", H)})
    replies = Replies()
    limits = ServingLimits(max_queued_bytes=4 * H * 4)  # four rows in all
    with running(backends, limits, zmq=False) as (rt, _):
        with rt.exclusive():
            rt.submit(fwd("g.0", 4, 1), replies.callback("fills"))
            wait_for(lambda: rt.stats()["g.0"]["queue_depth"] == 1)
            t = threading.Thread(target=rt.remove_expert, args=("g.0",))
            t.start()
            wait_for(lambda: rt._pause_requests == 2)
        t.join(10)
        replies.wait(1)
        with rt.exclusive():  # still paused, so a wrong byte count would refuse this as overloaded
            rt.submit(fwd("g.1", 4, 2), replies.callback("fits"))
            wait_for(lambda: rt.stats()["g.1"]["queue_depth"] == 1)
        replies.wait(2)
        assert replies.decoded("fits").tensors[0].shape == (4, H)


def test_concurrent_submits_while_experts_come_and_go():
    pool = make_backends({f"g.{i}": ("nop", H) for i in range(4)})
    stable = make_backends({"s.0": ("nop", H)}, seed=3)
    replies = Replies()
    threads_n, per_thread, max_churn = 4, 150, 5000  # bounded work on every side
    errors: list[BaseException] = []
    with running(stable, zmq=False) as (rt, _):
        start = threading.Barrier(threads_n + 1)
        clients_done = threading.Event()
        churned = [0]

        def churn() -> None:
            try:
                start.wait(10)
                hosted: set[str] = set()
                for k in range(max_churn):
                    if clients_done.is_set() and not hosted:
                        break
                    churned[0] += 1
                    uid = f"g.{k % 4}"
                    if uid in hosted:
                        pool[uid] = rt.remove_expert(uid)
                        hosted.discard(uid)
                    else:
                        rt.add_expert(uid, pool[uid])
                        hosted.add(uid)
                    if k % 8 == 0:
                        rt.stats()
                        rt.info()
            except BaseException as e:
                errors.append(e)

        def client(n: int) -> None:
            try:
                start.wait(10)
                for i in range(per_thread):
                    uid = "s.0" if i % 5 == 0 else f"g.{(n + i) % 4}"
                    rt.submit(fwd(uid, 1, i), replies.callback(f"{n}-{i}-{uid}"))
            except BaseException as e:
                errors.append(e)

        churner = threading.Thread(target=churn)
        clients = [threading.Thread(target=client, args=(n,)) for n in range(threads_n)]
        for t in [churner, *clients]:
            t.start()
        for t in clients:
            t.join(30)
        clients_done.set()
        churner.join(30)
        assert churned[0] >= 8  # experts really moved while requests came in
        assert errors == []
        total = threads_n * per_thread
        replies.wait(total, timeout=30)
        tags = replies.order()
        assert len(tags) == total and len(set(tags)) == total  # every reply exactly once
        outcomes: dict[str, int] = {}
        for tag in tags:
            try:
                replies.decoded(tag)
                outcome = "ok"
            except (UnknownExpertError, DrainingError) as e:
                outcome = e.code
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if tag.endswith("s.0"):
                assert outcome == "ok", tag  # the expert that never moved always answers
        assert set(outcomes) <= {"ok", "unknown_expert", "draining"}
        # nothing is left queued and the accounting is back to zero
        assert rt._queued == 0 and rt._queued_bytes == 0
        assert all(s["queue_depth"] == 0 for s in rt.stats().values())
