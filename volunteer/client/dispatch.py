"""Parallel remote expert calls as one autograd node, with k_min and late-expert cut-off.

``RemoteMixtureOfExperts`` sends each chosen expert only the rows routed to it: one request
per expert per call. Calling ``RemoteExpert`` modules one after the other under autograd
would serialise the backward pass (torch's engine runs one CPU node at a time), so this
module wraps *all* the calls of one layer invocation into a single ``autograd.Function``:

- forward: every expert runs on a thread pool, each inside its own small autograd graph
  (``inputs -> RemoteExpert -> outputs``); waiting stops at the forward deadline, or
  ``timeout_after_k_min`` after every sample has ``k_min`` answers. Late or failed experts
  are dropped: their slots get zeros and ``mask`` False, so the caller's softmax is
  renormalised over the experts that answered;
- backward: ``torch.autograd.backward`` on each answered expert's small graph, again on the
  pool, so the remote backward requests overlap. Threads running backward on
  independent graphs run concurrently; RemoteExpert releases the GIL while it waits on
  its socket. An expert failing in backward contributes no input gradient (its server
  did not get the update either); backward never raises for a remote failure.

A forward refused with "paused" (the volunteer stopped taking work, ``volunteer pause``;
codes in ``REROUTE_CODES``) is retried once on another replica when the plan has a
``reroute(uid, expert, exc)`` callback that offers one (e.g. the layer asks its directory again,
which now passes over the paused server): in the same thread and within the same call's
deadline, so the layer sees one answer and the backward goes to the replica that computed
the forward. Without another replica the call fails like any other and is dropped.

Deadlines per call: an expert that exposes ``deadline(op)`` (``RemoteExpert``: adaptive,
from the latency its server showed, see ``latency.py``) is waited for at most that long
(plus a small grace, so that its own transport timeout normally fires first and says
more), and never longer than the layer's ``forward_timeout`` / ``backward_timeout``: a fast
server that hangs costs a few of its usual round trips, not the layer's whole timeout.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from volunteer.wire.errors import RemoteError, RemoteTimeoutError

__all__ = [
    "CallPlan", "CallReport", "CutOffError", "ExpertCall", "call_timeouts", "dispatch", "gather",
]

log = logging.getLogger(__name__)

#: a call is cut at ``deadline * DEADLINE_SLACK + DEADLINE_GRACE`` (its transport first)
DEADLINE_SLACK = 1.1
DEADLINE_GRACE = 0.05
#: forward refusals worth one retry on another replica (the server is fine, just not working now)
REROUTE_CODES = frozenset({"paused"})

#: (uid, the expert that refused, the refusal) -> another replica's expert module, or None
Reroute = Callable[[str, "torch.nn.Module", BaseException], "torch.nn.Module | None"]


class CutOffError(RemoteTimeoutError):
    """Code "timeout": still running ``timeout_after_k_min`` after every sample had its
    ``k_min`` answers. Merely slower than the others, unlike a call that hit the deadline."""


@dataclass
class ExpertCall:
    """One expert's share of a batch: which (sample, slot) pairs it answers."""

    uid: str
    expert: torch.nn.Module
    rows: torch.Tensor  # (n,) int64 sample indices
    slots: torch.Tensor  # (n,) int64 slot indices in [0, k)
    row_list: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.row_list = self.rows.tolist()


@dataclass
class CallReport:
    """What happened in one layer call (forward and, later, backward)."""

    answered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # uid -> "code: message"
    backward_answered: list[str] = field(default_factory=list)
    backward_failed: dict[str, str] = field(default_factory=dict)


@dataclass
class CallPlan:
    """Everything ``dispatch`` needs besides the input tensor."""

    calls: list[ExpertCall]
    batch: int
    k: int
    out_features: int
    pool: cf.ThreadPoolExecutor
    k_min: int
    forward_timeout: float | None
    backward_timeout: float | None
    timeout_after_k_min: float | None
    on_failure: Callable[[str, BaseException], None]
    report: CallReport = field(default_factory=CallReport)
    record: bool = True  # set by ``dispatch``: whether the caller records autograd graphs
    #: another replica after a "paused" refusal (``Reroute``); see the module docstring
    reroute: Reroute | None = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RemoteError):
        return f"{exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def call_timeouts(
    calls: Sequence[ExpertCall], op: str, layer_timeout: float | None
) -> list[float | None]:
    """Each call's own wait limit: the expert's ``deadline(op)`` (with slack) when it has
    one, capped by the layer's timeout; the layer's timeout otherwise."""
    out: list[float | None] = []
    for call in calls:
        own = getattr(call.expert, "deadline", None)
        limit = layer_timeout
        if callable(own):
            try:
                mine = float(own(op)) * DEADLINE_SLACK + DEADLINE_GRACE
            except Exception:  # a custom expert's deadline() must not break the step
                log.debug("deadline(%r) of %s failed", op, call.uid, exc_info=True)
            else:
                limit = mine if limit is None else min(limit, mine)
        out.append(limit)
    return out


def _forward_job(expert: torch.nn.Module, x: torch.Tensor, out_features: int, record: bool):
    # grad mode is per thread: record a graph only when the caller's forward does
    with torch.set_grad_enabled(record):
        inp = x.detach().requires_grad_(record)
        out = expert(inp)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], out_features):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"expert returned {shape}, expected {(x.shape[0], out_features)}")
    if not torch.isfinite(out).all():
        raise ValueError("expert returned non-finite values")
    return inp, out


def _forward_rerouted(call: ExpertCall, x: torch.Tensor, out_features: int, record: bool,
                      reroute: Reroute | None):
    """``_forward_job``; a refusal in ``REROUTE_CODES`` is retried once on the replica that
    ``reroute`` offers (``call.expert`` becomes it, so the backward goes there too)."""
    try:
        return _forward_job(call.expert, x, out_features, record)
    except RemoteError as exc:
        if reroute is None or exc.code not in REROUTE_CODES:
            raise
        try:
            other = reroute(call.uid, call.expert, exc)
        except Exception:  # a directory hiccup: the refusal stands
            log.debug("reroute of %s failed", call.uid, exc_info=True)
            other = None
        if other is None or other is call.expert:
            raise
        call.expert = other
        return _forward_job(other, x, out_features, record)


def _backward_job(inp: torch.Tensor, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # a full backward (not autograd.grad) so that an expert with local parameters (e.g. a
    # module given through expert_factory) accumulates their gradients like any layer
    torch.autograd.backward(out, grad)
    grad_inp = inp.grad
    if grad_inp is None:
        raise ValueError("expert produced no input gradient")
    if tuple(grad_inp.shape) != tuple(inp.shape) or not torch.isfinite(grad_inp).all():
        raise ValueError("expert returned a malformed input gradient")
    return grad_inp


def gather(
    futures: dict[cf.Future, int],
    calls: Sequence[ExpertCall],
    needed: list[int],
    timeout: float | None,
    timeout_after_k_min: float | None,
    on_late_failure: Callable[[int, BaseException], None] | None = None,
    per_call: Sequence[float | None] | None = None,
) -> tuple[dict[int, object], dict[int, BaseException]]:
    """Wait for ``futures`` (future -> call index) under the deadline rules.

    ``per_call[i]`` (seconds, optional) cuts call ``i`` earlier than ``timeout`` (a
    ``RemoteTimeoutError`` for that call only).

    ``needed[b]`` is how many answers sample ``b`` needs before the ``timeout_after_k_min``
    clock starts. Returns (results, failures) by call index; calls still running when
    waiting stops count as failed: ``CutOffError`` when the k_min grace period ended the
    wait, ``RemoteTimeoutError`` when the deadline did (their threads finish on their own,
    bounded by the transport timeout). If such a call later fails anyway (e.g. its server
    vanished), ``on_late_failure(index, exc)`` is called from the thread that ran it.
    """
    # Bookkeeping in plain Python ints: tiny torch ops (index_add_) here were measured to
    # stall for 100+ ms on 2 cores while other threads' OpenMP teams spin.
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    have = [0] * len(needed)
    short = sum(1 for n in needed if n > 0)
    quorum_deadline = None
    results: dict[int, object] = {}
    failures: dict[int, BaseException] = {}
    pending = set(futures)

    def quorum_check() -> float | None:
        if timeout_after_k_min is None or short > 0:
            return None
        return time.monotonic() + timeout_after_k_min

    quorum_deadline = quorum_check()
    own: dict[cf.Future, float] = {}
    if per_call is not None:
        for future, index in futures.items():
            limit = per_call[index]
            if limit is not None and (deadline is None or start + limit < deadline):
                own[future] = start + limit
    while pending:
        limits = [d for d in (deadline, quorum_deadline) if d is not None]
        limits.extend(own[f] for f in pending if f in own)
        wait_for = None if not limits else max(0.0, min(limits) - time.monotonic())
        done, pending = cf.wait(pending, timeout=wait_for, return_when=cf.FIRST_COMPLETED)
        now = time.monotonic()
        expired = {f for f in pending if f in own and own[f] <= now}
        for future in expired:
            pending.discard(future)
            index = futures[future]
            if not future.cancel() and on_late_failure is not None:
                future.add_done_callback(_late_callback(index, on_late_failure))
            failures[index] = RemoteTimeoutError(
                f"no answer within its own {own[future] - start:.3g}s deadline"
            )
        if not done and not expired:
            break
        for future in done:
            index = futures[future]
            exc = future.exception()
            if exc is None:
                results[index] = future.result()
                for b in calls[index].row_list:
                    have[b] += 1
                    if have[b] == needed[b]:
                        short -= 1
            else:
                failures[index] = exc
        if quorum_deadline is None:
            quorum_deadline = quorum_check()
    cut_off = quorum_deadline is not None and (deadline is None or quorum_deadline < deadline)
    waited = time.monotonic() - start
    for future in pending:
        if not future.cancel() and on_late_failure is not None:
            future.add_done_callback(_late_callback(futures[future], on_late_failure))
        if cut_off:
            exc: RemoteError = CutOffError(
                f"cut off {timeout_after_k_min}s after k_min answered ({waited:.2f}s in all)"
            )
        else:
            exc = RemoteTimeoutError(f"no answer within the {timeout}s deadline")
        failures[futures[future]] = exc
    return results, failures


def _late_callback(index: int, on_late_failure: Callable[[int, BaseException], None]):
    def callback(future: cf.Future) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            on_late_failure(index, exc)

    return callback


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: CallPlan, _dummy: torch.Tensor, x: torch.Tensor):  # type: ignore[override]
        outputs = x.new_zeros(plan.batch, plan.k, plan.out_features)
        mask = torch.zeros(plan.batch, plan.k, dtype=torch.bool, device=x.device)
        futures = {
            plan.pool.submit(
                _forward_rerouted, call, x[call.rows], plan.out_features, plan.record, plan.reroute
            ): i
            for i, call in enumerate(plan.calls)
        }
        needed = [plan.k_min] * plan.batch
        results, failures = gather(
            futures, plan.calls, needed, plan.forward_timeout, plan.timeout_after_k_min,
            on_late_failure=lambda i, exc: plan.on_failure(plan.calls[i].uid, exc),
            per_call=call_timeouts(plan.calls, "forward", plan.forward_timeout),
        )
        graphs = {}
        for i, (inp, out) in results.items():
            call = plan.calls[i]
            outputs[call.rows.to(x.device), call.slots.to(x.device)] = out.detach().to(outputs)
            mask[call.rows, call.slots] = True
            if plan.record:
                graphs[i] = (inp, out)
            plan.report.answered.append(call.uid)
        for i, exc in failures.items():
            uid = plan.calls[i].uid
            plan.report.failed[uid] = _describe(exc)
            plan.on_failure(uid, exc)
            if not isinstance(exc, RemoteError):  # a malformed answer or a bug: say where
                log.warning("expert %s dropped: %s", uid, _describe(exc), exc_info=exc)
        ctx.plan = plan
        ctx.graphs = graphs
        ctx.mark_non_differentiable(mask)
        return outputs, mask

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor, _grad_mask):  # type: ignore[override]
        plan: CallPlan = ctx.plan
        graphs = ctx.graphs
        ctx.graphs = None  # the remote graphs can be run only once
        if not graphs:
            return None, None, None
        futures = {}
        for i, (inp, out) in graphs.items():
            call = plan.calls[i]
            grad = grad_outputs[call.rows, call.slots].to(out)
            futures[plan.pool.submit(_backward_job, inp, out, grad)] = i
        answered = [0] * plan.batch
        for i in graphs:
            for b in plan.calls[i].row_list:
                answered[b] += 1
        needed = [min(n, plan.k_min) for n in answered]
        results, failures = gather(
            futures, plan.calls, needed, plan.backward_timeout, plan.timeout_after_k_min,
            on_late_failure=lambda i, exc: plan.on_failure(plan.calls[i].uid, exc),
            per_call=call_timeouts(plan.calls, "backward", plan.backward_timeout),
        )
        grad_x = None
        if results:
            # each (row, slot) pair belongs to one expert: place, then sum over slots
            width = next(iter(results.values())).shape[1]
            slots_grad = grad_outputs.new_zeros(plan.batch, plan.k, width)
            for i, grad_inp in results.items():
                call = plan.calls[i]
                slots_grad[call.rows, call.slots] = grad_inp.to(slots_grad)
                plan.report.backward_answered.append(call.uid)
            grad_x = slots_grad.sum(dim=1)
        for i, exc in failures.items():
            uid = plan.calls[i].uid
            plan.report.backward_failed[uid] = _describe(exc)
            plan.on_failure(uid, exc)
            log.debug("expert %s dropped in backward: %s", uid, _describe(exc))
        return None, None, grad_x


def dispatch(plan: CallPlan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``plan`` on ``x (batch, in_features)``.

    Returns ``outputs (batch, k, out_features)`` (zeros where no answer; differentiable
    w.r.t. ``x`` through the remote backward) and ``mask (batch, k)`` (True where the
    expert answered). When grad is enabled the outputs always require grad (through a
    throwaway leaf), so the remote backward (the experts' training step) runs even when
    ``x`` itself needs no gradient, e.g. a mixture right on the raw input.
    """
    plan.record = torch.is_grad_enabled()
    dummy = torch.empty(0, requires_grad=plan.record)
    return _Dispatch.apply(plan, dummy, x)
