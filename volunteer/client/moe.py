"""RemoteMixtureOfExperts: a torch layer whose experts live on volunteers' machines.

Per call: the gate scores each grid dimension; beam search (``beam_search.py``) finds up to
``k_best`` alive experts per sample through the directory; all chosen experts are called
in parallel with only the rows routed to them (``dispatch.py``); experts that fail or are
late are dropped and the softmax over the gate logits is renormalised over those that
answered (``gating.masked_softmax``). If a sample ends up with fewer than ``k_min``
answering experts the call raises ``NotEnoughExpertsError``, naming what went wrong.

Volunteers come and go: an expert that answered "draining" or "unknown_expert", could not
be reached, or did not answer before the forward/backward deadline is avoided by later
calls for ``avoid_for`` seconds (a small client-side blacklist with expiry), so a leaving
or vanished volunteer does not cost a timeout on every step. An expert cut off by
``timeout_after_k_min`` (slower than the quorum) is avoided only if its call, left to
finish in the background, then fails that way too: slow is fine, gone is not.

A directory may cache lookups (``DhtDirectory`` for 3 s), and would go on offering a
volunteer that just left. When an expert answers "draining" or "unknown_expert" or cannot
be reached, the layer calls the directory's optional ``invalidate(uids)`` (only if it has
one), so the next step reads fresh records, and beam search skips avoided experts (without
letting prefixes that hold only avoided experts crowd out the others), so the next step
re-plans with the remaining volunteers instead of picking the leaver's experts again.

Deadlines adapt per server (``latency.py``): the layer's experts share one
``LatencyTracker`` (by default the process-wide one), so each call waits a multiple of the
latency its server showed lately (a moving percentile), never more than the configured
timeouts and exactly them while a server has no history; ``dispatch`` stops waiting for a
call at that deadline. ``adaptive_deadlines=False`` keeps the fixed timeouts.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from volunteer.client.beam_search import beam_search
from volunteer.client.directory import ExpertDirectory
from volunteer.client.dispatch import CallPlan, CallReport, CutOffError, ExpertCall, dispatch
from volunteer.client.gating import GridGate, expert_logits, masked_softmax
from volunteer.client.latency import LatencyTracker, default_tracker
from volunteer.wire.errors import RemoteError

if TYPE_CHECKING:
    from volunteer.wire.transport import Transport

__all__ = [
    "AVOID_CODES", "INVALIDATE_CODES", "AvoidList", "NotEnoughExpertsError",
    "RemoteMixtureOfExperts",
]

log = logging.getLogger(__name__)

#: error codes after which an expert is avoided for a while (it is leaving or gone)
AVOID_CODES = frozenset({"draining", "paused", "unreachable", "unknown_expert", "timeout"})
#: error codes after which the directory's cached lookups of the expert are stale
INVALIDATE_CODES = frozenset({"draining", "paused", "unreachable", "unknown_expert"})

ExpertFactory = Callable[[str, "Transport"], nn.Module]


class NotEnoughExpertsError(RuntimeError):
    """Fewer than ``k_min`` experts were found or answered for some sample."""


class AvoidList:
    """Uids to skip until their expiry; thread-safe. ``clock``: seconds, monotonic (tests
    pass a fake one)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, uid: str, seconds: float) -> None:
        """Skip ``uid`` for ``seconds`` more (an existing, later expiry is kept)."""
        if seconds <= 0:
            return
        with self._lock:
            self._until[uid] = max(self._until.get(uid, 0.0), self._clock() + seconds)

    def active(self) -> set[str]:
        """The uids still avoided now (expired ones are dropped)."""
        now = self._clock()
        with self._lock:
            for uid in [u for u, t in self._until.items() if t <= now]:
                del self._until[uid]
            return set(self._until)


def _summarise(failed: dict[str, str], limit: int = 4) -> str:
    if not failed:
        return "no expert reported an error"
    items = [f"{uid} ({reason})" for uid, reason in list(failed.items())[:limit]]
    more = f" and {len(failed) - limit} more" if len(failed) > limit else ""
    return "failed: " + ", ".join(items) + more


class RemoteMixtureOfExperts(nn.Module):
    """Mixture of remote experts over the grid ``uid_prefix.i.j...`` of shape ``grid_size``.

    ``x (..., in_features) -> (..., in_features)``. Trains like any torch layer: the gate
    is a local parameter; the experts update their own weights when backward reaches them.
    Timeouts are in seconds (None: bounded only by the transport's own timeout, 30 s); they
    are the longest waits: with ``adaptive_deadlines`` a call waits less once its server's
    latency is known (learnt in ``latency``, default the process-wide tracker).
    ``last_report`` describes the latest call (answered/failed experts, forward and backward).

    Args:
        in_features: the hidden size: the experts' ``hidden_dim`` in the manifest.
        grid_size: the manifest's ``grid.dims`` (e.g. ``(32, 32)``); the gate scores each
            dimension, so its cost grows with their sum, not their product.
        uid_prefix: the manifest's ``grid.prefix`` (uids are ``<prefix>.<i>.<j>``).
        directory: where experts are found: ``ClientNode(...).directory()`` for a real
            swarm, ``StaticDirectory`` for fixed endpoints (tests, one machine).
        k_best: experts each sample is sent to (and mixed from), typically 2-4. More
            experts per sample cost more traffic and volunteer time per step but make a
            step less sensitive to any single slow or wrong expert.
        k_min: answers each sample needs; fewer raises ``NotEnoughExpertsError`` (default
            1). Raise it for quality when the swarm is large and healthy; 0 never fails a
            step (a sample with no answer gets a zero output).
        forward_timeout: longest wait for a forward answer (None: bounded by the transport's
            timeout, the larger of the two timeouts given, else 30 s). Set it to a few times
            the normal step latency so a vanished volunteer costs that much, not 30 s.
        backward_timeout: the same for the backward; a backward also runs the volunteer's
            optimizer step, so allow a little more than for the forward.
        timeout_after_k_min: once every sample has ``k_min`` answers, wait at most this many
            more seconds for the other chosen experts (None: wait for all until the
            timeout). The main lever against stragglers: e.g. 0.05-0.5 s on a volunteer
            swarm; late experts are dropped from this step, not avoided later.
        beam_size: prefixes kept per grid dimension in beam search (default ``k_best``).
            Raise it (e.g. 2-4 x ``k_best``) when the grid is sparsely served so that the
            search does not miss alive experts; it costs more DHT lookups per step.
        avoid_for: seconds to skip an expert that answered draining / unknown, could not be
            reached or timed out (default 30); 0 turns the avoid list off.
        compression: wire compression of activations and gradients: None, ``"fp16"``,
            ``"bf16"`` or ``"int8"``; default None. Use the manifest's ``wire.compression``
            (``volunteer manifest check`` shows it); fp16 halves the bytes with little
            effect on training, int8 quarters them.
        max_workers: threads issuing expert calls in parallel (default 32); at least the
            number of distinct experts one step calls, or calls queue behind each other.
        expert_factory: ``(uid, transport) -> nn.Module`` building the proxy of each
            expert; default ``RemoteExpert``. For tests and instrumentation.
        adaptive_deadlines: True (default): per-server deadlines from observed latency,
            capped by the timeouts; False: always the fixed timeouts (reproducible runs).
        latency: the ``LatencyTracker`` to learn latencies in (default the process-wide one,
            shared with other layers calling the same volunteers).
    """

    def __init__(
        self,
        in_features: int,
        grid_size: Sequence[int],
        uid_prefix: str,
        directory: ExpertDirectory,
        k_best: int,
        k_min: int = 1,
        forward_timeout: float | None = None,
        backward_timeout: float | None = None,
        timeout_after_k_min: float | None = None,
        *,
        beam_size: int | None = None,
        avoid_for: float = 30.0,
        compression: str | None = None,
        max_workers: int = 32,
        expert_factory: ExpertFactory | None = None,
        adaptive_deadlines: bool = True,
        latency: LatencyTracker | None = None,
    ):
        super().__init__()
        if k_best < 1 or not 0 <= k_min <= k_best:
            raise ValueError(f"need k_best >= 1 and 0 <= k_min <= k_best, got {k_best}, {k_min}")
        for name, value in (
            ("forward_timeout", forward_timeout),
            ("backward_timeout", backward_timeout),
            ("timeout_after_k_min", timeout_after_k_min),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        if not uid_prefix or uid_prefix.endswith("."):
            raise ValueError(f"uid_prefix must be non-empty without a trailing dot: {uid_prefix!r}")
        self.in_features = int(in_features)
        self.grid_size = tuple(int(d) for d in grid_size)
        self.uid_prefix = uid_prefix
        self.directory = directory
        self.k_best, self.k_min = int(k_best), int(k_min)
        self.beam_size = int(beam_size) if beam_size is not None else self.k_best
        self.forward_timeout = forward_timeout
        self.backward_timeout = backward_timeout
        self.timeout_after_k_min = timeout_after_k_min
        self.avoid_for = float(avoid_for)
        self.gate = GridGate(self.in_features, self.grid_size)
        self.avoid = AvoidList()
        self.last_report: CallReport | None = None
        limits = [t for t in (forward_timeout, backward_timeout) if t is not None]
        self._transport_timeout = max(limits) if limits else 30.0
        self._compression = compression
        self._max_workers = int(max_workers)
        self._expert_factory = expert_factory
        self.latency: LatencyTracker | None = (
            (latency if latency is not None else default_tracker()) if adaptive_deadlines else None
        )
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def extra_repr(self) -> str:
        """Grid, prefix and k values, shown by ``print(model)``."""
        return (
            f"in_features={self.in_features}, grid_size={self.grid_size}, "
            f"uid_prefix={self.uid_prefix!r}, k_best={self.k_best}, k_min={self.k_min}"
        )

    def _executor(self) -> cf.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(
                    self._max_workers, thread_name_prefix="volunteer-moe"
                )
            return self._pool

    def _make_expert(self, uid: str, transport: Transport) -> nn.Module:
        if self._expert_factory is not None:
            return self._expert_factory(uid, transport)
        from volunteer.client.remote_expert import RemoteExpert

        return RemoteExpert(
            uid,
            transport,
            timeout=self._transport_timeout,
            compression=self._compression,
            adaptive=self.latency is not None,
            latency=self.latency,
        )

    def _reroute(self, uid: str, expert: nn.Module, exc: BaseException) -> nn.Module | None:
        """Another replica of ``uid`` after a "paused" refusal (``dispatch.REROUTE_CODES``):
        the directory resolves it again (a ``DhtDirectory`` passes over the server that
        refused); None when it offers no transport or the same one."""
        transport = self.directory.resolve([uid]).get(uid)
        if transport is None or transport is getattr(expert, "transport", None):
            return None
        return self._make_expert(uid, transport)

    def _on_failure(self, uid: str, exc: BaseException) -> None:
        if not isinstance(exc, RemoteError) or isinstance(exc, CutOffError):
            return
        if exc.code in AVOID_CODES:
            self.avoid.add(uid, self.avoid_for)
        if exc.code in INVALIDATE_CODES:
            invalidate = getattr(self.directory, "invalidate", None)  # optional in ExpertDirectory
            if callable(invalidate):
                try:
                    invalidate([uid])
                except Exception:  # a directory hiccup must not break the step
                    log.warning("directory.invalidate(%r) failed", uid, exc_info=True)

    def _search(self, grid_scores: Any, avoided: Any) -> Any:
        """Beam search; a directory that fails (a DHT lookup timed out, a peer unreachable)
        is ``NotEnoughExpertsError`` like any step without enough experts."""
        try:
            return beam_search(grid_scores, self.uid_prefix, self.directory, self.beam_size,
                               self.k_best, avoided)
        except RemoteError as exc:
            raise NotEnoughExpertsError(f"the expert directory failed: {exc}") from exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix the chosen experts' outputs for ``x`` of shape ``(..., in_features)``; raises
        ``NotEnoughExpertsError`` when a sample has fewer than ``k_min`` answers."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected (..., {self.in_features}) input, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        batch = flat.shape[0]
        grid_scores = self.gate(flat)
        if batch == 0:
            return x.new_zeros(x.shape)

        avoided = self.avoid.active()
        found = self._search(grid_scores, avoided)
        if avoided and any(len(uids) < self.k_min for uids in found.uids):
            # avoidance is a hint, not a ban: rather retry avoided experts than fail the step
            found = self._search(grid_scores, frozenset())
        counts = [len(uids) for uids in found.uids]
        short = [b for b, c in enumerate(counts) if c < self.k_min]
        if short:
            raise NotEnoughExpertsError(
                f"only {counts[short[0]]} alive expert(s) found under {self.uid_prefix!r} "
                f"for {len(short)} of {batch} samples, k_min={self.k_min} (grid {self.grid_size})"
            )
        k = max(max(counts), 1)
        ndim = len(self.grid_size)
        padded = [list(cs) + [(0,) * ndim] * (k - len(cs)) for cs in found.coords]
        coords = torch.tensor(padded, dtype=torch.int64, device=flat.device).view(batch, k, ndim)

        rows: dict[str, list[int]] = {}
        slots: dict[str, list[int]] = {}
        for b, uids in enumerate(found.uids):
            for slot, uid in enumerate(uids):
                rows.setdefault(uid, []).append(b)
                slots.setdefault(uid, []).append(slot)
        calls = [
            ExpertCall(
                uid=uid,
                expert=self._make_expert(uid, found.transports[uid]),
                rows=torch.tensor(rows[uid], dtype=torch.int64),
                slots=torch.tensor(slots[uid], dtype=torch.int64),
            )
            for uid in rows
        ]
        plan = CallPlan(
            calls=calls,
            batch=batch,
            k=k,
            out_features=self.in_features,
            pool=self._executor(),
            k_min=self.k_min,
            forward_timeout=self.forward_timeout,
            backward_timeout=self.backward_timeout,
            timeout_after_k_min=self.timeout_after_k_min,
            on_failure=self._on_failure,
            reroute=self._reroute,
        )
        self.last_report = plan.report
        outputs, mask = dispatch(plan, flat)

        answered = mask.sum(dim=1)
        if bool((answered < self.k_min).any()):
            worst = int(answered.min())
            raise NotEnoughExpertsError(
                f"only {worst} of the chosen experts answered for some samples "
                f"({int((answered < self.k_min).sum())} of {batch} below k_min={self.k_min}); "
                + _summarise(plan.report.failed)
            )
        weights = masked_softmax(expert_logits(grid_scores, coords), mask)
        mixed = torch.einsum("bk,bkh->bh", weights, outputs)
        return mixed.reshape(*lead, self.in_features)

    def close(self) -> None:
        """Stop the call threads (late calls still finish within the transport timeout)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
