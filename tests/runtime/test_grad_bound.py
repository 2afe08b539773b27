"""The per-sample gradient-norm bound (``serving.max_grad_norm``): a backward whose output
gradient is too large for any one sample is refused with a typed error before it touches the
expert; the bound is off by default and judges samples, not requests."""

from __future__ import annotations

import pytest
import torch

from tests.manifest.broken_cases import VALID
from tests.runtime.servers import Replies, make_backends, running, submit_sync
from volunteer.experts.backend import ExpertBackend
from volunteer.manifest.validate import validate_document
from volunteer.runtime.limits import ServingLimits
from volunteer.wire.errors import BadRequestError, GradientNormError, error_from_code
from volunteer.wire.messages import decode_reply, encode_request

H = 16
pytestmark = pytest.mark.timeout(60)


def weights(backend: ExpertBackend) -> list[torch.Tensor]:
    return [p.detach().clone() for p in backend.module.parameters()]


def rows_with_norms(*norms: float) -> torch.Tensor:
    """A gradient whose sample i has L2 norm ``norms[i]``."""
    g = torch.randn(len(norms), H)
    return g / g.norm(dim=1, keepdim=True) * torch.tensor(norms).unsqueeze(1)


def backward(rt, grad: torch.Tensor, request_id: int, dtype=torch.float32):  # type: ignore[no-untyped-def]
    x = torch.randn(grad.shape[0], H, dtype=dtype)
    return decode_reply(submit_sync(rt, encode_request("backward", "e.0", [x, grad.to(dtype)],
                                                       request_id=request_id)))


def test_a_sample_over_the_manifest_bound_is_refused_before_the_expert() -> None:
    limits = validate_document({**VALID, "serving": {"max_grad_norm": 1.0}}, "m.yaml").serving
    assert limits.max_grad_norm == 1.0
    backends = make_backends({"e.0": ("ffn", H)})
    before = weights(backends["e.0"])
    with running(backends, limits, zmq=False) as (rt, _):
        with pytest.raises(GradientNormError, match=r"sample 2 of backward to e\.0 has L2 norm 2 > "
                                                    r"serving\.max_grad_norm 1"):
            backward(rt, rows_with_norms(0.1, 0.2, 2.0, 0.1), 1)
        with pytest.raises(GradientNormError):  # fp16 on the wire: judged alike
            backward(rt, rows_with_norms(0.5, 30.0), 2, dtype=torch.float16)
        stats = rt.stats()["e.0"]
        assert stats["errors"] == {"grad_norm": 2} and stats["updates_applied"] == 0
        assert all(torch.equal(a, b) for a, b in zip(before, weights(backends["e.0"]), strict=True))
        # Within the bound it is served and applied.
        assert backward(rt, rows_with_norms(0.5, 0.99, 0.01), 3).tensors[0].shape == (3, H)
        assert rt.stats()["e.0"]["updates_applied"] == 1


def test_the_bound_is_per_sample_not_per_request() -> None:
    backends = make_backends({"e.0": ("ffn", H)})
    with running(backends, ServingLimits(max_grad_norm=1.0), zmq=False) as (rt, _):
        # 200 samples of norm 0.9 each: the request's total norm is ~12.7, yet each sample is
        # within the bound, as it would be in a request of its own.
        grad = rows_with_norms(*[0.9] * 200)
        assert grad.norm() > 10
        backward(rt, grad, 1)
        backward(rt, grad[:1], 2)
        assert rt.stats()["e.0"]["updates_applied"] == 2


def test_a_backward_with_inputs_omitted_is_bounded_too() -> None:
    backends = make_backends({"e.0": ("ffn", H)})
    replies = Replies()
    with running(backends, ServingLimits(max_grad_norm=1.0), zmq=False) as (rt, _):
        x = torch.randn(2, H)
        rt.submit(encode_request("forward", "e.0", [x], request_id=1, will_backward=True), replies.callback("f"))
        replies.wait(1)
        frames = encode_request("backward", "e.0", [rows_with_norms(0.5, 5.0)], request_id=2, forward_id=1,
                                inputs_included=False)
        with pytest.raises(GradientNormError):
            decode_reply(submit_sync(rt, frames))
        assert rt.stats()["e.0"]["updates_applied"] == 0


def test_off_by_default_and_a_typed_code_on_the_wire() -> None:
    assert ServingLimits().max_grad_norm is None
    backends = make_backends({"e.0": ("ffn", H)})
    with running(backends, zmq=False) as (rt, _):
        backward(rt, rows_with_norms(1e6, 1.0), 1)  # large but finite: no bound was asked for
        assert rt.stats()["e.0"]["updates_applied"] == 1
    err = error_from_code("grad_norm", "too large")
    assert isinstance(err, GradientNormError) and isinstance(err, BadRequestError)
