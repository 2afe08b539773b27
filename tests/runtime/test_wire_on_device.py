"""16-bit wires on a GPU node: request tensors stay in their wire dtype until the device
casts them (``decode_request(restore=False)``), and replies are cast to the wire dtype on
the device and copied back at half the bytes, restored to float32 by the client. On CPU
experts the same code path is forced here (``_restore_on_host = False``): every answer must
equal the one a node that restores on arrival gives, in the client's dtype."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.servers import make_backends, running
from volunteer.client.remote_expert import RemoteExpert
from volunteer.experts.backend import OptimizerSpec
from volunteer.runtime.task_pool import Task
from volunteer.wire.limits import WireLimits
from volunteer.wire.messages import decode_reply, decode_request, encode_request, encode_result
from volunteer.wire.tensors import frames_to_tensors, tensor_to_frame

H = 16
pytestmark = pytest.mark.timeout(120)


def _serve(compression: str, on_host: bool) -> list[torch.Tensor]:
    backends = make_backends({"w.0": ("ffn", H)}, OptimizerSpec("adam", 1e-2))
    torch.manual_seed(3)
    xs = [torch.randn(8, H) for _ in range(3)]
    outs = []
    with running(backends) as (rt, fe):
        rt._restore_on_host = on_host
        expert = RemoteExpert("w.0", fe.endpoint, timeout=30, compression=compression)
        for x in xs:
            leaf = x.clone().requires_grad_()
            y = expert(leaf)
            y.pow(2).sum().backward()
            assert y.dtype == torch.float32 and leaf.grad.dtype == torch.float32
            outs += [y.detach(), leaf.grad]
        expert.close()
    return outs


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_wire_dtype_kept_until_compute_gives_the_same_answers(compression: str) -> None:
    a = _serve(compression, on_host=False)
    b = _serve(compression, on_host=True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_decode_without_restore_keeps_16_bits_and_says_what_they_were() -> None:
    x = torch.randn(4, H)
    native = torch.randn(4, H).half()
    frames = encode_request("forward", "w.0", [x, native], request_id=1, compression="fp16")
    req = decode_request(frames, restore=False)
    assert [t.dtype for t in req.tensors] == [torch.float16, torch.float16]
    assert req.restores == [torch.float32, None]  # the native half stays half
    assert torch.equal(req.tensors[0], x.half())
    req = decode_request(frames)
    assert [t.dtype for t in req.tensors] == [torch.float32, torch.float16]
    assert req.restores == [None, None]


def test_task_reply_dtypes_follow_the_clients_tensors() -> None:
    def task(inputs, grads, restores):
        return Task("u", "backward", 1, inputs, lambda f: None, 1.0, 0.0, 4, grads,
                    restores=restores)

    half = torch.zeros(4, H, dtype=torch.float16)
    t = task([half], [half], [torch.float32, torch.float32])
    assert t.reply_dtypes(1) == [torch.float32]
    t = task([], [half], [torch.bfloat16])  # inputs omitted: the gradient's dtype
    assert t.reply_dtypes(2) == [torch.bfloat16, torch.bfloat16]
    t = task([half], [half], [])
    assert t.reply_dtypes(1) == [torch.float16]


@pytest.mark.parametrize("compression,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_a_result_cast_before_encoding_is_restored_by_the_client(compression, dtype) -> None:
    y = torch.randn(4, H)
    frames = encode_result(7, [y.to(dtype)], compression, restore=[torch.float32])
    spec, _ = tensor_to_frame(y.to(dtype), compression, torch.float32)
    assert spec[2] == "float32"
    got = decode_reply(frames).tensors[0]
    assert got.dtype == torch.float32 and torch.equal(got, y.to(dtype).float())
    # float32 given with restore=float32: nothing to restore, the compression casts as usual
    spec, buf = tensor_to_frame(y, compression, torch.float32)
    assert spec[0] != "float32" and spec[2] == "float32"
    back = frames_to_tensors([spec], [bytes(buf)], WireLimits())[0]
    assert back.dtype == torch.float32 and torch.equal(back, y.to(dtype).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finiteness_check_sees_every_position_and_accepts_large_finite_values(dtype) -> None:
    from volunteer.runtime.validation import _finite

    big = torch.finfo(dtype).max
    t = torch.full((37, H), big, dtype=dtype)  # a sum would overflow; the values are finite
    assert _finite(t) and _finite(-t)
    for pos in (0, 1, 7, 31, 32, 33, 37 * H - 1):  # vector lanes, tails
        for bad in (float("nan"), float("inf"), -float("inf")):
            u = torch.zeros(37 * H, dtype=dtype)
            u[pos] = bad
            assert not _finite(u.view(37, H)), (pos, bad)
