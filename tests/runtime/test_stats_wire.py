"""Per-expert wire statistics (``bytes_in`` / ``bytes_out`` and their rates) and every wire
compression served through a real ``Runtime``: forward and backward in fp16, bf16 and int8
come back in the compression they were sent in."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.servers import Replies, make_backends, running, submit_sync
from volunteer.runtime import stats as stats_module
from volunteer.runtime.stats import ExpertStats
from volunteer.wire import COMPRESSIONS
from volunteer.wire.errors import NonFiniteError
from volunteer.wire.messages import decode_reply, encode_request, frames_nbytes

H = 64
pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_bytes_totals_and_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(1000.0)
    monkeypatch.setattr(stats_module.time, "monotonic", clock)
    s = ExpertStats()
    empty = s.snapshot(0, 0)
    assert (empty["bytes_in"], empty["bytes_out"]) == (0, 0)
    assert (empty["bytes_in_per_s"], empty["bytes_out_per_s"]) == (0.0, 0.0)
    clock.now = 1005.2
    s.record_bytes_in(1000)
    s.record_bytes_in(500)
    s.record_bytes_out(300)
    clock.now = 1006.5
    s.record_bytes_in(4000)
    clock.now = 1010.0
    snap = s.snapshot(0, 0)
    assert (snap["bytes_in"], snap["bytes_out"]) == (5500, 300)
    assert snap["bytes_in_per_s"] == pytest.approx(5500 / 10) and snap["bytes_out_per_s"] == 30
    clock.now = 1030.0  # a quiet window: rates fall to zero, totals stay
    later = s.snapshot(0, 0)
    assert (later["bytes_in"], later["bytes_in_per_s"], later["bytes_out_per_s"]) == (5500, 0, 0)


def backward_frames(x: torch.Tensor, g: torch.Tensor, compression: str | None) -> list:
    return encode_request("backward", "e.0", [x, g], request_id=2, forward_id=1,
                          compression=compression)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_compression_is_served_both_ways(compression: str | None) -> None:
    backends = make_backends({"e.0": ("ffn", H)})
    module = backends["e.0"].module
    x, g = torch.randn(8, H), torch.randn(8, H)
    with torch.no_grad():
        want = module(x)  # before the backward's optimizer step changes the weights
    with running(backends, zmq=False) as (rt, _):
        frames = encode_request("forward", "e.0", [x], request_id=1, will_backward=True,
                                compression=compression)
        out_frames = submit_sync(rt, frames)
        out = decode_reply(out_frames)
        grads = decode_reply(submit_sync(rt, backward_frames(x, g, compression))).tensors
    (y,) = out.tensors
    assert y.dtype == torch.float32 and y.shape == (8, H) and grads[0].shape == (8, H)
    tolerance = {None: 1e-5, "fp16": 1e-2, "bf16": 5e-2, "int8": 5e-2}[compression]
    torch.testing.assert_close(y, want, rtol=tolerance, atol=tolerance)
    if compression == "int8":  # the reply itself is quantised: about a quarter of float32
        assert memoryview(out_frames[1]).nbytes == 8 * H + 4 * 8 * H // 64


def test_runtime_counts_each_experts_bytes_in_and_out() -> None:
    backends = make_backends({"e.0": ("nop", H), "e.1": ("nop", H)})
    x = torch.randn(32, H)
    sent = {c: encode_request("forward", "e.0", [x], request_id=i, compression=c)
            for i, c in enumerate(COMPRESSIONS)}
    with running(backends, zmq=False) as (rt, _):
        got = {c: submit_sync(rt, frames) for c, frames in sent.items()}
        snap = rt.stats()
    assert snap["e.0"]["bytes_in"] == sum(frames_nbytes(f) for f in sent.values())
    assert snap["e.0"]["bytes_out"] == sum(frames_nbytes(f) for f in got.values())
    assert snap["e.1"]["bytes_in"] == snap["e.1"]["bytes_out"] == 0
    assert frames_nbytes(got["int8"]) < 0.3 * frames_nbytes(got[None])


def test_a_non_finite_int8_reply_fails_only_its_own_request() -> None:
    backends = make_backends({"e.0": ("ffn", H)})
    huge = torch.zeros(1, H)
    huge[0, 0] = 1e38  # finite (validation lets it in), but the expert's output is not
    replies = Replies()
    with running(backends, zmq=False) as (rt, _):
        with rt.exclusive():  # both in one batch
            rt.submit(encode_request("forward", "e.0", [huge], request_id=1, compression="int8"),
                      replies.callback("bad"))
            rt.submit(encode_request("forward", "e.0", [torch.randn(1, H)], request_id=2,
                                     compression="int8"), replies.callback("good"))
        replies.wait(2)
    with pytest.raises(NonFiniteError):
        replies.decoded("bad")
    assert replies.decoded("good").tensors[0].shape == (1, H)
