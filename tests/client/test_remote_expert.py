"""RemoteExpert against a real runtime on loopback: forward and backward equal local
autograd, the server's optimizer steps are applied and counted, compression, per-call
timeouts, unreachable peers and typed server errors."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from tests.runtime.servers import make_backends, running, wait_for
from volunteer.client.remote_expert import RemoteExpert
from volunteer.client.zmq_transport import ZmqTransport
from volunteer.experts.backend import OptimizerSpec
from volunteer.runtime.limits import ServingLimits
from volunteer.wire.errors import (
    BadRequestError,
    RemoteTimeoutError,
    UnknownExpertError,
    UnreachableError,
)

H = 16
pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("kind", ["ffn", "transformer"])
def test_forward_and_backward_equal_local_autograd(kind):
    specs = {"r.0": (kind, H)}
    backends = make_backends(specs, OptimizerSpec("sgd", lr=0.0), seed=11)
    local = make_backends(specs, OptimizerSpec("sgd", lr=0.0), seed=11)["r.0"].module
    shape = backends["r.0"].input_shapes[0]
    with running(backends) as (rt, fe):
        expert = RemoteExpert("r.0", fe.endpoint, timeout=20)
        x = torch.randn(4, *shape, requires_grad=True)
        w = torch.randn(4, *shape)
        (expert(x) * w).sum().backward()
        x_local = x.detach().clone().requires_grad_()
        (local(x_local) * w).sum().backward()
        torch.testing.assert_close(x.grad, x_local.grad, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(expert(x), local(x), rtol=1e-5, atol=1e-5)
        assert rt.stats()["r.0"]["activation_cache"] == {"hits": 1}
        expert.transport.close()


def test_training_through_remote_expert_applies_and_counts_updates():
    backends = make_backends({"r.0": ("ffn", H)}, OptimizerSpec("adam", lr=1e-2), seed=2)
    torch.manual_seed(0)
    x = torch.randn(32, H)
    target = torch.randn(32, H)
    with running(backends) as (rt, fe):
        expert = RemoteExpert("r.0", fe.endpoint)
        losses = []
        for _ in range(15):
            loss = ((expert(x) - target) ** 2).mean()
            loss.backward()
            losses.append(loss.item())
        assert backends["r.0"].updates_applied == 15
        assert rt.stats()["r.0"]["updates_applied"] == 15
        assert losses[-1] < losses[0] * 0.9
        expert.transport.close()


def test_backward_reaches_the_server_even_without_input_grad():
    backends = make_backends({"r.0": ("ffn", H)}, OptimizerSpec("sgd", lr=0.1))
    with running(backends) as (_, fe):
        expert = RemoteExpert("r.0", fe.endpoint)
        expert(torch.randn(2, H)).sum().backward()
        assert backends["r.0"].updates_applied == 1
        assert expert._dummy.grad is None or expert._dummy.grad.numel() == 0
        expert.transport.close()


def test_fp16_compression_is_close_to_exact():
    backends = make_backends({"r.0": ("ffn", H)}, OptimizerSpec("sgd", lr=0.0))
    with running(backends) as (_, fe):
        exact = RemoteExpert("r.0", fe.endpoint)
        small = RemoteExpert("r.0", fe.endpoint, compression="fp16")
        x1 = torch.randn(8, H, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_()
        y1, y2 = exact(x1), small(x2)
        assert y2.dtype == torch.float32
        torch.testing.assert_close(y1, y2, rtol=1e-2, atol=1e-2)
        y1.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=2e-2, atol=2e-2)
        exact.close()
        small.close()


def test_server_errors_are_raised_typed_with_the_server_message():
    backends = make_backends({"r.0": ("ffn", H)})
    with running(backends) as (_, fe):
        transport = ZmqTransport(fe.endpoint)
        with pytest.raises(UnknownExpertError, match=r"r\.404"):
            RemoteExpert("r.404", transport)(torch.randn(2, H))
        with pytest.raises(BadRequestError, match=r"shape \[batch, 16\]"):
            RemoteExpert("r.0", transport)(torch.randn(2, H + 3))
        assert RemoteExpert("r.0", transport)(torch.randn(2, H)).shape == (2, H)
        transport.close()


def test_per_call_timeout_then_the_transport_recovers():
    backends = make_backends({"r.0": ("nop", H)})
    with running(backends, ServingLimits()) as (rt, fe):
        expert = RemoteExpert("r.0", fe.endpoint, timeout=0.3)
        with rt.exclusive(), pytest.raises(RemoteTimeoutError):
            expert(torch.randn(1, H))
        wait_for(lambda: rt.stats()["r.0"]["queue_depth"] == 0, what="the stale request to drain")
        with torch.no_grad():
            assert expert(torch.randn(1, H)).shape == (1, H)
        expert.transport.close()


@pytest.mark.timeout(30)
def test_a_pooled_socket_honours_a_shorter_timeout_on_its_next_call():
    backends = make_backends({"r.0": ("nop", H)})
    with running(backends, ServingLimits()) as (rt, fe):
        transport = ZmqTransport(fe.endpoint)
        patient = RemoteExpert("r.0", transport, timeout=600)  # beyond this test's own limit
        hasty = RemoteExpert("r.0", transport, timeout=0.3)
        with torch.no_grad():
            assert patient(torch.randn(1, H)).shape == (1, H)  # leaves its socket pooled
            assert len(transport._idle) == 1
            with rt.exclusive(), pytest.raises(RemoteTimeoutError):
                hasty(torch.randn(1, H))  # same socket: must not wait with the old timeout
            wait_for(lambda: rt.stats()["r.0"]["queue_depth"] == 0, what="the stale request")
            assert patient(torch.randn(1, H)).shape == (1, H)
        transport.close()


def test_unreachable_peer():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    transport = ZmqTransport(f"tcp://127.0.0.1:{port}", connect_timeout=0.3)
    with pytest.raises(UnreachableError, match="cannot connect"):
        RemoteExpert("r.0", transport, timeout=5)(torch.randn(1, H))
    transport.close()


def test_many_threads_share_one_remote_expert_and_its_sockets():
    backends = make_backends({"r.0": ("ffn", H)}, OptimizerSpec("sgd", lr=0.0))
    with running(backends) as (rt, fe):
        expert = RemoteExpert("r.0", fe.endpoint)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(5):
                    x = torch.randn(2, H, requires_grad=True)
                    expert(x).sum().backward()
                    assert x.grad is not None and x.grad.shape == (2, H)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert backends["r.0"].updates_applied >= 1
        assert rt.stats()["r.0"]["ops"] == {"forward": 80, "backward": 80}
        assert len(expert.transport._idle) <= 16
        expert.transport.close()


def test_backward_omits_inputs_when_cached_and_falls_back_on_a_cache_miss():
    backends = make_backends({"r.0": ("ffn", H)}, OptimizerSpec("sgd", lr=0.0), seed=8)
    local = make_backends({"r.0": ("ffn", H)}, OptimizerSpec("sgd", lr=0.0), seed=8)["r.0"].module
    with running(backends, ServingLimits(activation_cache_size=1)) as (rt, fe):
        expert = RemoteExpert("r.0", fe.endpoint)
        xa = torch.randn(3, H, requires_grad=True)
        xb = torch.randn(3, H, requires_grad=True)
        ya, yb = expert(xa), expert(xb)  # b's graph evicts a's (cache of one graph)
        yb.sum().backward()  # hit, inputs omitted
        ya.sum().backward()  # cache miss -> resent with inputs, recomputed
        stats = rt.stats()["r.0"]
        assert stats["errors"] == {"cache_miss": 1}
        assert stats["activation_cache"] == {"hits": 1, "misses": 2}  # the lost try + the resend
        for x in (xa, xb):
            leaf = x.detach().clone().requires_grad_()
            local(leaf).sum().backward()
            torch.testing.assert_close(x.grad, leaf.grad, rtol=1e-4, atol=1e-5)
        expert.transport.close()
