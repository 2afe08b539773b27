"""InFlight against a real runtime on loopback: pipelined training steps equal sequential
local autograd, calls really overlap on the wire, the number outstanding is bounded
(submitting blocks), typed errors come back through the futures, and closing refuses work."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.runtime.servers import make_backends, running, wait_for
from volunteer.client.inflight import InFlight
from volunteer.client.remote_expert import RemoteExpert
from volunteer.experts.backend import OptimizerSpec
from volunteer.wire.errors import UnknownExpertError

H = 16
pytestmark = pytest.mark.timeout(60)


def _local(seed: int) -> torch.nn.Module:
    return make_backends({"r.0": ("ffn", H)}, OptimizerSpec("sgd", lr=0.0), seed=seed)["r.0"].module


def test_pipelined_steps_equal_sequential_local_autograd():
    backends = make_backends({"r.0": ("ffn", H)}, OptimizerSpec("sgd", lr=0.0), seed=3)
    local = _local(3)
    torch.manual_seed(0)
    batches = [torch.randn(4, H) for _ in range(10)]
    targets = [torch.randn(4, H) for _ in range(10)]
    with running(backends) as (rt, fe):
        expert = RemoteExpert("r.0", fe.endpoint, timeout=20)
        leaves = [x.clone().requires_grad_() for x in batches]

        def make_loss(i: int):  # loss_fn runs on a pool thread: each step gets its own
            return lambda out: ((out - targets[i]) ** 2).mean()

        with InFlight(expert, max_in_flight=4) as pipe:
            futures = [pipe.step(leaves[i], loss_fn=make_loss(i)) for i in range(10)]
            losses = [f.result(timeout=30) for f in futures]
        for i, x in enumerate(batches):
            ref = x.clone().requires_grad_()
            ref_loss = ((local(ref) - targets[i]) ** 2).mean()
            ref_loss.backward()
            torch.testing.assert_close(losses[i], ref_loss.detach(), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(leaves[i].grad, ref.grad, rtol=1e-4, atol=1e-6)
        assert rt.stats()["r.0"]["ops"] == {"forward": 10, "backward": 10}
        assert backends["r.0"].updates_applied >= 1  # backward batches may be merged
        expert.close()


def test_steps_yields_losses_in_order_and_forward_futures_keep_the_graph():
    backends = make_backends({"r.0": ("ffn", H)}, OptimizerSpec("sgd", lr=0.0), seed=5)
    local = _local(5)
    with running(backends) as (rt, fe):
        expert = RemoteExpert("r.0", fe.endpoint, timeout=20)
        xs = [torch.randn(3, H) for _ in range(6)]
        with InFlight(expert, max_in_flight=3) as pipe:
            losses = list(pipe.steps(([x] for x in xs), loss_fn=lambda out: out.sum()))
            assert [float(v) for v in losses] == pytest.approx(
                [float(local(x).sum().detach()) for x in xs], rel=1e-4, abs=1e-4
            )
            # forward futures, then the backward of each on the pool
            leaves = [x.clone().requires_grad_() for x in xs]
            outs = [f.result(timeout=30) for f in [pipe.forward(x) for x in leaves]]
            assert all(o.requires_grad for o in outs)
            grads = [torch.randn_like(o) for o in outs]
            for f in [pipe.backward(o, g) for o, g in zip(outs, grads, strict=True)]:
                assert f.result(timeout=30) is None
            for x, leaf, g in zip(xs, leaves, grads, strict=True):
                ref = x.clone().requires_grad_()
                local(ref).backward(g)
                torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-4, atol=1e-5)
            with torch.no_grad():  # the caller's grad mode travels to the pool thread
                assert not pipe.forward(xs[0]).result(timeout=30).requires_grad
        assert rt.stats()["r.0"]["ops"] == {"forward": 13, "backward": 12}
        expert.close()


def test_calls_overlap_and_submitting_blocks_at_max_in_flight():
    backends = make_backends({"r.0": ("nop", H)})
    with running(backends) as (rt, fe):
        expert = RemoteExpert("r.0", fe.endpoint, timeout=30)
        pipe = InFlight(expert, max_in_flight=2)
        third_submitted = threading.Event()
        futures = []
        try:
            with rt.exclusive(), torch.no_grad():  # the server computes nothing meanwhile
                futures += [pipe.forward(torch.randn(1, H)) for _ in range(2)]
                # both requests are on the server at once: really in flight together
                wait_for(lambda: rt.stats()["r.0"]["queue_depth"] == 2, what="2 queued calls")
                assert pipe.in_flight == 2

                def third() -> None:
                    with torch.no_grad():
                        futures.append(pipe.forward(torch.randn(1, H)))
                    third_submitted.set()

                submitter = threading.Thread(target=third)
                submitter.start()
                # bounded: the third submit waits for a slot while both calls are stuck
                assert not third_submitted.wait(0.3)
                assert pipe.in_flight == 2
            submitter.join(30)
            assert third_submitted.is_set()
            assert [f.result(timeout=30).shape for f in futures] == [(1, H)] * 3
            wait_for(lambda: pipe.in_flight == 0, what="the calls to finish")
        finally:
            pipe.close()
            expert.close()


def test_typed_errors_come_back_through_the_futures_and_close_refuses_work():
    backends = make_backends({"r.0": ("nop", H)})
    with running(backends) as (_, fe):
        missing = RemoteExpert("r.404", fe.endpoint, timeout=10)
        pipe = InFlight(missing, max_in_flight=2)
        with torch.no_grad():
            errors = [pipe.forward(torch.randn(1, H)).exception(timeout=30) for _ in range(3)]
        assert all(isinstance(e, UnknownExpertError) for e in errors)
        assert pipe.in_flight == 0  # failed calls give their slots back
        pipe.close()
        local_pipe = InFlight(torch.nn.Linear(H, H))
        with local_pipe, pytest.raises(ValueError, match="scalar"):
            local_pipe.step(torch.randn(2, H), loss_fn=lambda out: out).result(timeout=30)
        with pytest.raises(RuntimeError, match="closed"):
            pipe.forward(torch.randn(1, H))
        with pytest.raises(ValueError):
            InFlight(missing, max_in_flight=0)
        missing.close()
