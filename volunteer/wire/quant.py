"""8-bit blockwise quantisation of float tensors for the wire (the ``"int8"`` compression).

The flattened tensor is cut into blocks of ``block`` consecutive values (``BLOCK`` = 64 by
default; the last block may be shorter). Each block travels as its *absmax* ``a`` (the
largest magnitude in it, one float32) and one signed byte per value::

    q = round(127 * x / a)          (an integer in [-127, 127]; a block of zeros has a = 0)
    x' = q * (a / 127)              (on arrival, as float32; a / 127 rounded towards zero,
                                     so a block never decodes beyond its absmax)

One frame per tensor: ``n_blocks`` little-endian float32 absmax values, then ``numel`` int8
codes, so a frame holds ``4 * ceil(numel / block) + numel`` bytes: 1.0625 bytes per value at
the default block of 64, 0.266 of float32 and 0.53 of float16/bfloat16.

Error bound (per element, float32 in and out): ``|x - x'| <= a / 254 * (1 + 2**-12) + 2**-149``
where ``a`` is the absmax of the element's block. ``a / 254`` is half a quantisation step; the
factor ``1 + 2**-12`` covers float32 rounding of the division, the multiplications and
``a / 127``; ``2**-149`` (the smallest float32) covers subnormal results (blocks whose absmax
is below ``2**-100`` are decoded in float64, so a subnormal ``a / 127`` costs no precision). A
float16 or bfloat16 tensor is quantised from its float32 value and restored to its own dtype,
which adds that dtype's rounding of the result (half an ulp). Blocks with one large outlier
quantise their other values coarsely; that is the price of 8 bits, and why blocks are small.

Untrusted frames: :func:`frame_nbytes` gives the exact size a frame must have (checked by the
caller against the spec before anything is allocated), :func:`dequantize` rejects absmax
values that are NaN or infinite (``NonFiniteError``), negative or beyond the restored dtype's
range (``BadRequestError``), so whatever the codes, every decoded value is finite. The
encoder refuses NaN and infinity (``NonFiniteError``): a non-finite absmax has no code.
Everything is vectorised torch (no Python loop per block; on CPU a loop over chunks of
``CHUNK`` values keeps the float32 temporary in cache); quantisation runs on the tensor's own
device, so a CUDA tensor is copied to the host at about a quarter of its size.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from volunteer.wire.errors import BadRequestError, NonFiniteError

BLOCK = 64
MIN_BLOCK = 8
MAX_BLOCK = 1 << 16
QMAX = 127
WIRE_DTYPE = "int8"
CHUNK = 1 << 18  # values per step on CPU (1 MiB of float32): measured fastest here, 2-3 GB/s
_FLOAT32_MAX = float(np.finfo(np.float32).max)
TINY_ABSMAX = 2.0**-100  # below this, a / 127 could be subnormal: decoded in float64


def valid_block(block: object) -> bool:
    """Whether ``block`` is a block size a frame may declare (a power of two in [8, 65536])."""
    return (
        type(block) is int and MIN_BLOCK <= block <= MAX_BLOCK and block & (block - 1) == 0
    )


def n_blocks(numel: int, block: int) -> int:
    """Number of blocks (and of absmax values) for ``numel`` values."""
    return -(-numel // block)


def frame_nbytes(numel: int, block: int) -> int:
    """Exact size of the frame of ``numel`` values: float32 absmax per block, then the codes."""
    return 4 * n_blocks(numel, block) + numel


def quantize(tensor: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The frame of ``tensor`` as a flat uint8 CPU tensor of ``frame_nbytes(numel, block)``
    bytes; ``NonFiniteError`` if it holds NaN or infinity. Works on the tensor's device."""
    if not valid_block(block):
        raise ValueError(f"block must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {block!r}")
    flat = tensor.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    numel = flat.numel()
    nb = n_blocks(numel, block)
    out = torch.empty(4 * nb + numel, dtype=torch.uint8, device=flat.device)
    scales = out[: 4 * nb].view(torch.float32)
    codes = out[4 * nb :].view(torch.int8)
    full = numel // block
    if full:
        _encode(flat[: full * block].view(full, block), scales[:full],
                codes[: full * block].view(full, block))
    if numel > full * block:
        _encode(flat[full * block :].view(1, -1), scales[full:], codes[full * block :].view(1, -1))
    return out if out.is_cpu else out.cpu()


def _encode(x: torch.Tensor, absmax: torch.Tensor, codes: torch.Tensor) -> None:
    """Write the absmax of each row of ``x`` and its codes (rows are blocks). On CPU, in chunks
    of ``CHUNK`` values: each chunk of ``x`` is read from memory once and every other pass
    (|x|, absmax, divide, scale, round, cast) runs on data still in cache."""
    rows = x.shape[0] if not x.is_cpu else max(1, CHUNK // x.shape[1])
    tmp = torch.empty((min(rows, x.shape[0]), x.shape[1]), dtype=torch.float32, device=x.device)
    for r in range(0, x.shape[0], rows):
        n = min(rows, x.shape[0] - r)
        xc, q, a = x[r : r + n], tmp[:n], absmax[r : r + n]
        torch.amax(torch.abs(xc, out=q), dim=1, out=a)  # NaN propagates
        if not bool(torch.isfinite(a).all()):  # before any NaN meets an int8 cast
            raise NonFiniteError("cannot quantise NaN or infinite values to int8")
        # x / a is at most 1 in magnitude (a correctly rounded division), so |q| <= 127 with
        # no clamp; dividing (not multiplying by 127 / a) keeps subnormal absmax values finite
        safe = torch.where(a > 0, a, 1.0).unsqueeze(1)
        torch.div(xc, safe, out=q)
        q.mul_(QMAX).round_()
        codes[r : r + n].copy_(q)


def dequantize(
    frame: memoryview, numel: int, block: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Float32 values (flat, ``numel``) of a frame whose size the caller has checked against
    ``frame_nbytes(numel, block)``, for a tensor to be restored as ``dtype``. Every decoded
    value is finite in ``dtype``: absmax values must be finite, non-negative and within
    ``dtype``'s range, and the code -128 (never sent by :func:`quantize`) is refused in blocks
    where ``128 / 127 * absmax`` would leave that range."""
    nb = n_blocks(numel, block)
    if frame.nbytes != 4 * nb + numel:  # callers check first; this guards direct use
        raise BadRequestError(f"int8 frame of {frame.nbytes} bytes, expected {4 * nb + numel}")
    if frame.readonly:  # e.g. bytes: torch tensors must not alias immutable memory
        frame = memoryview(bytearray(frame))
    elif frame.ndim != 1 or frame.format != "B":
        frame = frame.cast("B")
    absmax = torch.from_numpy(np.frombuffer(frame, np.float32, nb))
    limit = min(float(torch.finfo(dtype).max), _FLOAT32_MAX)
    ok = (absmax >= 0) & (absmax <= limit)  # False for NaN and infinities
    if not bool(ok.all()):
        bad = absmax[~ok][0].item()
        if not math.isfinite(bad):
            raise NonFiniteError(f"int8 frame holds a non-finite block scale ({bad})")
        if bad < 0:
            raise BadRequestError(f"int8 frame holds a negative block scale ({bad})")
        raise BadRequestError(f"int8 block scale {bad:g} is beyond {dtype}'s range")
    step = _step(absmax)
    codes = torch.from_numpy(np.frombuffer(frame, np.int8, numel, offset=4 * nb))
    out = torch.empty(numel, dtype=torch.float32)
    full = numel // block
    parts = []  # (codes, absmax, step, out) with one row per block
    if full:
        parts.append((codes[: full * block].view(full, block), absmax[:full], step[:full],
                      out[: full * block].view(full, block)))
    if numel > full * block:
        parts.append((codes[full * block :].view(1, -1), absmax[full:], step[full:],
                      out[full * block :].view(1, -1)))
    for c, a, s, o in parts:
        edge = a > limit * (QMAX / 128)
        if bool(edge.any()) and bool((c[edge.nonzero().squeeze(1)] == -128).any()):
            raise BadRequestError(f"int8 code -128 would decode beyond {dtype}'s range")
        _decode(c, s.unsqueeze(1), o)
        tiny = a < TINY_ABSMAX
        if bool(tiny.any()):  # subnormal steps are imprecise: these blocks go through float64
            rows = tiny.nonzero().squeeze(1)
            o[rows] = (c[rows].double() * (a[rows].double() / QMAX).unsqueeze(1)).float()
    return out


def _step(absmax: torch.Tensor) -> torch.Tensor:
    """``absmax / 127`` rounded towards zero, so that ``127 * step`` never exceeds the absmax
    (a block whose absmax is float32's largest value must not decode to infinity)."""
    exact = absmax.double() / QMAX
    step = exact.float()
    too_big = step.double() > exact
    if bool(too_big.any()):
        step = torch.where(too_big, torch.nextafter(step, torch.zeros_like(step)), step)
    return step


def _decode(codes: torch.Tensor, step: torch.Tensor, out: torch.Tensor) -> None:
    """``out = codes * step`` row-wise, in chunks that stay in cache: a cast then an in-place
    scale (faster than one int8 x float32 multiply, which takes torch's slow mixed-type path)."""
    rows = max(1, CHUNK // codes.shape[1])
    for r in range(0, codes.shape[0], rows):
        o = out[r : r + rows]
        o.copy_(codes[r : r + rows])
        o.mul_(step[r : r + rows])
