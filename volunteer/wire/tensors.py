"""Tensor <-> frame conversion without pickle and, where possible, without copies.

A tensor travels as a *spec* ``[wire_dtype, shape, restore_dtype_or_None]`` in the msgpack
header plus one raw little-endian frame holding exactly ``numel * itemsize`` bytes.
Supported dtypes: float32, float16, bfloat16. With ``compression="fp16"`` float32 tensors
travel as float16 and are restored to float32 on arrival (half the bytes, ~3 decimal digits).
Decoding validates every spec against :class:`WireLimits` before touching the payload and
wraps the received buffer with ``torch.frombuffer``: zero-copy for writable buffers (zmq
frames); read-only ones (``bytes``) are copied once so a tensor never aliases immutable memory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

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
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; use None or 'fp16'")
    t = tensor.detach()
    name = dtype_name(t.dtype)
    restore = None
    if compression == "fp16" and t.dtype == torch.float32:
        t = t.to(torch.float16)
        restore, name = name, "float16"
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
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
    if not isinstance(name, str) or name not in DTYPES:
        raise BadRequestError(f"unsupported dtype {name!r}; use one of {sorted(DTYPES)}")
    if restore is not None and (not isinstance(restore, str) or restore not in DTYPES):
        raise BadRequestError(f"unsupported restore dtype {restore!r}")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise BadRequestError(f"shape must be a list of at most {MAX_NDIM} ints")
    dims = []
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise BadRequestError(f"bad shape {shape!r}: dimensions must be non-negative ints")
        dims.append(d)
    return DTYPES[name], tuple(dims), (DTYPES[restore] if restore else None)


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
    parsed = [_validate_spec(s) for s in specs]
    total_elements = 0
    total_bytes = 0
    for (dtype, shape, _), frame in zip(parsed, frames, strict=True):
        if any(d > limits.max_elements for d in shape):
            raise TooLargeError(f"dimension of {max(shape)} > max_elements {limits.max_elements}")
        numel = 1
        for d in shape:
            numel *= d
            if numel > limits.max_elements:
                break
        total_elements += numel
        if total_elements > limits.max_elements:
            raise TooLargeError(f"too many elements: > {limits.max_elements}")
        nbytes = numel * ITEMSIZE[dtype]
        total_bytes += nbytes
        if total_bytes > limits.max_bytes:
            raise TooLargeError(f"payload too large: > {limits.max_bytes} bytes")
        if memoryview(frame).nbytes != nbytes:
            raise BadRequestError(
                f"frame of {memoryview(frame).nbytes} bytes does not match shape {list(shape)} of {DTYPE_NAMES[dtype]}"
            )
    out = []
    for (dtype, shape, restore), frame in zip(parsed, frames, strict=True):
        out.append(_wrap(frame, dtype, shape, restore))
    return out


def _wrap(
    frame: bytes | memoryview,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    restore: torch.dtype | None,
) -> torch.Tensor:
    mv = memoryview(frame).cast("B")
    if mv.nbytes == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        if mv.readonly:  # e.g. bytes: torch would alias immutable memory; take a private copy
            mv = memoryview(bytearray(mv))
        t = torch.frombuffer(mv, dtype=dtype).view(shape)
    if restore is not None and restore != dtype:
        t = t.to(restore)
    return t
