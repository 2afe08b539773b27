"""ExpertBackend: gradients equal plain autograd, optimizer steps applied and counted,
clipping, state dicts round-trip."""

from __future__ import annotations

import pytest
import torch

from volunteer.experts.backend import ExpertBackend, OptimizerSpec


def reference_step(backend: ExpertBackend, x: torch.Tensor, g: torch.Tensor):
    leaf = x.clone().requires_grad_()
    backend.module.zero_grad()
    backend.module(leaf).backward(g)
    return leaf.grad, {n: p.grad.clone() for n, p in backend.module.named_parameters()}


@pytest.mark.parametrize("kind", ["ffn", "transformer", "nop"])
def test_gradients_match_plain_autograd(kind):
    torch.manual_seed(0)
    b = (
        ExpertBackend("u", kind, 16, OptimizerSpec("sgd", lr=0.0), seq_len=3)
        if kind == "transformer"
        else ExpertBackend("u", kind, 16, OptimizerSpec("sgd", lr=0.0))
    )
    x = torch.randn(4, *b.input_shapes[0])
    g = torch.randn(4, *b.output_shape)
    in_grads, p_grads = b.gradients(b.forward_graph([x]), g)
    ref_in, ref_p = reference_step(b, x, g)
    torch.testing.assert_close(in_grads[0], ref_in, rtol=1e-4, atol=1e-5)
    for (name, _), pg in zip(b.module.named_parameters(), p_grads, strict=True):
        torch.testing.assert_close(pg, ref_p[name], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(b.forward([x]), b.module(x))


def test_sgd_step_is_applied_and_counted():
    torch.manual_seed(0)
    b = ExpertBackend("u", "ffn", 8, OptimizerSpec("sgd", lr=0.5))
    before = {n: p.detach().clone() for n, p in b.module.named_parameters()}
    x, g = torch.randn(3, 8), torch.randn(3, 8)
    _, p_grads = b.gradients(b.forward_graph([x]), g)
    b.apply_gradients([p_grads])
    assert b.updates_applied == 1
    for (name, p), pg in zip(b.module.named_parameters(), p_grads, strict=True):
        torch.testing.assert_close(p.detach(), before[name] - 0.5 * pg)


def test_clip_grad_norm_bounds_the_step():
    torch.manual_seed(0)
    b = ExpertBackend("u", "ffn", 8, OptimizerSpec("sgd", lr=1.0, clip_grad_norm=1e-3))
    before = torch.cat([p.detach().flatten().clone() for p in b.module.parameters()])
    _, p_grads = b.gradients(b.forward_graph([torch.randn(3, 8)]), 100 * torch.randn(3, 8))
    b.apply_gradients([p_grads])
    after = torch.cat([p.detach().flatten() for p in b.module.parameters()])
    assert (after - before).norm() <= 1e-3 * 1.01


def test_adam_state_dict_round_trip_and_optimizer_validation():
    torch.manual_seed(0)
    a = ExpertBackend("u", "ffn", 8, OptimizerSpec("adam", lr=1e-2))
    for _ in range(2):
        _, pg = a.gradients(a.forward_graph([torch.randn(2, 8)]), torch.randn(2, 8))
        a.apply_gradients([pg])
    state = a.state_dict()
    b = ExpertBackend("u", "ffn", 8, OptimizerSpec("adam", lr=1e-2))
    b.load_state_dict(state)
    assert b.updates_applied == 2
    x = torch.randn(2, 8)
    torch.testing.assert_close(a.forward([x]), b.forward([x]))
    assert b.optimizer.state_dict()["state"].keys() == a.optimizer.state_dict()["state"].keys()
    with pytest.raises(ValueError, match="adam, sgd"):
        OptimizerSpec("lion")
    nop = ExpertBackend("n", "nop", 4)
    nop.apply_gradients([[]])
    assert nop.updates_applied == 1 and nop.state_dict()["optimizer"] is None


def test_info_entry():
    b = ExpertBackend("u", "transformer", 32, seq_len=5)
    assert b.info("serving") == {
        "kind": "transformer",
        "input_shapes": [[5, 32]],
        "dtype": "float32",
        "state": "serving",
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backend_matches_cpu():
    torch.manual_seed(0)
    cpu = ExpertBackend("u", "ffn", 16, OptimizerSpec("sgd", lr=0.0))
    gpu = ExpertBackend("u", "ffn", 16, OptimizerSpec("sgd", lr=0.0), device="cuda")
    gpu.module.load_state_dict(cpu.module.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(
        gpu.forward([x.cuda()]).cpu(), cpu.forward([x]), rtol=1e-4, atol=1e-4
    )
