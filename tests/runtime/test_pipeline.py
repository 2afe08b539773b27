"""The completer pipeline (``Runtime(pipeline=True)``, the default on CUDA machines): batches
are launched by the loop and answered by the completer thread. Exercised here on CPU experts
(the same code path minus the CUDA event), so CI covers it without a GPU."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.runtime.servers import Replies, make_backends, running, submit_sync, wait_for
from volunteer.client.remote_expert import RemoteExpert
from volunteer.experts.backend import ExpertBackend, OptimizerSpec
from volunteer.runtime.completer import Completer
from volunteer.wire.messages import decode_reply, encode_request

H = 16
pytestmark = pytest.mark.timeout(120)


def test_completer_runs_in_order_and_bounds_what_is_pending() -> None:
    done: list[int] = []
    gate = threading.Event()
    notified = []
    c = Completer(depth=2, on_done=lambda: notified.append(c.pending))
    c.submit(lambda: (gate.wait(10), done.append(0)))
    c.submit(lambda: done.append(1))
    third = threading.Thread(target=c.submit, args=(lambda: done.append(2),))
    third.start()
    third.join(0.2)
    assert third.is_alive() and c.pending == 2  # full: the third submit waits
    gate.set()
    third.join(10)
    assert c.wait_idle(10) and done == [0, 1, 2]
    # on_done runs once per finisher, after it stopped counting as pending
    assert len(notified) == 3 and max(notified) <= 1 and notified[-1] == 0
    c.stop()
    c.submit(lambda: done.append(3))  # stopped: runs inline, nothing dropped
    assert done == [0, 1, 2, 3]


def test_completer_survives_a_failing_finisher_and_stop_drains() -> None:
    c = Completer(depth=4)
    done: list[int] = []
    c.submit(lambda: 1 / 0)
    for i in range(3):
        c.submit(lambda i=i: done.append(i))
    c.stop()
    assert done == [0, 1, 2] and c.pending == 0


def _train(pipeline: bool, steps: int = 6) -> tuple[list[torch.Tensor], ExpertBackend]:
    backends = make_backends({"p.0": ("ffn", H)}, OptimizerSpec("adam", 1e-2))
    torch.manual_seed(1)
    xs = [torch.randn(8, H) for _ in range(steps)]
    outs = []
    with running(backends, pipeline=pipeline) as (rt, fe):
        assert (rt._completer is not None) == pipeline
        expert = RemoteExpert("p.0", fe.endpoint, timeout=30)
        for x in xs:
            leaf = x.clone().requires_grad_()
            y = expert(leaf)
            y.pow(2).sum().backward()
            outs += [y.detach(), leaf.grad]
        expert.close()
        assert rt.stats()["p.0"]["updates_applied"] == steps
    return outs, backends["p.0"]


def test_pipelined_runtime_answers_exactly_like_the_inline_one() -> None:
    a, ba = _train(pipeline=True)
    b, bb = _train(pipeline=False)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    for p, q in zip(ba.module.parameters(), bb.module.parameters(), strict=True):
        assert torch.equal(p, q)


def _burst(pipeline: bool) -> tuple[list[torch.Tensor], int]:
    """Forward+backward of 12 requests on 3 experts queued at once (the loop paused), so
    every batch but the last finds work waiting: with a pipeline they go to the completer."""
    backends = make_backends({f"p.{i}": ("ffn", H) for i in range(3)}, OptimizerSpec("adam", 1e-2))
    torch.manual_seed(2)
    xs = [torch.randn(4, H) for _ in range(12)]
    outs = []
    with running(backends, zmq=False, pipeline=pipeline) as (rt, _):
        for op in ("forward", "backward"):
            replies = Replies()
            with rt.exclusive():
                for i, x in enumerate(xs):
                    tensors = [x] if op == "forward" else [x, torch.ones(4, H)]
                    frames = encode_request(op, f"p.{i % 3}", tensors, request_id=i + 1)
                    rt.submit(frames, replies.callback(str(i)))
            replies.wait(len(xs))
            outs += [replies.decoded(str(i)).tensors[0] for i in range(len(xs))]
        used = rt._completer is not None and rt._completer.finished
    return outs, used


def test_pipelined_batches_with_work_waiting_go_through_the_completer() -> None:
    a, used = _burst(pipeline=True)
    b, _ = _burst(pipeline=False)
    assert used  # the completer answered batches (not all inline)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_drain_and_exclusive_wait_for_batches_still_in_the_completer() -> None:
    backends = make_backends({"p.0": ("ffn", H)})
    with running(backends, zmq=False, pipeline=True) as (rt, _):
        gate = threading.Event()
        rt._completer.submit(lambda: gate.wait(10))  # a batch "still on the device"
        entered = threading.Event()

        def exclusive() -> None:
            with rt.exclusive():
                entered.set()

        t = threading.Thread(target=exclusive)
        t.start()
        assert not entered.wait(0.2)  # exclusive() waits for the pending batch
        report: list = []
        d = threading.Thread(target=lambda: report.append(rt.drain(10)))
        d.start()
        wait_for(lambda: rt.state == "draining", what="draining")
        assert not report
        gate.set()
        t.join(10)
        d.join(10)
        assert entered.is_set() and report and report[0].clean


def test_failed_batch_is_answered_with_an_internal_error(monkeypatch) -> None:
    backends = make_backends({"p.0": ("ffn", H)})
    with running(backends, zmq=False, pipeline=True) as (rt, _):
        def boom(*a, **k):
            raise RuntimeError("device fault")

        monkeypatch.setattr(backends["p.0"], "forward", boom)
        frames = submit_sync(rt, encode_request("forward", "p.0", [torch.randn(2, H)], request_id=5))
        with pytest.raises(Exception, match="device fault"):
            decode_reply(frames)
        assert rt.stats()["p.0"]["errors"] == {"internal": 1}


def test_device_step_skips_non_finite_gradients_without_a_host_check() -> None:
    """The found_inf path (CUDA's sync-free step) run on a CPU fused Adam: a non-finite
    batch leaves the weights alone and is counted; a finite one steps."""
    b = ExpertBackend("s.0", "ffn", H, OptimizerSpec("adam", 1e-2))
    if not getattr(b.optimizer, "_step_supports_amp_scaling", False):
        pytest.skip("this torch has no fused Adam with found_inf")
    b.on_cpu = False  # take the device path on the CPU
    before = [p.detach().clone() for p in b.module.parameters()]
    grads = [torch.full_like(p, float("nan")) for p in b._params]
    b.apply_gradients([grads])
    assert b.steps_skipped == 1 and b.updates_applied == 0
    for p, q in zip(before, b.module.parameters(), strict=True):
        assert torch.equal(p, q)
    b.apply_gradients([[torch.ones_like(p) for p in b._params]])
    assert b.steps_skipped == 1 and b.updates_applied == 1
    assert not torch.equal(before[0], next(b.module.parameters()))
    b.updates_applied = 7  # a checkpoint restore still sets the count
    assert b.updates_applied == 7


def test_cpu_nodes_keep_the_default_frame_buffers() -> None:
    from volunteer.runtime.pinned import frame_alloc_for

    assert frame_alloc_for("cpu") is None
