"""Grid gate, expert logits and the masked (renormalised) softmax."""

from __future__ import annotations

import pytest
import torch

from volunteer.client.gating import GridGate, expert_logits, masked_softmax


def test_gate_splits_scores_per_dimension():
    gate = GridGate(8, [3, 5])
    scores = gate(torch.randn(4, 8))
    assert [tuple(s.shape) for s in scores] == [(4, 3), (4, 5)]


def test_expert_logits_sum_per_dimension_scores():
    s0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    s1 = torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    coords = torch.tensor([[[1, 2], [0, 0]], [[0, 1], [1, 1]]])
    assert expert_logits([s0, s1], coords).tolist() == [[32.0, 11.0], [53.0, 54.0]]
    with pytest.raises(ValueError):
        expert_logits([s0, s1], coords[:, :, :1])


def test_masked_softmax_renormalises_over_answered():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    weights = masked_softmax(logits, mask)
    expected = torch.softmax(torch.tensor([1.0, 3.0]), 0)
    assert torch.allclose(weights[0, [0, 2]], expected)
    assert weights[0, 1] == 0
    assert weights[1].tolist() == [0.0, 0.0, 0.0]  # no answer: zeros, not NaN
    full = masked_softmax(logits, torch.ones_like(mask))
    assert torch.allclose(full, torch.softmax(logits, -1))


def test_gradients_flow_to_gate_through_answered_experts_only():
    torch.manual_seed(0)
    gate = GridGate(6, [4, 4])
    x = torch.randn(3, 6, requires_grad=True)
    scores = gate(x)
    coords = torch.tensor([[[0, 1], [2, 3]], [[1, 1], [3, 0]], [[2, 2], [0, 0]]])
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    values = torch.randn(3, 2)
    weights = masked_softmax(expert_logits(scores, coords), mask)
    (weights * values).sum().backward()
    assert gate.proj.weight.grad is not None and gate.proj.weight.grad.abs().sum() > 0
    assert x.grad is not None
    # sample 1 has one answering expert (weight exactly 1) and sample 2 none: no gradient
    assert torch.all(x.grad[1:] == 0)
    assert x.grad[0].abs().sum() > 0
    assert torch.isfinite(gate.proj.weight.grad).all()


def test_masked_softmax_matches_autograd_reference():
    torch.manual_seed(1)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 4) > 0.3
    mask[:, 0] = True
    assert torch.autograd.gradcheck(lambda t: masked_softmax(t, mask), (logits,))


def test_gate_rejects_bad_grid():
    with pytest.raises(ValueError):
        GridGate(4, [])
    with pytest.raises(ValueError):
        GridGate(4, [3, 0])
