"""``CollaborativeOptimizer``: the trainer API, one object wrapped around a torch optimizer.

In the spirit of hivemind's ``Optimizer``, much simpler::

    group = SwarmGroup(...)  # or LocalGroup(hub, "w0") in one process
    opt = CollaborativeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), group,
                                 AveragingConfig("elasticGossip", period=4, alpha=0.5))
    with opt:
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

The parameters it keeps in agreement are the optimizer's param groups: the trainer's dense
parts (gating networks, embeddings, heads). A ``RemoteMixtureOfExperts``' experts live on
volunteers and are not in it; they are trained (and replicated) there.

``step()`` by method: ``gradAllReduce`` averages the gradients with every live member, then
steps; ``elasticGossip`` / ``gossipingSgd`` step, then (every ``period`` steps or with
probability ``prob``) gossip with one random member; ``noComm`` / ``local`` just step.
Peers' elastic pulls and pushes that arrived meanwhile are applied right after our own
optimizer step, never while our forward/backward runs.
Averaging never raises a peer's fault into the loop and never holds a step longer than
``config.timeout``. ``finish()`` at the end of a run agrees on one copy with the members still
training (``consensus.py``): call it before saving the model. Members of one gradAllReduce group should start together: rounds are
matched by the step counter (``steps``).
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import torch

from volunteer.client.averaging import consensus
from volunteer.client.averaging.averager import Averager
from volunteer.client.averaging.group import AveragingGroup
from volunteer.client.averaging.methods import AveragingConfig


class CollaborativeOptimizer:
    """Wraps ``optimizer``; averages its parameters over ``group`` by ``config.method``.

    Use it in place of the torch optimizer for the trainer's dense parameters when several
    trainers train one model together (see the module docstring for the loop).

    Args:
        optimizer: the torch optimizer of the parameters to keep in agreement (its param
            groups); stepping, learning rate and state stay the optimizer's own.
        group: who to average with: ``ClientNode.averaging_group(run_id)`` over the swarm,
            ``LocalGroup`` in one process; None only for methods without peers (``local``,
            ``noComm``).
        config: ``AveragingConfig``: the method (``gradAllReduce``, ``elasticGossip``,
            ``gossipingSgd``, ``noComm``, ``local``), how often (``period`` / ``prob``), how
            far (``alpha``) and the per-exchange ``timeout``. Start with elasticGossip,
            period 4, alpha 0.5 on volunteer links; gradAllReduce needs members that start
            together and fast links.
        seed: seeds the random choice of gossip partners (and consensus) for reproducible
            runs; None: random.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group: AveragingGroup | None,
                 config: AveragingConfig, *, seed: int | None = None) -> None:
        if config.uses_group and group is None:
            raise ValueError(f"group: {config.method} averages with peers; pass an "
                             "AveragingGroup (LocalGroup or SwarmGroup)")
        self.optimizer = optimizer
        self.config = config
        self.group = group
        seen: set[int] = set()
        self.params: list[torch.nn.Parameter] = []
        for param_group in optimizer.param_groups:
            for p in param_group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
        self._rng = random.Random(seed)
        self._seed = seed
        self.averager: Averager | None = None
        if config.uses_group:
            assert group is not None
            self.averager = Averager(self.params, group, config,
                                     seed=None if seed is None else seed + 1)
        self.steps = 0
        self.gossips = 0

    @property
    def lock(self) -> Any:
        """The lock parameters change under (the averager's; a no-op without one)."""
        return self.averager.lock if self.averager is not None else contextlib.nullcontext()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """One local step with the method's averaging (see the module docstring)."""
        self.steps += 1
        averager = self.averager
        if averager is not None and self.config.method == "gradAllReduce":
            averager.all_reduce_grads(self.steps)
        with self.lock:
            self.optimizer.step()
            if averager is not None:
                averager.apply_pending()  # peers' pulls and pushes, between our steps
        gossiping = averager is not None and self.config.method != "gradAllReduce"
        if gossiping and self.config.should_average(self.steps, self._rng):
            assert averager is not None
            if averager.gossip(self.steps) is not None:
                self.gossips += 1

    def finish(self, timeout: float = consensus.FINISH_TIMEOUT_S,
               tol: float = consensus.FINISH_TOL) -> consensus.FinishReport | None:
        """End of the run: agree on one copy with the live members (bounded by ``timeout``;
        ``consensus.finish``). No ``step()`` may follow. None for methods without a group."""
        if self.averager is None:
            return None
        seed = None if self._seed is None else self._seed + 2
        return consensus.finish(self.averager, self.steps, timeout=timeout, tol=tol, seed=seed)

    def stats(self) -> dict[str, Any]:
        """The method, local steps, successful gossips and the averager's counters."""
        out: dict[str, Any] = {"method": self.config.method, "steps": self.steps,
                               "gossips": self.gossips}
        if self.averager is not None:
            out.update(self.averager.stats())
        return out

    def close(self) -> None:
        """Stop averaging (the group is its creator's to close)."""
        if self.averager is not None:
            self.averager.close()

    def __enter__(self) -> CollaborativeOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
