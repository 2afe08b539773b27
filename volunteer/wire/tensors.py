"""Tensor <-> frame conversion without pickle and, where possible, without copies.

A tensor travels as a *spec* in the msgpack header plus one raw little-endian frame:

- ``[wire_dtype, shape, restore_dtype_or_None]``: the frame holds exactly
  ``numel * itemsize`` bytes of ``wire_dtype`` (float32, float16, bfloat16);
- ``["int8", shape, restore_dtype, block]``: the frame is 8-bit blockwise quantised
  (``quant.py``: a float32 absmax per ``block`` values, then one int8 code per value).

Compressions (``COMPRESSIONS``, defined once in ``volunteer.wire``; the client picks one per
call, the reply comes back in the same): ``None`` sends tensors as they are; ``"fp16"`` /
``"bf16"`` send float32 tensors as float16 / bfloat16 (half the bytes; float16 keeps ~3
decimal digits and overflows above 65504, bfloat16 keeps float32's range with ~2 digits) and
restore float32 on arrival; ``"int8"`` quantises every non-empty float tensor (1.0625 bytes
per value, error <= absmax(block) / 254, see ``quant.py``) and restores its dtype.

Decoding validates every spec against :class:`WireLimits` before touching the payload
(elements, and bytes as the larger of the frame and the restored tensor, so a 4x expansion
of int8 into float32 is counted before it is allocated) and wraps the received buffer as a
tensor (a numpy view + ``torch.from_numpy``, cheaper than ``torch.frombuffer().view()``):
zero-copy for writable buffers (zmq frames) of unquantised tensors; read-only ones
(``bytes``) are copied once so a tensor never aliases immutable memory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

from volunteer.wire import COMPRESSIONS, quant
from volunteer.wire.errors import BadRequestError, TooLargeError
from volunteer.wire.limits import WireLimits

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[torch.dtype, int] = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
_NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16)}
_CAST = {"fp16": ("float16", torch.float16), "bf16": ("bfloat16", torch.bfloat16)}
MAX_NDIM = 8
__all__ = ["COMPRESSIONS", "DTYPES", "ITEMSIZE", "dtype_name", "frames_to_tensors",
           "tensor_to_frame"]

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("volunteer.wire needs a little-endian host")


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a dtype; ValueError for unsupported ones."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(DTYPES)}") from None


def tensor_to_frame(
    tensor: torch.Tensor, compression: str | None = None, restore: torch.dtype | None = None
) -> tuple[list, memoryview]:
    """The header spec and a zero-copy buffer for one tensor (copies only to cast, quantise,
    contiguate or bring to the CPU). ``compression``: one of ``COMPRESSIONS``; "int8" raises
    ``NonFiniteError`` on NaN or infinity (an 8-bit code has no such value). ``restore``: the
    caller already cast the tensor to the compression's 16-bit dtype (a GPU node casts on the
    device, then copies half the bytes back): it travels as is and the receiver restores
    ``restore``; a tensor not in that 16-bit dtype is restored to ``restore`` here first."""
    t = tensor.detach() if tensor.requires_grad else tensor
    if restore is not None and restore != t.dtype:
        cast = _CAST.get(compression or "")
        if cast is not None and t.dtype == cast[1] and restore in DTYPE_NAMES:
            return _frame(t, cast[0], DTYPE_NAMES[restore])
        t = t.to(restore)
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise ValueError(f"unsupported dtype {t.dtype}; use one of {sorted(DTYPES)}")
    back = None  # the restore dtype's name in the spec
    if compression is not None:
        cast = _CAST.get(compression)
        if cast is not None:
            if t.dtype == torch.float32:
                back, (name, dtype) = name, cast
                t = t.to(dtype)
        elif compression == "int8":
            if t.numel():
                q = quant.quantize(t, quant.BLOCK)  # on t's device, then to the host
                return [quant.WIRE_DTYPE, list(t.shape), name, quant.BLOCK], memoryview(q.numpy())
        else:
            raise ValueError(f"unknown compression {compression!r}; use one of {COMPRESSIONS}")
    return _frame(t, name, back)


def _frame(t: torch.Tensor, name: str, restore: str | None) -> tuple[list, memoryview]:
    """Spec and zero-copy host buffer of ``t``, which already has the wire dtype ``name``."""
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if not t.numel():
        buf = memoryview(b"")
    elif t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the same bytes
        buf = memoryview(t.view(torch.int16).numpy())
    else:
        buf = memoryview(t.numpy())
    return [name, list(t.shape), restore], buf


Spec = tuple[torch.dtype | None, tuple[int, ...], torch.dtype | None, int]
"""A validated spec: (wire dtype or None for int8, shape, restore dtype, int8 block or 0)."""


def _validate_spec(spec: object, quantized: bool) -> Spec:
    if not isinstance(spec, (list, tuple)) or len(spec) not in (3, 4):
        raise BadRequestError(
            "tensor spec must be [dtype, shape, restore_dtype] or [\"int8\", shape, dtype, block]"
        )
    name, shape, restore = spec[:3]
    block = 0
    if len(spec) == 4:
        if name != quant.WIRE_DTYPE:
            raise BadRequestError(f"a 4-element spec must be int8, got {name!r}")
        if not quantized:
            raise BadRequestError("int8 tensors are not accepted here")
        block = spec[3]
        if not quant.valid_block(block):
            raise BadRequestError(
                f"bad int8 block {block!r}: a power of two in [{quant.MIN_BLOCK}, {quant.MAX_BLOCK}]"
            )
        dtype = None
        if restore is None:
            raise BadRequestError("an int8 spec must name the dtype it restores")
    else:
        dtype = DTYPES.get(name) if type(name) is str else None
        if dtype is None:
            raise BadRequestError(f"unsupported dtype {name!r}; use one of {sorted(DTYPES)}")
    restore_dtype = None
    if restore is not None:
        restore_dtype = DTYPES.get(restore) if type(restore) is str else None
        if restore_dtype is None:
            raise BadRequestError(f"unsupported restore dtype {restore!r}")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise BadRequestError(f"shape must be a list of at most {MAX_NDIM} ints")
    for d in shape:
        if type(d) is not int or d < 0:  # exact type: rejects bools and floats
            raise BadRequestError(f"bad shape {shape!r}: dimensions must be non-negative ints")
    return dtype, tuple(shape), restore_dtype, block


def frames_to_tensors(
    specs: object,
    frames: Sequence[bytes | memoryview],
    limits: WireLimits,
    *,
    quantized: bool = True,
    restore: bool = True,
    restores: list[torch.dtype | None] | None = None,
) -> list[torch.Tensor]:
    """Validate specs against frames and limits, then wrap each frame as a tensor (or
    dequantise it). ``quantized=False`` refuses int8 specs (``BadRequestError``).
    ``restore=False`` leaves 16-bit tensors in their wire dtype (a GPU node casts them on the
    device after uploading half the bytes; int8 frames are still dequantised); ``restores``
    then receives, per tensor, the dtype the sender asked to restore (None: as it is)."""
    if not isinstance(specs, (list, tuple)):
        raise BadRequestError("tensor specs must be a list")
    if len(specs) > limits.max_tensors or len(frames) > limits.max_tensors:
        raise TooLargeError(
            f"too many tensors: {max(len(specs), len(frames))} > {limits.max_tensors}"
        )
    if len(specs) != len(frames):
        raise BadRequestError(
            f"header describes {len(specs)} tensors but {len(frames)} frames came"
        )
    max_elements = limits.max_elements
    parsed = []
    total_elements = 0
    total_bytes = 0
    for spec, frame in zip(specs, frames, strict=True):
        dtype, shape, back, block = _validate_spec(spec, quantized)
        numel = 1
        for d in shape:
            if d > max_elements:
                raise TooLargeError(f"dimension of {d} > max_elements {max_elements}")
            numel *= d  # each factor <= max_elements and at most MAX_NDIM of them: bounded
        total_elements += numel
        if total_elements > max_elements:
            raise TooLargeError(f"too many elements: > {max_elements}")
        if dtype is None:  # int8: dequantised into float32 first, whatever it restores
            nbytes = quant.frame_nbytes(numel, block)
            held = max(nbytes, 4 * numel)
        else:
            nbytes = numel * ITEMSIZE[dtype]
            held = nbytes if back is None else max(nbytes, numel * ITEMSIZE[back])
        total_bytes += held  # what decoding allocates, counted before it does
        if total_bytes > limits.max_bytes:
            raise TooLargeError(f"payload too large: > {limits.max_bytes} bytes")
        mv = frame if type(frame) is memoryview else memoryview(frame)
        if mv.nbytes != nbytes:
            what = f"int8 (block {block})" if dtype is None else DTYPE_NAMES[dtype]
            raise BadRequestError(
                f"frame of {mv.nbytes} bytes does not match shape {list(shape)} of {what}"
            )
        parsed.append((mv, dtype, shape, back, block))
    out = [
        _wrap(mv, dtype, shape, back if restore else None) if dtype is not None
        else _dequantize(mv, shape, back, block)
        for mv, dtype, shape, back, block in parsed
    ]
    if restores is not None:
        restores[:] = [
            back if dtype is not None and not restore and back != dtype else None
            for _, dtype, _, back, _ in parsed
        ]
    return out


def _dequantize(
    mv: memoryview, shape: tuple[int, ...], restore: torch.dtype | None, block: int
) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    dtype = restore or torch.float32
    t = quant.dequantize(mv, numel, block, dtype).view(shape)
    return t if dtype == torch.float32 else t.to(dtype)


def _wrap(
    mv: memoryview,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    restore: torch.dtype | None,
) -> torch.Tensor:
    if mv.nbytes == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        if mv.readonly:  # e.g. bytes: torch would alias immutable memory; take a private copy
            mv = memoryview(bytearray(mv))
        elif mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if np_dtype is not None:  # numpy wraps a buffer with a shape in one cheap call
            t = torch.from_numpy(np.ndarray(shape, dtype=np_dtype, buffer=mv))
        else:  # bfloat16: numpy has none
            t = torch.frombuffer(mv, dtype=dtype).view(shape)
    if restore is not None and restore != dtype:
        t = t.to(restore)
    return t
