"""Numbers that poison: NaN / infinity never reach an expert, and a step that would make a
weight non-finite is skipped and counted."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.servers import make_backends, running, submit_sync
from volunteer.experts.backend import ExpertBackend
from volunteer.wire.errors import NonFiniteError
from volunteer.wire.messages import decode_reply, encode_request

H = 16


def weights(backend: ExpertBackend) -> list[torch.Tensor]:
    return [p.detach().clone() for p in backend.module.parameters()]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_and_gradients_are_refused_before_the_expert(bad: float) -> None:
    backends = make_backends({"e.0": ("ffn", H)})
    before = weights(backends["e.0"])
    with running(backends, zmq=False) as (rt, _):
        x = torch.randn(4, H)
        x[2, 3] = bad
        with pytest.raises(NonFiniteError, match=r"input 0 of forward to e\.0"):
            decode_reply(submit_sync(rt, encode_request("forward", "e.0", [x], request_id=1)))
        good, grad = torch.randn(4, H), torch.randn(4, H)
        grad[0, 0] = bad
        with pytest.raises(NonFiniteError, match="output gradient of backward"):
            decode_reply(submit_sync(rt, encode_request("backward", "e.0", [good, grad], request_id=2)))
        stats = rt.stats()["e.0"]
        assert stats["errors"] == {"non_finite": 2} and stats["updates_applied"] == 0
        # the expert still serves finite work, and nothing reached it before
        out = decode_reply(submit_sync(rt, encode_request("backward", "e.0", [good, torch.randn(4, H)],
                                                          request_id=3))).tensors[0]
        assert torch.isfinite(out).all() and rt.stats()["e.0"]["updates_applied"] == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(backends["e.0"]), strict=True))


def test_finite_request_whose_gradients_overflow_skips_the_step() -> None:
    backends = make_backends({"e.0": ("ffn", H)})
    backend = backends["e.0"]
    before = weights(backend)
    with running(backends, zmq=False) as (rt, _):
        x = torch.randn(2, H) * 100
        huge = torch.zeros(2, H)
        huge[0, 0] = 1e38  # finite on the wire (and its sum); times activations ~100 it overflows
        reply = decode_reply(submit_sync(rt, encode_request("backward", "e.0", [x, huge], request_id=1)))
        assert reply.tensors  # the caller still gets its answer
        stats = rt.stats()["e.0"]
        assert stats["steps_skipped"] == 1 and stats["updates_applied"] == 0
    after = weights(backend)
    assert all(torch.isfinite(p).all() for p in after)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the step was skipped
