"""RemoteMixtureOfExperts combination logic with in-process stand-in experts.

Experts here are local modules plugged in through ``expert_factory`` so the routing,
dropping, renormalisation, k_min and parallel dispatch logic can be checked exactly and
fast; tests/client/test_moe_remote.py runs the same layer against real servers.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.client.helpers import Token, make_experts, reference_moe
from volunteer.client.directory import StaticDirectory
from volunteer.client.moe import NotEnoughExpertsError, RemoteMixtureOfExperts
from volunteer.wire.errors import (
    DrainingError,
    OverloadedError,
    RemoteTimeoutError,
    UnreachableError,
)

HIDDEN = 8
CELLS = [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2), (1, 2)]


def _layer(experts, k_best=3, k_min=1, **kwargs):
    directory = StaticDirectory({uid: Token(uid) for uid in experts})
    layer = RemoteMixtureOfExperts(
        HIDDEN, [3, 3], "m.ffn", directory, k_best=k_best, k_min=k_min,
        beam_size=9, expert_factory=lambda uid, _t: experts[uid], **kwargs,
    )
    return layer


@pytest.fixture
def experts():
    return make_experts("m.ffn", CELLS, HIDDEN)


@pytest.mark.timeout(30)
def test_forward_backward_match_local_reference(experts):
    layer = _layer(experts)
    try:
        x = torch.randn(10, HIDDEN, requires_grad=True)
        out = layer(x)
        assert out.shape == x.shape
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        expert_grads = {u: [p.grad.clone() for p in e.parameters()] for u, e in experts.items()}
        x_grad = x.grad.clone()

        for p in [*layer.parameters(), *(q for e in experts.values() for q in e.parameters())]:
            p.grad = None
        x2 = x.detach().clone().requires_grad_(True)
        ref = reference_moe(layer.gate, experts, "m.ffn", x2, k=3)
        ref.pow(2).sum().backward()
        assert torch.allclose(out, ref, atol=1e-5)
        assert torch.allclose(x_grad, x2.grad, atol=1e-5)
        for n, p in layer.named_parameters():
            assert torch.allclose(grads[n], p.grad, atol=1e-5), n
        for u, e in experts.items():
            for g, p in zip(expert_grads[u], e.parameters(), strict=True):
                assert (g is None and p.grad is None) or torch.allclose(g, p.grad, atol=1e-5), u
        # each expert got one request per call with only its rows
        assert all(e.calls <= 1 for e in experts.values())
        assert sum(sum(e.rows_seen) for e in experts.values()) == 10 * 3
        assert sorted(layer.last_report.answered) == sorted(layer.last_report.backward_answered)
    finally:
        layer.close()


@pytest.mark.timeout(30)
def test_leading_dimensions_are_preserved(experts):
    layer = _layer(experts)
    try:
        x = torch.randn(2, 3, HIDDEN)
        out = layer(x)
        assert out.shape == x.shape
        flat = layer(x.reshape(6, HIDDEN))
        assert torch.allclose(out.reshape(6, HIDDEN), flat, atol=1e-6)
    finally:
        layer.close()


@pytest.mark.timeout(30)
def test_failed_expert_dropped_and_softmax_renormalised(experts):
    torch.manual_seed(3)
    layer = _layer(experts)
    try:
        x = torch.randn(12, HIDDEN)
        with torch.no_grad():
            first = layer(x)
        victim = layer.last_report.answered[0]
        experts[victim].fail_with = OverloadedError("queue full")
        out = layer(x)
        assert layer.last_report.failed == {victim: "overloaded: queue full"}
        assert victim not in layer.last_report.answered
        ref = reference_moe(layer.gate, experts, "m.ffn", x, k=3, drop=frozenset({victim}))
        assert torch.allclose(out, ref, atol=1e-5)
        assert not torch.allclose(out, first, atol=1e-5)
        out.sum().backward()  # gradients still flow with a dropped expert
        assert torch.isfinite(layer.gate.proj.weight.grad).all()
        # overloaded is not a reason to avoid the expert next time
        assert victim not in layer.avoid.active()
    finally:
        layer.close()


@pytest.mark.timeout(30)
def test_fewer_than_k_min_answering_raises_clear_error(experts):
    layer = _layer(experts, k_best=2, k_min=2)
    try:
        for e in list(experts.values())[:4]:
            e.fail_with = UnreachableError("connection refused")
        with pytest.raises(NotEnoughExpertsError, match=r"k_min=2.*unreachable: connection refused"):
            layer(torch.randn(16, HIDDEN))
    finally:
        layer.close()


def test_fewer_than_k_min_alive_raises_before_calling():
    experts = make_experts("m.ffn", [(1, 1)], HIDDEN)
    layer = _layer(experts, k_best=2, k_min=2)
    try:
        with pytest.raises(NotEnoughExpertsError, match=r"only 1 alive expert\(s\) found"):
            layer(torch.randn(4, HIDDEN))
        assert experts["m.ffn.1.1"].calls == 0
    finally:
        layer.close()


class _TimingOutDirectory:
    """A directory whose DHT lookups time out (what ``ClientNode`` raises past its deadline)."""

    def children(self, prefixes):
        raise RemoteTimeoutError("DHT lookup took longer than 10 s")

    def resolve(self, uids):
        raise RemoteTimeoutError("DHT lookup took longer than 10 s")


def test_a_directory_that_times_out_is_not_enough_experts_not_a_crash():
    layer = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=[2, 2], uid_prefix="m.ffn",
                                   directory=_TimingOutDirectory(), k_best=2, k_min=1)
    try:
        with pytest.raises(NotEnoughExpertsError, match=r"directory failed.*longer than"):
            layer(torch.randn(4, HIDDEN))
    finally:
        layer.close()


@pytest.mark.timeout(30)
def test_draining_expert_is_avoided_until_expiry(experts):
    layer = _layer(experts, k_best=6, avoid_for=3600)
    try:
        x = torch.randn(4, HIDDEN)
        experts["m.ffn.1.1"].fail_with = DrainingError("node is leaving")
        layer(x)
        assert "m.ffn.1.1" in layer.last_report.failed
        assert "m.ffn.1.1" in layer.avoid.active()
        calls_before = experts["m.ffn.1.1"].calls
        layer(x)
        assert experts["m.ffn.1.1"].calls == calls_before  # not asked again
        assert len(layer.last_report.answered) == 5
        # once the entry expires the expert is eligible again
        layer.avoid._until["m.ffn.1.1"] = 0.0
        experts["m.ffn.1.1"].fail_with = None
        layer(x)
        assert "m.ffn.1.1" in layer.last_report.answered
    finally:
        layer.close()


@pytest.mark.timeout(30)
def test_avoided_experts_are_retried_rather_than_failing_the_call(experts):
    layer = _layer(experts, k_best=2, k_min=2, avoid_for=3600)
    try:
        for uid in list(experts)[1:]:
            layer.avoid.add(uid, 3600)
        out = layer(torch.randn(4, HIDDEN))  # only one non-avoided expert: k_min needs 2
        assert len(layer.last_report.answered) >= 2
        assert torch.isfinite(out).all()
    finally:
        layer.close()


@pytest.mark.timeout(30)
def test_late_expert_dropped_after_timeout_after_k_min(experts):
    layer = _layer(experts, k_best=3, k_min=1, timeout_after_k_min=0.05)
    release = threading.Event()
    try:
        x = torch.randn(6, HIDDEN)
        with torch.no_grad():
            layer(x)
        slow = layer.last_report.answered[0]
        experts[slow].release = release
        out = layer(x)  # would block for 30 s without the k_min cut-off
        assert slow in layer.last_report.failed
        assert layer.last_report.failed[slow].startswith("timeout: cut off")
        assert torch.isfinite(out).all()
        assert slow not in layer.avoid.active()  # merely slower than the quorum
    finally:
        release.set()
        layer.close()


@pytest.mark.timeout(30)
def test_cut_off_expert_avoided_only_if_it_then_fails(experts):
    layer = _layer(experts, k_best=3, k_min=1, timeout_after_k_min=0.05)
    release = threading.Event()
    try:
        x = torch.randn(6, HIDDEN)
        with torch.no_grad():
            layer(x)
        slow = layer.last_report.answered[0]
        experts[slow].release = release
        experts[slow].fail_with = UnreachableError("peer vanished")
        with torch.no_grad():
            layer(x)
        assert layer.last_report.failed[slow].startswith("timeout: cut off")
        assert slow not in layer.avoid.active()
        release.set()  # the background call now fails: the expert is gone, avoid it
        deadline = time.monotonic() + 10
        while slow not in layer.avoid.active() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow in layer.avoid.active()
    finally:
        release.set()
        layer.close()


@pytest.mark.timeout(30)
def test_forward_timeout_drops_expert_that_never_answers(experts):
    layer = _layer(experts, k_best=6, forward_timeout=0.2)
    release = threading.Event()
    try:
        experts["m.ffn.0.2"].release = release
        layer(torch.randn(3, HIDDEN))
        assert set(layer.last_report.failed) == {"m.ffn.0.2"}
        assert layer.last_report.failed["m.ffn.0.2"].startswith("timeout: no answer within")
        assert "m.ffn.0.2" in layer.avoid.active()  # silent past the deadline: gone?
    finally:
        release.set()
        layer.close()


@pytest.mark.timeout(60)
def test_forward_and_backward_calls_run_in_parallel(experts):
    """Every expert waits on a shared barrier in forward and in backward: if the calls
    were serialised the barrier would break and the experts would be dropped."""
    layer = _layer(experts, k_best=6, k_min=6)
    forward_barrier = threading.Barrier(len(experts), timeout=20)
    backward_barrier = threading.Barrier(len(experts), timeout=20)
    for e in experts.values():
        e.forward_barrier = forward_barrier
        e.backward_barrier = backward_barrier
    try:
        x = torch.randn(5, HIDDEN, requires_grad=True)
        out = layer(x)
        assert len(layer.last_report.answered) == len(experts)
        out.sum().backward()
        assert layer.last_report.backward_failed == {}
        assert len(layer.last_report.backward_answered) == len(experts)
        assert not forward_barrier.broken and not backward_barrier.broken
        assert x.grad is not None and x.grad.abs().sum() > 0
    finally:
        forward_barrier.abort()
        backward_barrier.abort()
        layer.close()


@pytest.mark.timeout(30)
def test_backward_reaches_experts_even_without_input_grad(experts):
    layer = _layer(experts, k_best=2)
    try:
        layer(torch.randn(4, HIDDEN)).sum().backward()
        assert layer.last_report.backward_answered
        touched = [e for e in experts.values() if e.module[0].weight.grad is not None]
        assert len(touched) == len(set(layer.last_report.backward_answered))
    finally:
        layer.close()


@pytest.mark.timeout(30)
def test_inference_records_no_graph(experts):
    layer = _layer(experts, k_best=2)
    try:
        with torch.no_grad():
            out = layer(torch.randn(4, HIDDEN))
        assert not out.requires_grad
        modes = [m for e in experts.values() for m in e.grad_modes]
        assert modes and not any(modes)
        layer(torch.randn(4, HIDDEN))
        assert any(m for e in experts.values() for m in e.grad_modes)
    finally:
        layer.close()


class _NaN(torch.nn.Module):
    def forward(self, x):
        return x * float("nan")


@pytest.mark.timeout(30)
def test_malformed_expert_answers_are_dropped(experts):
    layer = _layer(experts, k_best=6)
    try:
        bad_shape, bad_value = "m.ffn.0.0", "m.ffn.2.2"
        experts[bad_shape].module = torch.nn.Linear(HIDDEN, HIDDEN + 1)
        experts[bad_value].module = _NaN()
        out = layer(torch.randn(3, HIDDEN))
        assert set(layer.last_report.failed) == {bad_shape, bad_value}
        assert "expected (3, 8)" in layer.last_report.failed[bad_shape]
        assert "non-finite" in layer.last_report.failed[bad_value]
        assert torch.isfinite(out).all()
    finally:
        layer.close()


def test_constructor_validates_arguments():
    directory = StaticDirectory({})
    with pytest.raises(ValueError):
        RemoteMixtureOfExperts(4, [2], "p", directory, k_best=1, k_min=2)
    with pytest.raises(ValueError):
        RemoteMixtureOfExperts(4, [2], "p.", directory, k_best=1)
    with pytest.raises(ValueError):
        RemoteMixtureOfExperts(4, [2], "p", directory, k_best=1, forward_timeout=-1)
    layer = RemoteMixtureOfExperts(4, [2], "p", directory, k_best=1)
    with pytest.raises(ValueError):
        layer(torch.randn(3, 5))
