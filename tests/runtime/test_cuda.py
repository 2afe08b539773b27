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
