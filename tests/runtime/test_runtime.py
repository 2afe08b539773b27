"""Runtime through its in-process entry point: batching, fairness, deadlines, overload,
drain, exclusive(), stats, info and internal errors."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from tests.runtime.servers import Replies, make_backends, running, submit_sync, wait_for
from volunteer.runtime.limits import ServingLimits
from volunteer.wire.errors import (
    DeadlineExpiredError,
    DrainingError,
    InternalError,
    OverloadedError,
    UnknownExpertError,
)
from volunteer.wire.messages import decode_reply, encode_request
from volunteer.wire.ops import decode_info_reply, encode_info_request

H = 16
pytestmark = pytest.mark.timeout(60)


def fwd(uid: str, rows: int, rid: int, ttl: float | None = None) -> list:
    return encode_request("forward", uid, [torch.randn(rows, H)], request_id=rid, timeout=ttl)


def test_forward_matches_local_and_requests_merge_into_one_batch():
    backends = make_backends({"e.0": ("ffn", H)})
    replies = Replies()
    xs = [torch.randn(3, H) for _ in range(4)]
    with running(backends, zmq=False) as (rt, _):
        with rt.exclusive():
            for i, x in enumerate(xs):
                rt.submit(
                    encode_request("forward", "e.0", [x], request_id=i), replies.callback(str(i))
                )
            wait_for(lambda: rt.stats()["e.0"]["queue_depth"] == 4)
        replies.wait(4)
        stats = rt.stats()["e.0"]
    assert stats["requests"] == 4 and stats["samples"] == 12
    assert stats["batch_size_histogram"] == {"<=16": 1}
    assert stats["mean_batch_size"] == 12
    with torch.no_grad():
        for i, x in enumerate(xs):
            out = replies.decoded(str(i)).tensors[0]
            torch.testing.assert_close(out, backends["e.0"].module(x), rtol=1e-5, atol=1e-5)


def test_oldest_task_first_across_pools():
    backends = make_backends({"a": ("nop", H), "b": ("nop", H)})
    replies = Replies()
    with running(backends, ServingLimits(max_batch_size=4), zmq=False) as (rt, _):
        with rt.exclusive():
            for i in range(12):
                rt.submit(fwd("b", 1, i), replies.callback(f"b-early-{i}"))
            rt.submit(fwd("a", 1, 100), replies.callback("a"))
            for i in range(40):
                rt.submit(fwd("b", 1, 200 + i), replies.callback(f"b-late-{i}"))
        replies.wait(53)
    order = replies.order()
    # the lone task in pool "a" is served before any flood task that arrived after it
    assert order.index("a") < min(order.index(f"b-late-{i}") for i in range(40))
    assert all(order.index(f"b-early-{i}") < order.index("a") for i in range(12))


def test_expired_deadline_is_dropped_before_compute():
    backends = make_backends({"e.0": ("nop", H)})
    replies = Replies()
    with running(backends, zmq=False) as (rt, _):
        with rt.exclusive():
            submitted = time.monotonic()
            rt.submit(fwd("e.0", 2, 1, ttl=0.01), replies.callback("short"))
            rt.submit(fwd("e.0", 2, 2, ttl=30), replies.callback("long"))
            rt.submit(fwd("e.0", 2, 3, ttl=-1), replies.callback("dead"))
            replies.wait(1)  # "dead" is refused at once, even while paused
            # hold the pause until "short" has certainly expired in the queue
            wait_for(lambda: time.monotonic() > submitted + 0.05, what="the short deadline to pass")
        replies.wait(3)
        stats = rt.stats()["e.0"]
    for tag in ("short", "dead"):
        with pytest.raises(DeadlineExpiredError):
            replies.decoded(tag)
    assert replies.decoded("long").tensors[0].shape == (2, H)
    assert stats["errors"] == {"deadline_expired": 2}
    assert stats["samples"] == 2  # only the live task was computed


def test_overloaded_beyond_queue_bound_then_recovers():
    backends = make_backends({"e.0": ("nop", H)})
    replies = Replies()
    with running(backends, ServingLimits(max_queue_size=3), zmq=False) as (rt, _):
        with rt.exclusive():
            for i in range(5):
                rt.submit(fwd("e.0", 1, i), replies.callback(str(i)))
            replies.wait(2)
            assert rt.stats()["e.0"]["queue_depth"] == 3
        replies.wait(5)
        for i in (3, 4):
            with pytest.raises(OverloadedError, match="queue"):
                replies.decoded(str(i))
        for i in (0, 1, 2):
            replies.decoded(str(i))
        rt.submit(fwd("e.0", 1, 9), replies.callback("after"))
        replies.wait(6)
        assert replies.decoded("after").tensors[0].shape == (1, H)


def test_drain_answers_in_flight_and_refuses_new_work():
    backends = make_backends({"e.0": ("ffn", H)})
    replies = Replies()
    with running(backends, zmq=False) as (rt, _):
        with rt.exclusive():
            for i in range(3):
                rt.submit(fwd("e.0", 2, i), replies.callback(f"queued-{i}"))
            report: list = []
            t = threading.Thread(target=lambda: report.append(rt.drain(30)))
            t.start()
            wait_for(lambda: rt.state == "draining")
            rt.submit(fwd("e.0", 2, 10), replies.callback("late"))
            replies.wait(1)
        t.join(30)
        assert report[0].completed == 3 and report[0].cut_short == 0 and report[0].clean
        with pytest.raises(DrainingError):
            replies.decoded("late")
        for i in range(3):
            assert replies.decoded(f"queued-{i}").tensors[0].shape == (2, H)
        info = decode_info_reply(submit_sync(rt, encode_info_request(5)))
        assert info["e.0"]["state"] == "draining"


def test_drain_timeout_cuts_short_queued_work():
    backends = make_backends({"e.0": ("nop", H)})
    replies = Replies()
    with running(backends, zmq=False) as (rt, _):
        with rt.exclusive():
            for i in range(2):
                rt.submit(fwd("e.0", 1, i), replies.callback(str(i)))
            report = rt.drain(0.05)
        assert report.cut_short == 2 and not report.clean
        replies.wait(2)
        for i in range(2):
            with pytest.raises(DrainingError):
                replies.decoded(str(i))


def test_exclusive_pauses_execution():
    backends = make_backends({"e.0": ("nop", H)})
    replies = Replies()
    with running(backends, zmq=False) as (rt, _), rt.exclusive():
        rt.submit(fwd("e.0", 1, 1), replies.callback("x"))
        wait_for(lambda: rt.stats()["e.0"]["queue_depth"] == 1)
        # nothing can run while we hold exclusive(); the queued task stays queued
        assert replies.count() == 0
        assert rt.stats()["e.0"]["requests"] == 0
    replies.wait(1)



def test_info_unknown_expert_and_stats_shape():
    backends = make_backends({"demo.ffn.0.1": ("ffn", H), "demo.nop.0": ("nop", H)})
    with running(backends, zmq=False) as (rt, _):
        info = decode_info_reply(submit_sync(rt, encode_info_request(3)))
        assert info == {
            "demo.ffn.0.1": {
                "kind": "ffn",
                "input_shapes": [[H]],
                "dtype": "float32",
                "state": "serving",
            },
            "demo.nop.0": {
                "kind": "nop",
                "input_shapes": [[H]],
                "dtype": "float32",
                "state": "serving",
            },
        }
        with pytest.raises(UnknownExpertError, match="nope"):
            decode_reply(submit_sync(rt, fwd("nope", 1, 1)))
        decode_reply(submit_sync(rt, fwd("demo.nop.0", 2, 2)))
        stats = rt.stats()
    s = stats["demo.nop.0"]
    assert set(s) >= {
        "requests",
        "samples",
        "requests_per_s",
        "samples_per_s",
        "mean_batch_size",
        "batch_size_histogram",
        "queue_depth",
        "latency_ms",
        "errors",
        "updates_applied",
    }
    assert set(s["latency_ms"]) == {"queue_p50", "queue_p99", "compute_p50", "compute_p99"}
    assert s["requests"] == 1 and s["samples"] == 2 and s["samples_per_s"] > 0
    json.dumps(stats)


def test_internal_error_is_reported_and_server_keeps_serving(monkeypatch):
    backends = make_backends({"e.0": ("ffn", H)})
    calls = {"n": 0}
    real = backends["e.0"].forward

    def flaky(inputs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom in expert")
        return real(inputs)

    monkeypatch.setattr(backends["e.0"], "forward", flaky)
    with running(backends, zmq=False) as (rt, _):
        with pytest.raises(InternalError, match="boom in expert"):
            decode_reply(submit_sync(rt, fwd("e.0", 2, 1)))
        assert decode_reply(submit_sync(rt, fwd("e.0", 2, 2))).tensors[0].shape == (2, H)
        assert rt.stats()["e.0"]["errors"] == {"internal": 1}


def test_stop_answers_queued_tasks_and_late_submits():
    backends = make_backends({"e.0": ("nop", H)})
    replies = Replies()
    with running(backends, zmq=False) as (rt, _), rt.exclusive():
        rt.submit(fwd("e.0", 1, 1), replies.callback("queued"))
        wait_for(lambda: rt.stats()["e.0"]["queue_depth"] == 1)
        threading.Thread(target=rt.stop).start()
        wait_for(lambda: rt.state == "stopped")
    replies.wait(1)
    with pytest.raises(DrainingError):
        replies.decoded("queued")
    rt.submit(fwd("e.0", 1, 2), replies.callback("late"))
    replies.wait(2)
    with pytest.raises(DrainingError):
        replies.decoded("late")


def test_overloaded_beyond_queued_bytes_bound():
    backends = make_backends({"e.0": ("nop", H)})
    replies = Replies()
    row_bytes = H * 4
    with running(backends, ServingLimits(max_queued_bytes=5 * row_bytes), zmq=False) as (rt, _):
        with rt.exclusive():
            rt.submit(fwd("e.0", 4, 1), replies.callback("fits"))
            rt.submit(fwd("e.0", 2, 2), replies.callback("too much"))
            rt.submit(fwd("e.0", 1, 3), replies.callback("fits too"))
            replies.wait(1)
        replies.wait(3)
        with pytest.raises(OverloadedError, match="bytes"):
            replies.decoded("too much")
        assert replies.decoded("fits").tensors[0].shape == (4, H)
        assert replies.decoded("fits too").tensors[0].shape == (1, H)
        rt.submit(
            fwd("e.0", 5, 4), replies.callback("after")
        )  # the bound is released after compute
        replies.wait(4)
        assert replies.decoded("after").tensors[0].shape == (5, H)
