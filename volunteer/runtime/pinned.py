"""Pinned (page-locked) host memory for GPU nodes: request frames land in it straight from
the socket, so a tensor goes from the kernel's socket buffer to the GPU with no copy in
between and its upload can run asynchronously (``non_blocking``), overlapping compute.

``frame_alloc_for(device)`` is the ``alloc`` hook a node passes to its ``ZmqFrontend``: on a
CUDA device, frames of ``PINNED_MIN`` bytes or more come from torch's caching host allocator
(blocks are reused as requests come and go, so the driver registers memory once, not per
request); smaller frames (headers, tiny tensors) and CPU nodes keep the default buffers.
Pinned memory is bounded by what the byte budget lets a node hold (``max_queued_bytes``):
a frame's buffer is allocated only after its bytes were reserved.
"""

from __future__ import annotations

import numpy as np
import torch

from volunteer.runtime.zmtp_conn import UNINIT_MIN, Alloc, default_alloc

PINNED_MIN = UNINIT_MIN  # below this a frame is not worth a pinned block


def pinned_alloc(size: int) -> bytearray | np.ndarray:
    """A frame buffer of ``size`` bytes: pinned host memory from ``PINNED_MIN`` bytes."""
    if size < PINNED_MIN:
        return default_alloc(size)
    return torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy()


def frame_alloc_for(device: str | torch.device) -> Alloc | None:
    """The frontend's frame allocator for a node computing on ``device`` (None: the default)."""
    return pinned_alloc if torch.device(device).type == "cuda" else None
