"""A short throughput self-benchmark per (device, expert spec), cached in the node home.

On the first join with a given device and expert architecture, the daemon times a few
forward and forward+backward passes of a fresh expert at a realistic batch size (about a
quarter of a second in total) and stores samples/s in ``<home>/cache/selfbench.json``; later
joins read the cache and start at once. The figure is shown by ``volunteer join`` and
``volunteer status`` (and is what an assignment policy would weigh nodes by).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from volunteer.fsutil import atomic_write_bytes

MAX_CACHE_BYTES = 1024 * 1024
MAX_CACHE_ENTRIES = 256
CACHE_VERSION = 1


def cache_key(device_name: str, kind: str, hidden_dim: int, options: Mapping[str, Any], batch_size: int) -> str:
    """Everything a measurement depends on, as one string (device *model*, not index)."""
    import torch

    opts = json.dumps(dict(sorted(options.items())), sort_keys=True)
    return f"v{CACHE_VERSION}|torch {torch.__version__}|{device_name}|{kind}|h={hidden_dim}|{opts}|b={batch_size}"


def measure(
    kind: str, hidden_dim: int, options: Mapping[str, Any], device: str, batch_size: int, budget_s: float = 0.25
) -> dict[str, float]:
    """Time forward and forward+backward of a fresh expert; returns samples/s for both."""
    import torch

    from volunteer.experts.registry import build_expert

    module = build_expert(kind, hidden_dim, **dict(options)).to(device)
    shapes = [tuple(s) for s in getattr(module, "input_shapes", [(hidden_dim,)])]
    inputs = [torch.randn(batch_size, *s, device=device) for s in shapes]

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    def run(train: bool) -> float:
        iters, start = 0, time.perf_counter()
        while True:
            if train:
                xs = [x.detach().requires_grad_(True) for x in inputs]
                out = module(*xs)
                # sum() then a scalar backward: the same all-ones output gradient, but
                # backward(tensor) checks its shape with torch.fx's symbolic shapes, whose
                # first use imports sympy: ~40 MiB for the rest of the daemon's life
                out.sum().backward()
            else:
                with torch.no_grad():
                    module(*inputs)
            sync()
            iters += 1
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s / 2 or iters >= 50:
                return iters * batch_size / elapsed

    run(train=True)  # warm-up: allocator, kernels, lazy init
    module.zero_grad(set_to_none=True)
    forward = run(train=False)
    train = run(train=True)
    return {"forward_samples_per_s": round(forward, 1), "train_samples_per_s": round(train, 1),
            "batch_size": batch_size, "measured_at": time.time()}


def read_cache(path: Path) -> dict[str, Any]:
    """The cache document (measurements by key); {} when absent, oversized or unreadable."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CACHE_BYTES + 1)
        doc = json.loads(data) if len(data) <= MAX_CACHE_BYTES else {}
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_cache(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(doc, indent=1, sort_keys=True).encode())


def cached_throughput(
    cache_file: Path,
    device: str,
    device_name: str,
    kind: str,
    hidden_dim: int,
    options: Mapping[str, Any],
    batch_size: int,
) -> dict[str, Any]:
    """Cached measurement for this (device model, expert spec), measuring on a miss.

    The result carries ``"cached": True`` when it came from the cache.
    """
    key = cache_key(device_name, kind, hidden_dim, options, batch_size)
    doc = read_cache(cache_file)
    entry = doc.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("train_samples_per_s"), (int, float)):
        return {**entry, "cached": True}
    entry = measure(kind, hidden_dim, options, device, batch_size)
    doc[key] = entry
    if len(doc) > MAX_CACHE_ENTRIES:  # keep the newest entries only
        newest = sorted(doc.items(), key=lambda kv: kv[1].get("measured_at", 0) if isinstance(kv[1], dict) else 0)
        doc = dict(newest[-MAX_CACHE_ENTRIES:])
    _write_cache(cache_file, doc)
    return {**entry, "cached": False}
