"""CUDA execution path (pinned buffers, non-blocking copies): results equal the CPU path.
Skipped where no GPU is present (CI)."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.servers import running
from volunteer.client.remote_expert import RemoteExpert
from volunteer.experts.backend import ExpertBackend, OptimizerSpec

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.timeout(120),
]
H = 32


def test_cuda_runtime_matches_cpu_forward_backward_and_cache():
    torch.manual_seed(0)
    cpu = ExpertBackend("c.0", "ffn", H, OptimizerSpec("sgd", lr=0.0))
    gpu = ExpertBackend("c.0", "ffn", H, OptimizerSpec("sgd", lr=0.0), device="cuda")
    gpu.module.load_state_dict(cpu.module.state_dict())
    x = torch.randn(8, H)
    with running({"c.0": gpu}) as (rt, fe):
        expert = RemoteExpert("c.0", fe.endpoint, timeout=60)
        xr = x.clone().requires_grad_()
        y = expert(xr)
        y.sum().backward()
        assert rt.stats()["c.0"]["activation_cache"] == {"hits": 1}
        expert.transport.close()
    leaf = x.clone().requires_grad_()
    y_ref = cpu.module(leaf)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xr.grad, leaf.grad, rtol=1e-4, atol=1e-4)


def test_cuda_pipeline_serves_concurrent_trainers_from_pinned_frames():
    """The GPU node's defaults: completer pipeline on, frames received into pinned memory
    (uploaded without a host copy); four trainers at once, every answer equal to the CPU
    expert's and every step applied."""
    import threading

    from volunteer.runtime.pinned import frame_alloc_for, pinned_alloc

    assert frame_alloc_for("cuda:0") is pinned_alloc and frame_alloc_for("cpu") is None
    buf = pinned_alloc(1 << 20)
    assert torch.from_numpy(buf).is_pinned() and buf.nbytes == 1 << 20
    torch.manual_seed(0)
    cpu = ExpertBackend("c.0", "ffn", 256, OptimizerSpec("sgd", lr=0.0))
    gpu = ExpertBackend("c.0", "ffn", 256, OptimizerSpec("sgd", lr=0.0), device="cuda")
    gpu.module.load_state_dict(cpu.module.state_dict())
    xs = [torch.randn(128, 256) for _ in range(4)]
    results: dict[int, tuple] = {}
    with running({"c.0": gpu}) as (rt, fe):
        assert rt._completer is not None  # on by default where CUDA exists
        fe.stop()
        from volunteer.runtime.zmq_frontend import ZmqFrontend

        fe = ZmqFrontend(rt, alloc=frame_alloc_for("cuda:0"))
        fe.start()

        def trainer(i: int) -> None:
            expert = RemoteExpert("c.0", fe.endpoint, timeout=60)
            for _ in range(5):
                leaf = xs[i].clone().requires_grad_()
                y = expert(leaf)
                y.sum().backward()
            results[i] = (y.detach(), leaf.grad)
            expert.close()

        threads = [threading.Thread(target=trainer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        fe.stop()
        st = rt.stats()["c.0"]
        # concurrent backwards may share a batch (one step for several requests)
        assert st["ops"]["backward"] == 20 and 1 <= st["updates_applied"] <= 20, st
    for i, (y, g) in results.items():
        leaf = xs[i].clone().requires_grad_()
        ref = cpu.module(leaf)
        ref.sum().backward()
        torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(g, leaf.grad, rtol=1e-3, atol=1e-3)
    assert len(results) == 4


def test_cuda_step_skips_non_finite_gradients_on_the_device():
    b = ExpertBackend("s.0", "ffn", H, OptimizerSpec("adam", 1e-2), device="cuda")
    before = [p.detach().clone() for p in b.module.parameters()]
    b.apply_gradients([[torch.full_like(p, float("nan")) for p in b._params]])
    assert b._skips_dev is not None  # took the sync-free path
    assert b.steps_skipped == 1 and b.updates_applied == 0
    for p, q in zip(before, b.module.parameters(), strict=True):
        assert torch.equal(p, q)
    b.apply_gradients([[torch.ones_like(p) for p in b._params]])
    assert b.steps_skipped == 1 and b.updates_applied == 1


@pytest.mark.parametrize("compression", ["fp16", "bf16", "int8"])
def test_cuda_node_serves_compressed_wires_in_the_clients_dtype(compression):
    """A GPU node uploads 16-bit requests as they came, casts on the device and sends 16-bit
    replies cast on the device; the trainer gets float32 close to the CPU expert's answer."""
    torch.manual_seed(0)
    cpu = ExpertBackend("c.0", "ffn", H, OptimizerSpec("sgd", lr=0.0))
    gpu = ExpertBackend("c.0", "ffn", H, OptimizerSpec("sgd", lr=0.0), device="cuda")
    gpu.module.load_state_dict(cpu.module.state_dict())
    x = torch.randn(8, H)
    with running({"c.0": gpu}) as (rt, fe):
        assert not rt._restore_on_host
        expert = RemoteExpert("c.0", fe.endpoint, timeout=60, compression=compression)
        xr = x.clone().requires_grad_()
        y = expert(xr)
        y.sum().backward()
        expert.close()
        st = rt.stats()["c.0"]
    leaf = x.clone().requires_grad_()
    ref = cpu.module(leaf)
    ref.sum().backward()
    assert y.dtype == torch.float32 and xr.grad.dtype == torch.float32
    tol = 3e-2 if compression != "fp16" else 5e-3
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(xr.grad, leaf.grad, rtol=tol, atol=tol)
    assert st["bytes_out"] < 8 * H * 4 * 2  # both replies travelled in fewer than 32 bits
