"""Moving a batch between host and device: gather the tasks' tensors into one batch on the
expert's device (copy first, cast there), bring results back into pinned host memory
(optionally cast to a 16-bit wire dtype on the device first), and slice them per task in
the dtype each client expects. Used by ``BatchExecutor`` (``executor.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from volunteer.experts.backend import ExpertBackend
from volunteer.runtime.task_pool import Task


def gather(backend: ExpertBackend, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-task tensors into one batch tensor on the backend's device."""
    if backend.on_cpu:
        if len(parts) == 1:  # the common small-batch case: no copy at all
            p = parts[0]
            return p if p.dtype == backend.dtype else p.to(backend.dtype)
        return torch.cat([p if p.dtype == backend.dtype else p.to(backend.dtype) for p in parts])
    dtype = parts[0].dtype
    if any(p.dtype != dtype for p in parts):  # mixed wire dtypes (rare): cast on the host
        parts = [p.to(backend.dtype) for p in parts]
        dtype = backend.dtype
    if len(parts) == 1 and (parts[0].device.type != "cpu" or parts[0].is_pinned()):
        dev = parts[0].to(backend.device, non_blocking=True)  # received into pinned memory
    elif any(p.device.type != "cpu" for p in parts):
        dev = torch.cat([p.to(backend.device, non_blocking=True) for p in parts])
    else:
        rows = sum(p.shape[0] for p in parts)
        pinned = torch.empty((rows, *parts[0].shape[1:]), dtype=dtype, pin_memory=True)
        torch.cat(parts, out=pinned)
        dev = pinned.to(backend.device, non_blocking=True)
    return dev if dtype == backend.dtype else dev.to(backend.dtype)  # cast on the device


def to_host(
    backend: ExpertBackend,
    tensors: list[torch.Tensor],
    wire: torch.dtype | None = None,
    sync: bool = True,
) -> list[torch.Tensor]:
    """Queue the copy of results into pinned host memory (CUDA; valid once the batch's
    event has passed, or at once with ``sync``) or return them as is (CPU: callers
    pass tensors that carry no autograd graph). Pinned blocks come from torch's caching
    host allocator: reused batch after batch, never re-registered with the driver."""
    if backend.on_cpu:
        return tensors
    host = []
    for t in tensors:
        t = t.detach()
        if wire is not None and t.dtype == torch.float32:
            t = t.to(wire)  # the reply's wire dtype, cast on the device
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        host.append(h)
    if sync:
        torch.cuda.current_stream(backend.device).synchronize()
    return host


def wire_dtype(backend: ExpertBackend, tasks: Sequence[Task]) -> torch.dtype | None:
    """The 16-bit dtype a GPU batch's results are cast to on the device before they are
    copied back (half the bytes over PCIe, no cast on the host), when every task asked
    for that same 16-bit wire; None: results come back as computed."""
    if backend.on_cpu:
        return None
    wire = WIRE_16.get(tasks[0].compression or "")
    if wire is None or any(t.compression != tasks[0].compression for t in tasks):
        return None
    return wire


def split(
    tensor: torch.Tensor, tasks: Sequence[Task], dtypes: Sequence[torch.dtype]
) -> list[torch.Tensor]:
    """Each task's rows of ``tensor``, in that task's dtype (see ``reply_dtype``)."""
    if len(tasks) == 1 and tensor.shape[0] == tasks[0].rows:  # one task: no slicing
        return [tensor if tensor.dtype == dtypes[0] else tensor.to(dtypes[0])]
    out, start = [], 0
    for t, dtype in zip(tasks, dtypes, strict=True):
        part = tensor[start : start + t.rows]
        out.append(part if part.dtype == dtype else part.to(dtype))
        start += t.rows
    return out


WIRE_16 = {"fp16": torch.float16, "bf16": torch.bfloat16}


def reply_dtype(task: Task, i: int, wire: torch.dtype | None) -> torch.dtype:
    """The dtype reply tensor ``i`` of ``task`` is built in: the client's dtype (its input's,
    or its output gradient's when a backward omitted the inputs), or the 16-bit ``wire``
    dtype the device already cast a float32 result to (restored by the client)."""
    dtype = task.reply_dtype(i)
    return wire if wire is not None and dtype == torch.float32 else dtype


def restores(task: Task, tensors: list[torch.Tensor]) -> list[torch.dtype | None] | None:
    """Per reply tensor, the dtype the client restores where it travels in another one."""
    want = task.reply_dtypes(len(tensors))
    out = [d if x.dtype != d else None for x, d in zip(tensors, want, strict=True)]
    return out if any(out) else None


def upload(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` on ``like``'s device and in its dtype: copied first, cast on the device (a
    cast-and-copy in one ``to`` would cast on the host)."""
    if t.device != like.device:
        t = t.to(like.device, non_blocking=True)
    return t if t.dtype == like.dtype else t.to(like.dtype)
