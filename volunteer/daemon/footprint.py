"""Keep a daemon's resident memory close to what torch itself needs.

Measured (torch 2.13 CPU, Python 3.11, 2 cores; USS = memory private to the process):
``import torch`` alone holds ~143 MiB; a serving demo daemon held ~270 MiB. Beyond torch:

- **torch._dynamo** (the ``torch.compile`` front end, with sympy and mpmath: ~800 modules,
  ~70 MiB USS, 3-7 s of start-up CPU) was imported by the first ``torch.optim`` optimizer
  built or stepped, although a daemon never compiles anything: the optimizer methods are
  wrapped so that *if* dynamo traced them it would skip them (``torch._disable_dynamo``) or
  break the graph around them (``_use_grad_for_differentiable`` calls
  ``torch._dynamo.graph_break()``, a no-op in eager mode). :func:`keep_dynamo_unloaded`
  gives those wrappers their eager meaning without importing dynamo: 270 -> ~197 MiB.
- **libp2p** imports ~1000 modules (requests, httpx, zeroconf, aioquic, prometheus_client,
  dnspython, pycryptodome... for transports and services a node does not use): ~38 MiB,
  not avoidable from here.
- the CLI libraries (typer, rich, pydantic) ~5 MiB; the runtime, network state and threads
  ~6-10 MiB. Not worth it, measured: ``MALLOC_ARENA_MAX=2`` (0 MiB: the node's threads
  mostly wait), ``OMP_NUM_THREADS=1`` (0 MiB), ``malloc_trim`` after start (~1 MiB), and
  freeing the self-benchmark (its tensors are already freed: 0 MiB).

:func:`measure` reads a process's RSS, USS and PSS (``/proc/<pid>/smaps`` through psutil);
``scripts/bench_scale.py`` reports them per daemon.

Nothing here changes what a node computes; every patch checks that torch's code is the
shape it expects and otherwise leaves torch alone (the daemon then just uses more memory).
"""

from __future__ import annotations

import functools
import gc
import sys
import types
from collections.abc import Callable
from typing import Any


def keep_dynamo_unloaded() -> int:
    """Give torch.optim's dynamo wrappers their eager meaning so that building, stepping and
    checkpointing optimizers never imports ``torch._dynamo``. Returns how many wrappers were
    changed (0 when dynamo is already loaded or torch's code is not what this expects).

    Only for processes that never call ``torch.compile`` (a daemon): under compilation the
    optimizer would then be traced instead of skipped.
    """
    if "torch._dynamo" in sys.modules:
        return 0
    import torch.optim  # noqa: F401 - the wrappers are created when torch.optim is imported
    from torch import _compile as torch_compile
    from torch.optim import optimizer as torch_optimizer

    changed = _preset_disable_dynamo(torch_compile)
    changed += _unwrap_graph_breaks(torch_optimizer)
    return changed


def _preset_disable_dynamo(torch_compile: Any) -> int:
    """``torch._disable_dynamo(fn)`` returns a wrapper that, on first call, imports dynamo to
    build ``torch._dynamo.disable(fn)`` and caches it as ``fn.__dynamo_disable``. Outside
    compilation the disabled function behaves as ``fn``: cache ``fn`` itself."""
    factory = getattr(torch_compile, "_disable_dynamo", None)
    if factory is None:
        return 0
    probe = factory(lambda: None)
    code = getattr(probe, "__code__", None)
    if code is None:
        return 0
    changed = 0
    for obj in gc.get_objects():
        # type() and not isinstance(): isinstance may touch lazy proxies' __class__ (imports)
        if type(obj) is types.FunctionType and obj.__code__ is code and obj is not probe:
            fn = getattr(obj, "__wrapped__", None)
            if fn is not None and getattr(fn, "__dynamo_disable", None) is None:
                setattr(fn, "__dynamo_disable", fn)
                changed += 1
    return changed


def _unwrap_graph_breaks(torch_optimizer: Any) -> int:
    """Replace each optimizer class's ``step`` wrapped by ``_use_grad_for_differentiable``
    (which imports dynamo to call ``graph_break()``, a no-op in eager mode) with a wrapper
    that does the rest of the same: grad mode set from ``defaults['differentiable']``."""
    import torch

    factory = getattr(torch_optimizer, "_use_grad_for_differentiable", None)
    base = getattr(torch_optimizer, "Optimizer", None)
    if factory is None or base is None:
        return 0
    code = factory(lambda *a, **k: None).__code__
    changed = 0
    for cls in _subclasses(base):
        step = cls.__dict__.get("step")
        func = getattr(step, "__wrapped__", None)
        if type(step) is types.FunctionType and step.__code__ is code and func is not None:
            cls.step = _eager_use_grad(func, torch)  # not yet hooked: no optimizer was built
            changed += 1
    return changed


def _eager_use_grad(func: Callable[..., Any], torch: Any) -> Callable[..., Any]:
    def step(*args: Any, **kwargs: Any) -> Any:
        prev = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(args[0].defaults["differentiable"])
            return func(*args, **kwargs)
        finally:
            torch.set_grad_enabled(prev)

    functools.update_wrapper(step, func)
    return step


def _subclasses(cls: type) -> list[type]:
    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.append(sub)
                todo.append(sub)
    return out


def measure(pid: int | None = None) -> dict[str, float | int]:
    """RSS, USS (private to the process) and PSS (shared pages split among their users) in
    MiB, and the thread count, of ``pid`` (this process by default)."""
    import psutil

    proc = psutil.Process(pid)
    with proc.oneshot():
        mem = proc.memory_full_info()
        threads = proc.num_threads()
    mib = 2**20
    return {"rss_mib": round(mem.rss / mib, 1), "uss_mib": round(mem.uss / mib, 1),
            "pss_mib": round(getattr(mem, "pss", 0) / mib, 1), "threads": threads}
