"""Expert zoo and registry: the blocks compute what they claim; errors name the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from volunteer.experts.registry import available_experts, build_expert


def test_registry_lists_the_zoo_and_rejects_unknown_kinds():
    assert {"ffn", "transformer", "nop"} <= set(available_experts())
    with pytest.raises(ValueError, match="ffn, nop, transformer"):
        build_expert("mlp9000", 8)
    with pytest.raises(ValueError, match="hidden_dim"):
        build_expert("ffn", 0)
    with pytest.raises(ValueError, match="bad options"):
        build_expert("ffn", 8, colour="blue")


def test_ffn_is_linear_gelu_linear_then_layernorm_of_residual():
    torch.manual_seed(0)
    m = build_expert("ffn", 12)
    x = torch.randn(5, 12)
    h = F.gelu(F.linear(x, m.fc1.weight, m.fc1.bias), approximate="tanh")
    assert m.fc1.weight.shape == (48, 12)
    expected = F.layer_norm(
        x + F.linear(h, m.fc2.weight, m.fc2.bias), (12,), m.norm.weight, m.norm.bias
    )
    torch.testing.assert_close(m(x), expected)
    assert m.input_shapes == [(12,)]


def test_transformer_block_shapes_and_head_validation():
    m = build_expert("transformer", 32, seq_len=6)
    assert m.input_shapes == [(6, 32)]
    assert m.block.self_attn.num_heads == 16
    assert m(torch.randn(3, 6, 32)).shape == (3, 6, 32)
    with pytest.raises(ValueError, match="divisible by num_heads=16"):
        build_expert("transformer", 40)
    assert build_expert("transformer", 40, num_heads=8).block.self_attn.num_heads == 8


def test_nop_returns_its_input_and_passes_gradients():
    m = build_expert("nop", 4)
    x = torch.randn(2, 4, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 4))
    assert list(m.parameters()) == []
