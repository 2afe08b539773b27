"""8-bit blockwise quantisation (``volunteer.wire.quant``): the stated error bound on random and
adversarial data, non-finite values refused on both sides, and untrusted frames validated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from volunteer.wire import quant
from volunteer.wire.errors import BadRequestError, NonFiniteError

TINY = 2.0**-149  # the smallest float32 (subnormal)
FMAX = float(np.finfo(np.float32).max)


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Each element's block absmax, computed independently of the codec (float64)."""
    flat = x.reshape(-1).double()
    pad = (-flat.numel()) % block
    padded = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    per_block = padded.abs().amax(dim=1, keepdim=True).expand(-1, block)
    return per_block.reshape(-1)[: flat.numel()]


def round_trip(x: torch.Tensor, block: int = quant.BLOCK) -> torch.Tensor:
    frame = quant.quantize(x, block)
    assert frame.dtype == torch.uint8 and frame.numel() == quant.frame_nbytes(x.numel(), block)
    return quant.dequantize(memoryview(frame.numpy()), x.numel(), block)


def assert_within_bound(x: torch.Tensor, block: int = quant.BLOCK) -> None:
    """The bound the module docstring states: a / 254 * (1 + 2**-12) + 2**-149."""
    got = round_trip(x, block).double()
    err = (x.reshape(-1).double() - got).abs()
    bound = block_absmax(x, block) / 254 * (1 + 2.0**-12) + TINY
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (worst, float(x.reshape(-1)[worst]), float(err[worst]))


@pytest.mark.parametrize("block", [8, 64, 4096])
@pytest.mark.parametrize("numel", [1, 7, 63, 64, 65, 1000, 70001])
def test_error_bound_on_random_data_of_every_scale(numel: int, block: int) -> None:
    g = torch.Generator().manual_seed(numel * 31 + block)
    normal = torch.randn(numel, generator=g)
    assert_within_bound(normal, block)
    # magnitudes spread over ~40 orders: blocks mix tiny and huge values
    wide = normal * torch.exp(torch.randn(numel, generator=g) * 20).clamp(max=1e30)
    assert_within_bound(wide, block)
    assert_within_bound(torch.rand(numel, generator=g) * 1e-30, block)


def test_the_bound_is_tight_not_vacuous() -> None:
    """Half a step is actually reached: values half-way between two codes."""
    a = 127.0
    x = torch.tensor([a] + [k + 0.5 - 1e-4 for k in range(-126, 63)], dtype=torch.float32)
    err = (round_trip(x[:64]) - x[:64]).abs().max().item()
    assert 0.49 < err <= a / 254 * (1 + 2.0**-12)


def test_adversarial_values() -> None:
    cases = {
        "zeros": torch.zeros(200),
        "negative zeros": -torch.zeros(130),
        "one outlier per block": torch.where(torch.arange(256) % 64 == 5, 1e30, 1.0),
        "float32 max": torch.tensor([FMAX, -FMAX, FMAX / 3, 1.0] * 20),
        "subnormals": torch.tensor([TINY, -TINY, 3 * TINY, 0.0, 1e-40, -2e-39] * 11),
        "subnormal absmax": torch.tensor([1000 * TINY, 999 * TINY, -777 * TINY, 5 * TINY] * 17),
        "tiny normal absmax": torch.tensor([2.0**-110, -3 * 2.0**-112, 2.0**-120] * 23),
        "smallest normal": torch.full((70,), 2.0**-126),
        "constant": torch.full((129,), -3.25),
        "ties": torch.arange(-127, 128, dtype=torch.float32) / 2,
    }
    for name, x in cases.items():
        try:
            assert_within_bound(x)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    assert torch.equal(round_trip(torch.zeros(200)), torch.zeros(200))
    # the block's absmax itself and zeros are exact
    x = torch.tensor([0.0, 5.0, -5.0, 1.0] * 16)
    got = round_trip(x)
    assert got[0] == 0 and got[1] == 5.0 and got[2] == -5.0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1,
                max_size=200), st.sampled_from([8, 64]))
def test_error_bound_on_any_finite_float32_values(values: list[float], block: int) -> None:
    assert_within_bound(torch.tensor(values, dtype=torch.float32), block)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 63, 64, 130])  # first block, block edge, tail block
def test_non_finite_values_are_refused_on_encode(bad: float, where: int) -> None:
    x = torch.randn(131)
    x[where] = bad
    with pytest.raises(NonFiniteError):
        quant.quantize(x)


def test_float16_and_bfloat16_tensors_quantise_from_their_float32_value() -> None:
    x = torch.randn(300)
    for dtype in (torch.float16, torch.bfloat16):
        got = round_trip(x.to(dtype))
        want = x.to(dtype).double()
        bound = block_absmax(x.to(dtype), quant.BLOCK) / 254 * (1 + 2.0**-12) + TINY
        assert bool(((got.double() - want).abs() <= bound).all())


def frame_with_scales(scales: list[float], codes: list[int]) -> memoryview:
    return memoryview(
        np.asarray(scales, dtype="<f4").tobytes() + np.asarray(codes, dtype=np.int8).tobytes()
    )


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_scales_are_refused_on_decode(scale: float) -> None:
    frame = frame_with_scales([1.0, scale], [1] * 70)
    with pytest.raises(NonFiniteError):
        quant.dequantize(frame, 70, 64)


def test_negative_scales_and_wrong_sizes_are_refused() -> None:
    with pytest.raises(BadRequestError, match="negative"):
        quant.dequantize(frame_with_scales([-1.0], [1] * 64), 64, 64)
    with pytest.raises(BadRequestError, match="expected"):
        quant.dequantize(frame_with_scales([1.0], [1] * 63), 64, 64)


def test_decode_of_read_only_and_unaligned_buffers() -> None:
    x = torch.randn(100)
    frame = bytes(quant.quantize(x).numpy())
    from_bytes = quant.dequantize(memoryview(frame), 100, 64)
    shifted = memoryview(bytearray(b"\0" + frame))[1:]  # scales not 4-byte aligned
    assert torch.equal(from_bytes, quant.dequantize(shifted, 100, 64))
    assert bool(((from_bytes - x).abs() <= block_absmax(x, 64) / 254 * 1.001).all())


def test_block_sizes() -> None:
    assert [b for b in (0, 1, 4, 8, 24, 64, 65536, 131072, True, 64.0) if quant.valid_block(b)] == [
        8, 64, 65536]
    with pytest.raises(ValueError):
        quant.quantize(torch.ones(4), block=3)
    assert quant.frame_nbytes(64, 64) == 68 and quant.frame_nbytes(65, 64) == 73
    assert quant.frame_nbytes(0, 64) == 0


def test_scales_beyond_the_restored_dtype_and_edge_codes_are_refused() -> None:
    frame = frame_with_scales([131072.0], [127] * 64)  # beyond float16's 65504
    with pytest.raises(BadRequestError, match="range"):
        quant.dequantize(frame, 64, 64, torch.float16)
    assert quant.dequantize(frame, 64, 64, torch.float32)[0] == 131072.0
    edge = frame_with_scales([FMAX], [-128] + [1] * 63)  # -128/127 * FMAX is -inf
    with pytest.raises(BadRequestError, match="-128"):
        quant.dequantize(edge, 64, 64)
    inside = frame_with_scales([1.0], [-128] + [1] * 63)  # harmless where it stays finite
    assert quant.dequantize(inside, 64, 64)[0] == pytest.approx(-128 / 127)


def test_range_edges_round_trip_finite() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        top = torch.finfo(dtype).max
        x = torch.tensor([top, -top, top / 2, 1.0] * 16, dtype=dtype)
        frame = quant.quantize(x)
        got = quant.dequantize(memoryview(frame.numpy()), x.numel(), quant.BLOCK, dtype).to(dtype)
        assert bool(torch.isfinite(got).all())
        assert float(got[0]) == pytest.approx(top, rel=1e-6) and float(got[1]) == -float(got[0])
