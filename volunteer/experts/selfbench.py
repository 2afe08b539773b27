"""A short throughput self-benchmark per (device, expert spec), cached in the node home.

On the first join with a given device and expert architecture, the daemon times a few
forward and forward+backward passes of a fresh expert at a realistic batch size (about a
quarter of a second in total) and stores samples/s in ``<home>/cache/selfbench.json``; later
joins read the cache and start at once. The figure is shown by ``volunteer join`` and
``volunteer status`` (and is what an assignment policy would weigh nodes by).

The same cache holds the CPU thread choice behind ``torch_threads = auto``
(``cached_thread_choice``): the serving work of one batch (forward, backward, optimizer
step of a fresh expert) is timed at each candidate intra-op thread count, in rounds that
alternate the order (a drift in the machine's load favours no candidate), and
``choose_threads`` keeps the fewest threads within ``THREAD_MARGIN`` of the best rate, since
a thread that buys almost nothing still takes a core from the IO threads and the clients.
Measured once per (device model, expert spec, batch, candidates), then read from the cache.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from volunteer.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

MAX_CACHE_BYTES = 1024 * 1024
MAX_CACHE_ENTRIES = 256
CACHE_VERSION = 1
THREAD_MARGIN = 0.05  # fewer threads win unless more are at least this much faster
THREAD_ROUNDS = 3  # measurement rounds per candidate (order alternates; the best counts)
THREAD_BUDGET_S = 0.3  # seconds per candidate and round (at least MIN_ITERS iterations)
MIN_ITERS = 2


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
    _store(cache_file, key, entry)
    return {**entry, "cached": False}


def _store(cache_file: Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``key`` (re-reading the file first) and keep the newest entries."""
    doc = {**read_cache(cache_file), key: entry}
    if len(doc) > MAX_CACHE_ENTRIES:  # keep the newest entries only
        doc = dict(sorted(doc.items(), key=_age_key)[-MAX_CACHE_ENTRIES:])
    _write_cache(cache_file, doc)


def _age_key(item: tuple[str, Any]) -> float:
    when = item[1].get("measured_at") if isinstance(item[1], dict) else None
    return float(when) if isinstance(when, (int, float)) and not isinstance(when, bool) else 0.0


# ------------------------------------------------------------------ thread choice (CPU)

def candidate_threads(cpus: int) -> list[int]:
    """Thread counts worth timing on ``cpus`` usable CPUs: all of them up to 4, beyond that
    powers of two plus ``cpus - 1`` (one core left to IO) and ``cpus``."""
    if cpus <= 4:
        return list(range(1, max(1, cpus) + 1))
    counts = {1, cpus - 1, cpus}
    n = 2
    while n < cpus:
        counts.add(n)
        n *= 2
    return sorted(counts)


def choose_threads(rates: Mapping[int, float], margin: float = THREAD_MARGIN) -> int:
    """The fewest threads whose rate (samples/s) is within ``margin`` of the best one."""
    valid = {int(n): float(r) for n, r in rates.items() if int(n) >= 1 and r == r and r > 0}
    if not valid:
        raise ValueError("no thread count has a positive rate")
    best = max(valid.values())
    return min(n for n, r in valid.items() if r >= best * (1.0 - margin))


def time_threads(
    step: Callable[[], None], candidates: Sequence[int], batch_size: int,
    budget_s: float = THREAD_BUDGET_S, rounds: int = THREAD_ROUNDS,
    set_threads: Callable[[int], None] | None = None,
) -> dict[int, float]:
    """Samples/s of ``step`` (one batch of serving work) at each thread count: the best of
    ``rounds`` rounds, the order reversed every other round. Leaves torch's thread count as
    it found it."""
    import torch

    setter = set_threads or torch.set_num_threads
    before = torch.get_num_threads()
    best: dict[int, float] = {}
    try:
        for r in range(rounds):
            for n in candidates if r % 2 == 0 else list(candidates)[::-1]:
                setter(n)
                step()  # the first batch at a new count pays for spinning up the pool
                iters, start = 0, time.perf_counter()
                while True:
                    step()
                    iters += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= budget_s and iters >= MIN_ITERS:
                        break
                best[n] = max(best.get(n, 0.0), iters * batch_size / elapsed)
    finally:
        setter(before)
    return best


def serving_step(kind: str, hidden_dim: int, options: Mapping[str, Any], batch_size: int) -> Callable[[], None]:
    """One batch of what the CPU serving loop does: forward, backward, Adam step (fused)."""
    import torch

    from volunteer.experts.backend import OptimizerSpec
    from volunteer.experts.registry import build_expert

    module = build_expert(kind, hidden_dim, **dict(options))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = OptimizerSpec("adam", 1e-4).build(params)
    shapes = [tuple(s) for s in getattr(module, "input_shapes", [(hidden_dim,)])]
    inputs = [torch.randn(batch_size, *s) for s in shapes]

    def step() -> None:
        xs = [x.detach().requires_grad_(True) for x in inputs]
        module(*xs).sum().backward()  # see ``measure``: no sympy import
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def cached_thread_choice(
    cache_file: Path, device_name: str, kind: str, hidden_dim: int, options: Mapping[str, Any],
    batch_size: int, candidates: Sequence[int],
) -> dict[str, Any]:
    """The CPU thread count for ``torch_threads = auto``, measured once and cached.

    Returns ``{"threads", "rates" (samples/s by count), "measured_at", "cached"}``.
    """
    cands = sorted({int(n) for n in candidates if int(n) >= 1}) or [1]
    key = "threads|" + cache_key(device_name, kind, hidden_dim, options, batch_size) + f"|c={cands}"
    doc = read_cache(cache_file)
    entry = doc.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("rates"), dict):
        try:
            rates = {int(n): float(r) for n, r in entry["rates"].items()}
            if set(rates) == set(cands):
                return {"threads": choose_threads(rates), "rates": rates,
                        "measured_at": entry.get("measured_at"), "cached": True}
        except (TypeError, ValueError):
            pass  # a damaged entry: measure again
    if len(cands) == 1:
        rates = {cands[0]: 1.0}
    else:
        rates = time_threads(serving_step(kind, hidden_dim, options, batch_size), cands, batch_size)
    entry = {"rates": {str(n): round(r, 1) for n, r in rates.items()}, "measured_at": time.time()}
    _store(cache_file, key, entry)
    return {"threads": choose_threads(rates), "rates": rates, "measured_at": entry["measured_at"],
            "cached": False}


def thread_chooser(
    cache_file: Path, device_name: str, kind: str, hidden_dim: int, options: Mapping[str, Any],
    batch_size: int,
) -> Callable[[list[int]], int]:
    """``choose(candidates) -> threads`` for ``volunteer.daemon.hardware.apply_torch_threads``:
    ``cached_thread_choice`` for this expert spec, logged (one line)."""

    def choose(candidates: list[int]) -> int:
        pick = cached_thread_choice(cache_file, device_name, kind, hidden_dim, options, batch_size,
                                    candidates)
        rates = ", ".join(f"{n}: {r:.0f}" for n, r in sorted(pick["rates"].items()))
        log.info("torch threads: %d, the fewest within %d%% of the fastest serving step "
                 "(batch %d; samples/s by thread count %s%s)", pick["threads"],
                 round(THREAD_MARGIN * 100), batch_size, rates, "; cached" if pick["cached"] else "")
        return int(pick["threads"])

    return choose
