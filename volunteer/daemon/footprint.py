"""Keep a daemon's resident memory close to what torch itself needs.

Measured on this project's CPU build of torch 2.13 (Python 3.11, 2 cores): ``import torch``
alone holds ~143 MiB of private memory (USS); a serving demo daemon held ~275 MiB. Most of
the difference was not the node's work but imports and per-thread allocator state:

- **torch._dynamo** (the ``torch.compile`` front end, with sympy and mpmath: ~800 modules,
  ~68 MiB USS, 3-7 s of start-up CPU) is imported by every ``torch.optim`` optimizer the
  first time it is built or stepped, although a daemon never compiles anything: the
  optimizer methods are wrapped so that *if* dynamo traced them it would skip them
  (``torch._disable_dynamo``) or break the graph around them (``_use_grad_for_differentiable``
  calls ``torch._dynamo.graph_break()``, a no-op in eager mode). :func:`keep_dynamo_unloaded`
  gives those wrappers their eager meaning without importing dynamo.
- **glibc malloc arenas**: every thread that allocates gets its own arena, and the daemon
  runs ~8 threads (trio, ZeroMQ, runtime, checkpointer, control server...).
  :func:`daemon_environment` caps them with ``MALLOC_ARENA_MAX`` (read by glibc at process
  start, so it is set for the daemon by ``volunteer join`` re-executing itself).

:func:`measure` reads a process's RSS, USS and PSS (``/proc/<pid>/smaps`` through psutil);
``scripts/bench_scale.py`` and the tests use it.

Nothing here changes what a node computes; every patch checks that torch's code is the
shape it expects and otherwise leaves torch alone (the daemon then just uses more memory).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("volunteer.daemon.footprint")

# glibc reads this at process start only: two arenas are plenty for a node whose threads
# mostly wait on sockets (the default is 8 per core).
ARENA_ENV = {"MALLOC_ARENA_MAX": "2"}
REEXEC_MARK = "VOLUNTEER_FOOTPRINT_SET"


def daemon_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` before the daemon process starts (never overriding
    what the user set); empty when nothing is missing."""
    return {k: v for k, v in ARENA_ENV.items() if k not in environ}


def reexec_with_daemon_environment(argv: list[str]) -> None:
    """Re-execute this process once with :func:`daemon_environment` added, if anything is
    missing (the allocator reads it only at start-up). Returns when nothing is to do, when
    already re-executed, or when the exec fails (the daemon then runs as it is)."""
    if os.environ.get(REEXEC_MARK):
        return
    missing = daemon_environment(os.environ)
    if not missing:
        return
    env = {**os.environ, **missing, REEXEC_MARK: "1"}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *argv], env)
    except OSError as exc:  # e.g. a frozen or unusual interpreter: not worth failing the join
        log.debug("cannot re-execute with %s: %s", missing, exc)


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
