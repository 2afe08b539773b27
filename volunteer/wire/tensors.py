"""Tensor <-> frame conversion without pickle and, where possible, without copies.

A tensor travels as a *spec* ``[wire_dtype, shape, restore_dtype_or_None]`` in the msgpack
header plus one raw little-endian frame holding exactly ``numel * itemsize`` bytes.
Supported dtypes: float32, float16, bfloat16. With ``compression="fp16"`` float32 tensors
travel as float16 and are restored to float32 on arrival (half the bytes, ~3 decimal digits).
Decoding validates every spec against :class:`WireLimits` before touching the payload and
wraps the received buffer as a tensor (a numpy view + ``torch.from_numpy``, cheaper than
``torch.frombuffer().view()``): zero-copy for writable buffers (zmq frames); read-only ones
(``bytes``) are copied once so a tensor never aliases immutable memory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

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
COMPRESSIONS = (None, "fp16")
MAX_NDIM = 8

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("volunteer.wire needs a little-endian host")


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a dtype; ValueError for unsupported ones."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(DTYPES)}") from None


def tensor_to_frame(
    tensor: torch.Tensor, compression: str | None = None
) -> tuple[list, memoryview]:
    """The header spec and a zero-copy buffer for one tensor (copies only to cast/contiguate/CPU)."""
    t = tensor.detach() if tensor.requires_grad else tensor
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise ValueError(f"unsupported dtype {t.dtype}; use one of {sorted(DTYPES)}")
    restore = None
    if compression is not None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; use None or 'fp16'")
        if t.dtype == torch.float32:
            t = t.to(torch.float16)
            restore, name = name, "float16"
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


def _validate_spec(spec: object) -> tuple[torch.dtype, tuple[int, ...], torch.dtype | None]:
    if not isinstance(spec, (list, tuple)) or len(spec) != 3:
        raise BadRequestError("tensor spec must be [dtype, shape, restore_dtype]")
    name, shape, restore = spec
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
    return dtype, tuple(shape), restore_dtype


def frames_to_tensors(
    specs: object, frames: Sequence[bytes | memoryview], limits: WireLimits
) -> list[torch.Tensor]:
    """Validate specs against frames and limits, then wrap each frame as a tensor."""
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
        dtype, shape, restore = _validate_spec(spec)
        numel = 1
        for d in shape:
            if d > max_elements:
                raise TooLargeError(f"dimension of {d} > max_elements {max_elements}")
            numel *= d  # each factor <= max_elements and at most MAX_NDIM of them: bounded
        total_elements += numel
        if total_elements > max_elements:
            raise TooLargeError(f"too many elements: > {max_elements}")
        nbytes = numel * ITEMSIZE[dtype]
        total_bytes += nbytes
        if total_bytes > limits.max_bytes:
            raise TooLargeError(f"payload too large: > {limits.max_bytes} bytes")
        mv = frame if type(frame) is memoryview else memoryview(frame)
        if mv.nbytes != nbytes:
            raise BadRequestError(
                f"frame of {mv.nbytes} bytes does not match shape {list(shape)} of {DTYPE_NAMES[dtype]}"
            )
        parsed.append((mv, dtype, shape, restore))
    return [_wrap(mv, dtype, shape, restore) for mv, dtype, shape, restore in parsed]


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
