"""The experiment manifest as frozen dataclasses: one declaration of every key.

A manifest describes one experiment that every volunteer of it must agree on: the expert
architecture and hyper-parameters, the expert grid, the optimizer, the serving limits
(``volunteer.runtime.limits.ServingLimits`` itself: a pure dataclass, no torch) and how to
reach the peer network, and the trainers' default wire compression (``wire``). Local choices
(device, how many experts) are settings, not manifest fields.

Each key is one dataclass field whose metadata holds its ``rules.Key`` (the check, the words
for its range, the help text); its default is the field's default. ``validate.py`` checks a
document with these declarations and ``reference.py`` prints them (``volunteer manifest
schema``), so the validator and the reference cannot drift apart. Two sections are declared
where their definitions live: ``serving`` is ``ServingLimits`` (ranges and defaults in
``volunteer.runtime.limits``; the help text in ``SERVING_HELP`` here) and ``admission`` is
``AdmissionSpec`` (checked by ``admission.parse_admission``; help in ``ADMISSION_KEYS``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, fields
from functools import partial
from typing import Any, get_type_hints

from volunteer.manifest import rules
from volunteer.manifest.admission import MAX_LISTED_PEERS, OPEN, AdmissionSpec
from volunteer.manifest.rules import Key, Rule, key
from volunteer.runtime.limits import (
    ServingLimits,
    is_integer_limit,
    limit_expectation,
    limit_problem,
)
from volunteer.wire import COMPRESSIONS

PUBLIC_CHOICES = ("auto", "yes", "no")
OPTIMIZERS = ("adam", "sgd")  # as volunteer.experts.backend.OPTIMIZERS
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
KIND_PATTERN = r"^[a-z_][a-z0-9_]{0,63}$"
# PEP 508 names (what `pip install` takes), at most 100 characters
DISTRIBUTION_PATTERN = r"^(?=.{1,100}$)[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$"
MAX_GRID_SIZE = 2**20
MAX_GRID_DIMS = 4
MAX_OPTIONS = 32


@dataclass(frozen=True)
class ExperimentInfo:
    """Experiment identity: a slug name and a version string."""

    name: str = key(rules.text(NAME_PATTERN, "a lowercase name of letters, digits, '-' or '_' (at most 64)"),
                    "The experiment's name: the namespace of its DHT records and of each volunteer's "
                    "checkpoints. Two experiments with one name are one swarm; pick a new name for a "
                    "new experiment.")
    version: str = key(rules.text(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,31}$", "a version such as 1 or 0.3.1"),
                       "Your version of the manifest, shown by `volunteer status`; raise it when you "
                       "change something volunteers must pick up.")
    description: str = key(rules.free_text(500), "One line shown to volunteers.", "")
    seed: int = key(rules.integer(0, 2**63 - 1),
                    "Fresh experts start from a deterministic init of (seed, uid), so two "
                    "newcomers agree bitwise; change it only to start the weights over.", 0)


@dataclass(frozen=True)
class ExpertSpec:
    """Expert architecture: registry kind, width, extra constructor options, and the plug-in
    distribution that provides the kind (a hint for volunteers who lack it)."""

    kind: str = key(rules.text(KIND_PATTERN, "an expert kind name such as ffn"),
                    "The expert architecture: a built-in kind (ffn, transformer, nop) or one a "
                    "plug-in package registers in the `volunteer.experts` entry point group.")
    hidden_dim: int = key(rules.integer(1, 65536),
                          "Width of the expert's input and output (the trainer's hidden size). "
                          "Part of the architecture fingerprint: changing it starts new weights.")
    options: Mapping[str, Any] = key(rules.scalar_options(MAX_OPTIONS, 100),
                                     "Extra constructor arguments of the kind (ffn: expansion; "
                                     "transformer: num_heads, seq_len, expansion). Part of the "
                                     "fingerprint.", factory=dict)
    package: str | None = key(rules.text(DISTRIBUTION_PATTERN, "a Python distribution name such as "
                                         "volunteer-experts-foo"),
                              "For a plug-in kind: the distribution that provides it. A node that "
                              "lacks the kind tells its owner to `pip install` this name; nothing "
                              "is ever installed or imported because a manifest says so.", None)


@dataclass(frozen=True)
class GridSpec:
    """The expert grid: uids are ``<prefix>.<i>.<j>...`` with ``0 <= i < dims[0]`` etc."""

    prefix: str = key(rules.dotted_prefix(128),
                      "Start of every expert uid (<prefix>.<i>.<j>); the trainer's "
                      "RemoteMixtureOfExperts uses the same uid_prefix.")
    dims: tuple[int, ...] = key(rules.grid_dims(MAX_GRID_DIMS, 65536, MAX_GRID_SIZE),
                                "The grid's shape: the trainer's grid_size. The product is the "
                                "number of experts; the gate scores each dimension, so a 2-D grid "
                                "of 64 x 64 costs 128 scores per sample for 4096 experts.")

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

    name: str = key(rules.choice(OPTIMIZERS),
                    "The experts' optimizer; its state is part of each shard (changing it starts "
                    "new weights).", "adam")
    lr: float = key(rules.number(0.0, 10.0, lo_open=True), "Learning rate of every expert.", 1e-3)
    clip_grad_norm: float | None = key(rules.number(0.0, 1e6, lo_open=True, nullable=True),
                                       "Clip each expert's gradient to this L2 norm before a step "
                                       "(null: no clipping).", None)
    momentum: float = key(rules.number(0.0, 0.999999), "SGD momentum (sgd only).", 0.0)
    weight_decay: float = key(rules.number(0.0, 1.0), "L2 weight decay added to the gradients.", 0.0)


ServingConfig = ServingLimits
"""The manifest's ``serving`` section *is* ``volunteer.runtime.limits.ServingLimits`` (one
definition of every serving limit); the old name stays for readers of this module."""

SERVING_HELP: dict[str, str] = {
    "max_batch_size": "Most samples an expert processes in one batch; requests are merged up to it.",
    "max_queue_size": "Tasks waiting per (expert, forward|backward); beyond it callers get "
                      "'overloaded' and go to another replica.",
    "max_header_bytes": "Largest request header accepted, checked before it is parsed.",
    "max_tensors": "Most tensors in one request.",
    "max_elements": "Most elements in one tensor of a request, checked before allocation.",
    "max_bytes": "Most tensor bytes in one request, checked before allocation.",
    "max_queued_bytes": "Tensor bytes all queued tasks (and in-flight network reads) may hold "
                        "together: the node's memory bound under load.",
    "activation_cache_size": "Forward inputs kept so a backward need not resend them (0: off).",
    "activation_cache_bytes": "Bytes the activation cache may hold.",
    "activation_cache_ttl_s": "Seconds an entry of the activation cache lives.",
    "default_ttl_s": "Deadline of a request that names none (seconds).",
    "max_grad_norm": "Refuse a backward whose output gradient's L2 norm per sample exceeds this "
                     "(null: no bound); protects experts from poisoned gradients.",
}


@dataclass(frozen=True)
class NetworkConfig:
    """How to join the peer network; validated here, consumed by ``volunteer.net``."""

    bootstrap: tuple[str, ...] = key(rules.multiaddrs(need_peer_id=True),
                                     "Addresses of long-lived public nodes every volunteer dials "
                                     "first (the line `volunteer join` prints at the first node's "
                                     "start). Empty: this node starts a new swarm.", ())
    relays: tuple[str, ...] = key(rules.multiaddrs(need_peer_id=True),
                                  "Public nodes that relay for NATed volunteers (circuit relay v2) "
                                  "besides those found in the swarm.", ())
    listen_port: int = key(rules.integer(0, 65535),
                           "The experiment's default libp2p TCP port (0: any free port); a "
                           "volunteer's own setting overrides it.", 0)
    announce_addrs: tuple[str, ...] = key(rules.multiaddrs(need_peer_id=False),
                                          "Addresses to announce instead of the detected ones "
                                          "(e.g. a forwarded port); usually a per-machine setting.", ())
    public: str = key(rules.choice(PUBLIC_CHOICES, aliases={True: "yes", False: "no"}),
                      "auto: serve the DHT and relay once a dial-back shows the node reachable; "
                      "yes: do so from the start (bootstrap nodes); no: never.", "auto")


@dataclass(frozen=True)
class ShardConfig:
    """How the swarm keeps its weights (``volunteer.daemon.shards``): how many volunteers
    should serve each uid, how often a node reconsiders what it hosts, how often it refreshes
    the shard it hands out, and the chunk size of shards on the wire."""

    replication: int = key(rules.integer(1, 64),
                           "How many volunteers should serve each expert; more survives churn, "
                           "fewer covers a bigger grid.", 2)
    rebalance_interval_s: float = key(rules.number(1.0, 86400.0),
                                      "How often a volunteer reconsiders which experts it hosts.", 60.0)
    snapshot_interval_s: float = key(rules.number(1.0, 86400.0),
                                     "How often it refreshes the shards it hands to newcomers.", 30.0)
    chunk_bytes: int = key(rules.integer(1 << 16, 1 << 26),
                           "Shard chunk size on the wire (each chunk carries a sha256).", 1 << 20)


@dataclass(frozen=True)
class AveragingSection:
    """How replicas of one expert uid stay one expert (``volunteer.daemon.replicas``): every
    ``replica_period_s`` seconds a node hosting a uid runs one elastic exchange with a random
    other holder of it, each side moving ``replica_alpha`` of the way towards the other's
    weights (the Elastic Gossip thesis's pull; 0.5 makes both equal to their mean).
    ``replica_period_s: 0`` turns replica averaging off (replicas then drift apart)."""

    replica_period_s: float = key(rules.period_or_off(0.5, 86400.0),
                                  "How often a volunteer averages each expert it hosts with a "
                                  "random other holder of that uid; 0: off (replicas drift apart).",
                                  30.0)
    replica_alpha: float = key(rules.number(0.0, 1.0, lo_open=True),
                               "How far each side moves towards the other (0.5: both meet halfway).",
                               0.5)

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

    compression: str | None = key(rules.choice(COMPRESSIONS, none_as="none"),
                                  "Trainers' default wire compression: none (as computed), fp16 "
                                  "or bf16 (half the bytes), int8 (a quarter, blockwise). "
                                  "Volunteers answer in the compression a call came with.", None)


def _admission_key(type_: str, expected: str, help: str) -> Key:
    # checked as a whole by ``admission.parse_admission`` (duplicates, owner-or-peers)
    return Key(Rule(type_, expected, lambda value: value), help)


ADMISSION_KEYS: dict[str, Key] = {
    "owner": _admission_key("string", "ed25519:<64 hex digits> (`volunteer admission keygen` prints it)",
                            "The experiment owner's public key: peers holding a token it signed "
                            "(`volunteer admission issue`, installed with `volunteer admission install`) may take part."),
    "peers": _admission_key("list", f"a list of at most {MAX_LISTED_PEERS} peer ids such as 12D3KooW...",
                            "Peers admitted without a token (`volunteer admission show` prints a "
                            "node's peer id)."),
}


DEFAULT_SERVING = ServingLimits()

SECTIONS: dict[str, tuple[str, bool]] = {
    # section -> (what it is, required); the keys are its class's fields (Manifest's annotations)
    "experiment": ("Who the experiment is.", True),
    "expert": ("What one expert is.", True),
    "grid": ("How many experts there are and their uids.", True),
    "optimizer": ("How experts update their weights.", False),
    "serving": ("What one volunteer accepts per request and holds in memory.", False),
    "network": ("How volunteers find each other.", False),
    "shards": ("How the swarm keeps its weights.", False),
    "admission": ("Who may take part. Absent: everyone; present: an owner key and/or listed peers.", False),
    "averaging": ("How replicas of one expert stay one expert.", False),
    "wire": ("How trainers send tensors by default.", False),
}


@dataclass(frozen=True)
class Manifest:
    """A validated experiment manifest; ``source`` is where it was read from."""

    experiment: ExperimentInfo
    expert: ExpertSpec
    grid: GridSpec
    optimizer: OptimizerConfig = OptimizerConfig()
    serving: ServingLimits = DEFAULT_SERVING
    network: NetworkConfig = NetworkConfig()
    source: str = ""  # where it was read from: not a manifest key
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


@dataclass(frozen=True)
class KeyInfo:
    """One manifest key as declared: what the validator checks and the reference prints.
    ``default`` is ``MISSING`` for a required key."""

    name: str
    rule: Rule
    help: str
    default: Any

    @property
    def required(self) -> bool:
        return self.default is MISSING


@dataclass(frozen=True)
class SectionInfo:
    """One manifest section: its keys in declaration order and the class it parses into."""

    name: str
    help: str
    required: bool
    cls: type
    keys: tuple[KeyInfo, ...]


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _keys(cls: type) -> tuple[KeyInfo, ...]:
    out = []
    for f in fields(cls):
        if cls is ServingLimits:
            rule = rules.from_limit(limit_expectation(f.name), partial(limit_problem, f.name),
                                    is_integer_limit(f.name))
            declared = Key(rule, SERVING_HELP[f.name])
        elif cls is AdmissionSpec:
            declared = ADMISSION_KEYS[f.name]
        else:
            declared = f.metadata["key"]
        out.append(KeyInfo(f.name, declared.rule, declared.help, _default(f)))
    return tuple(out)


def manifest_sections() -> tuple[SectionInfo, ...]:
    """Every section of the manifest with its keys, in declaration order: the one table both
    ``validate.validate_document`` and ``reference`` read."""
    hints = get_type_hints(Manifest)
    out = []
    for f in fields(Manifest):
        if f.name not in SECTIONS:
            continue  # not a manifest key (``source``)
        help, required = SECTIONS[f.name]
        cls = hints[f.name]
        out.append(SectionInfo(f.name, help, required, cls, _keys(cls)))
    return tuple(out)
