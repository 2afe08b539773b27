"""The Elastic Gossip thesis's averaging methods: their settings as data, their arithmetic pure.

The thesis (Pramod, "Elastic Gossip", arXiv:1812.02407) compares ways for W workers, each
with its own copy of a model and its own shard of the data, to keep those copies useful
without a master. As we implement them:

- ``local``: one worker trains on all the data; there is no group. The reference a group is
  measured against.
- ``noComm``: W workers, each on its own shard, never communicate. Each ends with its own
  model, seen on only 1/W of the data; the thesis found it behind the others (it diverged at
  W=8 on MNIST).
- ``gradAllReduce``: every step, each worker's gradients are averaged with every live
  member's gradients *for that step* before its optimizer step. With identical starting
  parameters and all members present the copies stay identical (synchronous data-parallel
  SGD); a member missing from a round is left out of that round's mean.
- ``elasticGossip``: after a local step, every ``period`` steps or with probability
  ``prob``, pick one random member and do a *symmetric* elastic pull: both move ``alpha``
  of the way towards each other (``x_i -= alpha (x_i - x_j)`` and
  ``x_j -= alpha (x_j - x_i)``, both computed from the values before the exchange). With
  ``alpha = 0.5`` both end at the pair's mean.
- ``gossipingSgd``: after a local step, every ``period`` steps or with probability
  ``prob``, gossip with one random member: ``push`` (the peer averages our parameters into
  its own with weight 1/2; we keep ours) or ``pull`` (we average its parameters into ours
  with weight 1/2; it keeps its own).

The arithmetic below works in place on lists of tensors (one per parameter) and is shared
by trainers (``averager.py``) and the daemon's replicas of one expert uid; it assumes its
inputs were validated (same count, same shapes); it raises ``ValueError`` otherwise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from volunteer.wire.errors import BadRequestError, NonFiniteError

METHODS = ("local", "noComm", "gradAllReduce", "elasticGossip", "gossipingSgd")
GOSSIP_MODES = ("push", "pull")
PARAMETER_METHODS = ("elasticGossip", "gossipingSgd")  # exchange parameters, period/prob apply


@dataclass(frozen=True)
class AveragingConfig:
    """How one worker averages: the method and the thesis's parameters.

    ``period``: average every ``period`` local steps; ``prob``: average after a step with
    this probability (give at most one; neither means every step). Both only apply to
    ``elasticGossip`` and ``gossipingSgd``. ``alpha``: the elastic moving rate in (0, 1].
    ``timeout``: the longest one averaging call may hold a training step, in seconds.
    ``gossip``: ``push`` or ``pull`` for ``gossipingSgd``.
    """

    method: str
    period: int | None = None
    prob: float | None = None
    alpha: float = 0.5
    timeout: float = 5.0
    gossip: str = "push"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {METHODS}; pick one of those")
        if self.period is not None and self.prob is not None:
            raise ValueError("period, prob: give at most one of them "
                             "(every N steps or with a probability)")
        if self.period is not None and (isinstance(self.period, bool)
                                        or not isinstance(self.period, int) or self.period < 1):
            raise ValueError(f"period: {self.period!r} must be an integer >= 1 "
                             "(steps between averagings)")
        if self.prob is not None and (not isinstance(self.prob, (int, float))
                                      or not 0.0 < float(self.prob) <= 1.0):
            raise ValueError(f"prob: {self.prob!r} must be a number in (0, 1]")
        scheduled = self.period is not None or self.prob is not None
        if scheduled and self.method not in PARAMETER_METHODS:
            raise ValueError(f"period, prob: only {PARAMETER_METHODS} use them; "
                             f"drop them for {self.method!r}")
        if not isinstance(self.alpha, (int, float)) or not 0.0 < float(self.alpha) <= 1.0:
            raise ValueError(f"alpha: {self.alpha!r} must be a number in (0, 1]")
        if (not isinstance(self.timeout, (int, float)) or not math.isfinite(self.timeout)
                or self.timeout <= 0):
            raise ValueError(f"timeout: {self.timeout!r} must be a finite number of seconds > 0")
        if self.gossip not in GOSSIP_MODES:
            raise ValueError(f"gossip: {self.gossip!r} must be one of {GOSSIP_MODES}")

    @property
    def uses_group(self) -> bool:
        """Whether this method talks to peers at all (``local`` and ``noComm`` never do)."""
        return self.method in ("gradAllReduce", *PARAMETER_METHODS)

    def should_average(self, step: int, rng: random.Random) -> bool:
        """Whether to average after local step number ``step`` (1 for the first step).

        ``gradAllReduce``: every step; ``local``/``noComm``: never; the gossip methods: when
        ``step`` is a multiple of ``period``, or with probability ``prob`` (drawn from ``rng``,
        so a seeded run is reproducible), or every step if neither is set.
        """
        if self.method == "gradAllReduce":
            return True
        if self.method not in PARAMETER_METHODS:
            return False
        if self.period is not None:
            return step % self.period == 0
        if self.prob is not None:
            return rng.random() < self.prob
        return True


def _check_pair(mine: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor]) -> None:
    if len(mine) != len(theirs):
        raise ValueError(f"tensor lists differ in length: {len(mine)} vs {len(theirs)}")
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"tensor {i}: shape {tuple(b.shape)} does not match {tuple(a.shape)}")


def _like(ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t.to(device=ref.device, dtype=ref.dtype)


@torch.no_grad()
def elastic_pull_(mine: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor],
                  alpha: float) -> None:
    """``mine -= alpha * (mine - theirs)``, tensor by tensor, in place (one side of the
    symmetric elastic pull; the peer does the same with the roles swapped)."""
    _check_pair(mine, theirs)
    for a, b in zip(mine, theirs, strict=True):
        a.sub_(a - _like(a, b), alpha=alpha)


@torch.no_grad()
def average_into_(mine: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor],
                  weight: float = 0.5) -> None:
    """``mine = (1 - weight) * mine + weight * theirs`` in place (gossip: weight 1/2)."""
    _check_pair(mine, theirs)
    for a, b in zip(mine, theirs, strict=True):
        a.mul_(1.0 - weight).add_(_like(a, b), alpha=weight)


@torch.no_grad()
def mean_(into: Sequence[torch.Tensor], others: Sequence[Sequence[torch.Tensor]]) -> None:
    """``into`` = the mean of ``into`` and every list in ``others``, in place (all-reduce of
    the members that took part; with no others ``into`` is unchanged)."""
    for other in others:
        _check_pair(into, other)
    if not others:
        return
    n = 1 + len(others)
    for i, a in enumerate(into):
        total = a.clone()
        for other in others:
            total.add_(_like(a, other[i]))
        a.copy_(total.div_(n))


@torch.no_grad()
def divergence(mine: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor]) -> float:
    """Relative L2 distance over all tensors: ``||mine - theirs|| / max(||mine||, 1e-12)``
    (0 for identical copies; how far two replicas drifted apart)."""
    _check_pair(mine, theirs)
    diff = 0.0
    norm = 0.0
    for a, b in zip(mine, theirs, strict=True):
        a64 = a.detach().to(torch.float64)
        diff += float((a64 - b.detach().to(device=a.device, dtype=torch.float64)).pow(2).sum())
        norm += float(a64.pow(2).sum())
    return math.sqrt(diff) / max(math.sqrt(norm), 1e-12)


def checked(tensors: Any, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A peer's tensor list (``tensors``) checked against ours (``params``) before any use: the count and shapes must
    match, floating dtypes only (converted to ours, on CPU); ``NonFiniteError`` for NaN/inf,
    ``BadRequestError`` for anything else wrong."""
    if not isinstance(tensors, list) or len(tensors) != len(params):
        count = len(tensors) if isinstance(tensors, list) else type(tensors).__name__
        raise BadRequestError(f"expected {len(params)} tensors, got {count}")
    out = []
    for i, (t, p) in enumerate(zip(tensors, params, strict=True)):
        if not isinstance(t, torch.Tensor):
            raise BadRequestError(f"tensor {i} is a {type(t).__name__}")
        if tuple(t.shape) != tuple(p.shape):
            raise BadRequestError(f"tensor {i}: shape {tuple(t.shape)} is not ours "
                                  f"{tuple(p.shape)}")
        if not t.dtype.is_floating_point:
            raise BadRequestError(f"tensor {i}: dtype {t.dtype} is not floating point")
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"tensor {i} holds NaN or infinity")
        out.append(t.detach().to(device="cpu", dtype=p.dtype))
    return out
