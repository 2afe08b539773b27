"""The experiment manifest as frozen dataclasses, plus the architecture fingerprint.

A manifest describes one experiment that every volunteer of it must agree on: the expert
architecture and hyper-parameters, the expert grid, the optimizer, the serving limits
(``volunteer.runtime.limits.ServingLimits`` itself: a pure dataclass, no torch) and how to
reach the peer network, and the trainers' default wire compression (``wire``). Local choices
(device, how many experts) are settings, not manifest fields.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from volunteer.manifest.admission import OPEN, AdmissionSpec
from volunteer.runtime.limits import ServingLimits

PUBLIC_CHOICES = ("auto", "yes", "no")


@dataclass(frozen=True)
class ExperimentInfo:
    """Experiment identity: a slug name and a version string."""

    name: str
    version: str
    description: str = ""
    seed: int = 0  # fresh experts start from a deterministic init of (seed, uid)


@dataclass(frozen=True)
class ExpertSpec:
    """Expert architecture: registry kind, width and extra constructor options."""

    kind: str
    hidden_dim: int
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GridSpec:
    """The expert grid: uids are ``<prefix>.<i>.<j>...`` with ``0 <= i < dims[0]`` etc."""

    prefix: str
    dims: tuple[int, ...]

    @property
    def size(self) -> int:
        total = 1
        for d in self.dims:
            total *= d
        return total

    def uids(self) -> Iterator[str]:
        """All uids of the grid in row-major order."""
        for coords in itertools.product(*(range(d) for d in self.dims)):
            yield self.prefix + "." + ".".join(str(c) for c in coords)


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer hyper-parameters (mirrors ``volunteer.experts.backend.OptimizerSpec``)."""

    name: str = "adam"
    lr: float = 1e-3
    clip_grad_norm: float | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0


ServingConfig = ServingLimits
"""The manifest's ``serving`` section *is* ``volunteer.runtime.limits.ServingLimits`` (one
definition of every serving limit); the old name stays for readers of this module."""


@dataclass(frozen=True)
class NetworkConfig:
    """How to join the peer network; validated here, consumed by ``volunteer.net``."""

    bootstrap: tuple[str, ...] = ()
    relays: tuple[str, ...] = ()
    listen_port: int = 0
    announce_addrs: tuple[str, ...] = ()
    public: str = "auto"


@dataclass(frozen=True)
class ShardConfig:
    """How the swarm keeps its weights (``volunteer.daemon.shards``): how many volunteers
    should serve each uid, how often a node reconsiders what it hosts, how often it refreshes
    the shard it hands out, and the chunk size of shards on the wire."""

    replication: int = 2
    rebalance_interval_s: float = 60.0
    snapshot_interval_s: float = 30.0
    chunk_bytes: int = 1 << 20


@dataclass(frozen=True)
class AveragingSection:
    """How replicas of one expert uid stay one expert (``volunteer.daemon.replicas``): every
    ``replica_period_s`` seconds a node hosting a uid runs one elastic exchange with a random
    other holder of it, each side moving ``replica_alpha`` of the way towards the other's
    weights (the Elastic Gossip thesis's pull; 0.5 makes both equal to their mean).
    ``replica_period_s: 0`` turns replica averaging off (replicas then drift apart)."""

    replica_period_s: float = 30.0
    replica_alpha: float = 0.5

    @property
    def replicas_enabled(self) -> bool:
        return self.replica_period_s > 0


@dataclass(frozen=True)
class WireSection:
    """How trainers of this experiment send tensors by default (``wire.compression``): one
    of ``volunteer.wire.COMPRESSIONS`` (None: as computed; "fp16" / "bf16": float32 travels
    as float16 / bfloat16, half the bytes; "int8": 8-bit blockwise quantisation, about a
    quarter of float32's bytes, error at most absmax(block of 64) / 254 per value). A trainer
    may still choose per call; a volunteer answers each call in the compression it came with,
    so this setting never has to agree across the swarm."""

    compression: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A validated experiment manifest; ``source`` is where it was read from."""

    experiment: ExperimentInfo
    expert: ExpertSpec
    grid: GridSpec
    optimizer: OptimizerConfig
    serving: ServingLimits
    network: NetworkConfig
    source: str = ""
    shards: ShardConfig = ShardConfig()
    admission: AdmissionSpec = OPEN
    averaging: AveragingSection = AveragingSection()
    wire: WireSection = WireSection()

    def fingerprint(self) -> str:
        """Hash of everything a checkpoint's tensors depend on.

        Covers the experiment name, the expert architecture and the optimizer *kind* (its
        state layout), not the learning rate or serving limits, which may change freely
        between runs without invalidating trained weights.
        """
        payload = {
            "experiment": self.experiment.name,
            "kind": self.expert.kind,
            "hidden_dim": self.expert.hidden_dim,
            "options": dict(sorted(self.expert.options.items())),
            "optimizer": self.optimizer.name,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description for the status snapshot and ``--json`` output."""
        return {
            "name": self.experiment.name,
            "version": self.experiment.version,
            "source": self.source,
            "fingerprint": self.fingerprint(),
            "expert": {
                "kind": self.expert.kind,
                "hidden_dim": self.expert.hidden_dim,
                "options": dict(self.expert.options),
            },
            "grid": {"prefix": self.grid.prefix, "dims": list(self.grid.dims)},
            "wire": {"compression": self.wire.compression},
        }
