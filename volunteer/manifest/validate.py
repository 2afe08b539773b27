"""Strict validation of a parsed manifest document into ``Manifest``.

Every check raises ``ManifestError`` naming the key path (``serving.max_batch_size``,
``network.bootstrap[1]``) and what was expected. Unknown keys are rejected so a typo never
silently falls back to a default. The ``serving`` section parses into
``volunteer.runtime.limits.ServingLimits``: its keys, defaults and ranges are that
dataclass's fields, so the manifest, the runtime and the wire share one definition.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from volunteer.manifest.admission import parse_admission
from volunteer.manifest.errors import ManifestError, describe
from volunteer.manifest.schema import (
    PUBLIC_CHOICES,
    AveragingSection,
    ExperimentInfo,
    ExpertSpec,
    GridSpec,
    Manifest,
    NetworkConfig,
    OptimizerConfig,
    ShardConfig,
    WireSection,
)
from volunteer.runtime.limits import (
    LIMIT_FIELDS,
    ServingLimits,
    is_integer_limit,
    limit_expectation,
    limit_problem,
)
from volunteer.wire import COMPRESSIONS

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,31}$")
PREFIX_SEGMENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
OPTION_KEY_RE = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
OPTIMIZERS = ("adam", "sgd")  # as volunteer.experts.backend.OPTIMIZERS
MAX_GRID_SIZE = 2**20
MAX_GRID_DIMS = 4
MAX_ADDRS = 64
MAX_OPTIONS = 32
MIN_REPLICA_PERIOD_S = 0.5
MAX_REPLICA_PERIOD_S = 86400.0


class _Section:
    """A mapping at a key path, with typed getters that raise ``ManifestError``."""

    def __init__(self, data: Any, path: str, file: str, allowed: Collection[str]) -> None:
        self.file = file
        self.path = path
        if not isinstance(data, Mapping):
            raise ManifestError(file, path or "(top level)", f"expected a mapping, got {describe(data)}")
        for key in data:
            if not isinstance(key, str) or key not in allowed:
                known = ", ".join(sorted(allowed))
                raise ManifestError(file, self.key(str(key)), f"unknown key (expected one of: {known})")
        self.data = data

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, expected: str, value: Any) -> ManifestError:
        return ManifestError(self.file, self.key(name), f"expected {expected}, got {describe(value)}")

    def require(self, name: str) -> Any:
        if name not in self.data:
            raise ManifestError(self.file, self.key(name), "missing required key")
        return self.data[name]

    def section(self, name: str, allowed: Collection[str], required: bool = True) -> _Section:
        if name not in self.data and not required:
            return _Section({}, self.key(name), self.file, allowed)
        return _Section(self.require(name), self.key(name), self.file, allowed)

    def integer(self, name: str, default: int | None = None, lo: int = 0, hi: int = 2**62) -> int:
        value = self.data.get(name, default) if default is not None else self.require(name)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(name, f"an integer in [{lo}, {hi}]", value)
        return value

    def optional_integer(self, name: str, lo: int, hi: int) -> int | None:
        if self.data.get(name) is None:
            return None
        return self.integer(name, lo=lo, hi=hi)

    def number(self, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = self.data.get(name, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            bracket = "(" if lo_open else "["
            raise self.fail(name, f"a number in {bracket}{lo:g}, {hi:g}]", value)
        return value

    def string(self, name: str, pattern: re.Pattern[str], what: str, default: str | None = None) -> str:
        value = self.data.get(name, default) if default is not None else self.require(name)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not pattern.match(value):
            raise self.fail(name, what, value)
        return value

    def string_list(self, name: str, check: Any) -> tuple[str, ...]:
        value = self.data.get(name, [])
        if value is None:
            value = []
        if not isinstance(value, list) or len(value) > MAX_ADDRS:
            raise self.fail(name, f"a list of at most {MAX_ADDRS} multiaddr strings", value)
        out = []
        for i, item in enumerate(value):
            problem = check(item)
            if problem:
                raise ManifestError(self.file, f"{self.key(name)}[{i}]", problem)
            out.append(item)
        return tuple(out)


def _multiaddr_problem(value: Any, need_peer_id: bool) -> str | None:
    """None when ``value`` parses as a multiaddr (with ``/p2p/<id>`` when required)."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 512:
        return f"expected a multiaddr string such as /ip4/1.2.3.4/tcp/4001/p2p/Qm..., got {describe(value)}"
    try:
        from multiaddr import Multiaddr

        addr = Multiaddr(value)
        protocols = [p.name for p in addr.protocols()]
    except Exception as exc:  # the multiaddr parser raises several unrelated types
        return f"expected a valid multiaddr, got {value!r} ({exc})"
    if need_peer_id and "p2p" not in protocols:
        return f"expected a multiaddr ending in /p2p/<peer id>, got {value!r}"
    return None


def _serving(sv: _Section) -> ServingLimits:
    """The ``serving`` section parsed into ``ServingLimits``: one key per field, the field's
    own default and range (``volunteer.runtime.limits``), so nothing is defined twice."""
    values: dict[str, Any] = {}
    for name in LIMIT_FIELDS:
        if name not in sv.data:
            continue
        value = sv.data[name]
        if limit_problem(name, value) is not None:
            raise sv.fail(name, limit_expectation(name), value)
        values[name] = value if value is None or is_integer_limit(name) else float(value)
    return ServingLimits(**values)


def validate_document(doc: Any, file: str, known_kinds: Collection[str] | None = None) -> Manifest:
    """Turn a parsed YAML document into a ``Manifest`` or raise ``ManifestError``."""
    top = _Section(doc, "", file, ("experiment", "expert", "grid", "optimizer", "serving", "network", "shards",
                                   "admission", "averaging", "wire"))

    exp = top.section("experiment", ("name", "version", "description", "seed"))
    description = exp.data.get("description", "")
    if not isinstance(description, str) or len(description) > 500:
        raise exp.fail("description", "a string of at most 500 characters", description)
    experiment = ExperimentInfo(
        name=exp.string("name", NAME_RE, "a lowercase name of letters, digits, '-' or '_' (at most 64)"),
        version=exp.string("version", VERSION_RE, "a version such as 1 or 0.3.1"),
        description=description,
        seed=exp.integer("seed", 0, 0, 2**63 - 1),
    )

    ex = top.section("expert", ("kind", "hidden_dim", "options"))
    kind = ex.require("kind")
    if not isinstance(kind, str) or not OPTION_KEY_RE.match(kind):
        raise ex.fail("kind", "an expert kind name such as ffn", kind)
    if known_kinds is not None and kind not in known_kinds:
        raise ex.fail("kind", "one of " + ", ".join(sorted(known_kinds)), kind)
    options = ex.data.get("options") or {}
    if not isinstance(options, Mapping) or len(options) > MAX_OPTIONS:
        raise ex.fail("options", f"a mapping of at most {MAX_OPTIONS} options", options)
    for key, value in options.items():
        if not isinstance(key, str) or not OPTION_KEY_RE.match(key):
            raise ManifestError(file, f"expert.options.{key}", "expected a lowercase option name")
        if not isinstance(value, (int, float, str, bool)) or (isinstance(value, str) and len(value) > 100):
            raise ManifestError(
                file, f"expert.options.{key}", f"expected a number, boolean or short string, got {describe(value)}"
            )
    expert = ExpertSpec(kind=kind, hidden_dim=ex.integer("hidden_dim", lo=1, hi=65536), options=dict(options))

    gr = top.section("grid", ("prefix", "dims"))
    prefix = gr.require("prefix")
    segments = prefix.split(".") if isinstance(prefix, str) else []
    if not segments or len(prefix) > 128 or not all(PREFIX_SEGMENT_RE.match(s) for s in segments):
        raise gr.fail("prefix", "dot-separated names that do not start with a digit, e.g. demo.ffn", prefix)
    dims = gr.require("dims")
    if (
        not isinstance(dims, list)
        or not 1 <= len(dims) <= MAX_GRID_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 65536 for d in dims)
    ):
        raise gr.fail("dims", f"a list of 1 to {MAX_GRID_DIMS} positive integers", dims)
    grid = GridSpec(prefix=prefix, dims=tuple(dims))
    if grid.size > MAX_GRID_SIZE:
        raise gr.fail("dims", f"at most {MAX_GRID_SIZE} experts in total", dims)

    op = top.section("optimizer", ("name", "lr", "clip_grad_norm", "momentum", "weight_decay"), required=False)
    name = op.data.get("name", "adam")
    if name not in OPTIMIZERS:
        raise op.fail("name", "one of " + ", ".join(OPTIMIZERS), name)
    clip = op.data.get("clip_grad_norm")
    optimizer = OptimizerConfig(
        name=name,
        lr=op.number("lr", 1e-3, 0.0, 10.0, lo_open=True),
        clip_grad_norm=None if clip is None else op.number("clip_grad_norm", 1.0, 0.0, 1e6, lo_open=True),
        momentum=op.number("momentum", 0.0, 0.0, 0.999999),
        weight_decay=op.number("weight_decay", 0.0, 0.0, 1.0),
    )

    serving = _serving(top.section("serving", tuple(LIMIT_FIELDS), required=False))

    nw = top.section("network", ("bootstrap", "relays", "listen_port", "announce_addrs", "public"), required=False)
    public = nw.data.get("public", "auto")
    if public is True or public is False:  # YAML 1.1 reads a bare yes/no as a boolean
        public = "yes" if public else "no"
    if public not in PUBLIC_CHOICES:
        raise nw.fail("public", "one of " + ", ".join(PUBLIC_CHOICES), public)
    network = NetworkConfig(
        bootstrap=nw.string_list("bootstrap", lambda v: _multiaddr_problem(v, need_peer_id=True)),
        relays=nw.string_list("relays", lambda v: _multiaddr_problem(v, need_peer_id=True)),
        listen_port=nw.integer("listen_port", 0, 0, 65535),
        announce_addrs=nw.string_list("announce_addrs", lambda v: _multiaddr_problem(v, need_peer_id=False)),
        public=public,
    )
    sh = top.section("shards", ("replication", "rebalance_interval_s", "snapshot_interval_s", "chunk_bytes"),
                     required=False)
    ds = ShardConfig()
    shards = ShardConfig(
        replication=sh.integer("replication", ds.replication, 1, 64),
        rebalance_interval_s=sh.number("rebalance_interval_s", ds.rebalance_interval_s, 1.0, 86400.0),
        snapshot_interval_s=sh.number("snapshot_interval_s", ds.snapshot_interval_s, 1.0, 86400.0),
        chunk_bytes=sh.integer("chunk_bytes", ds.chunk_bytes, 1 << 16, 1 << 26),
    )
    admission = parse_admission(doc.get("admission"), file)
    averaging = _averaging(top.section("averaging", ("replica_period_s", "replica_alpha"), required=False))
    wire = _wire(top.section("wire", ("compression",), required=False))
    return Manifest(experiment, expert, grid, optimizer, serving, network, source=file, shards=shards,
                    admission=admission, averaging=averaging, wire=wire)


def _wire(wr: _Section) -> WireSection:
    """The ``wire`` section: trainers' default compression, ``none`` (or null) for none."""
    value = wr.data.get("compression")
    if value is None or value == "none":
        return WireSection(compression=None)
    if value not in COMPRESSIONS:
        raise wr.fail("compression", "one of " + ", ".join(c or "none" for c in COMPRESSIONS), value)
    return WireSection(compression=value)


def _averaging(av: _Section) -> AveragingSection:
    """The ``averaging`` section: replica averaging's period (0: off) and elastic alpha."""
    d = AveragingSection()
    period = av.number("replica_period_s", d.replica_period_s, 0.0, MAX_REPLICA_PERIOD_S)
    if 0 < period < MIN_REPLICA_PERIOD_S:
        raise av.fail("replica_period_s", f"0 (off) or a number in [{MIN_REPLICA_PERIOD_S:g}, "
                                          f"{MAX_REPLICA_PERIOD_S:g}]", period)
    return AveragingSection(replica_period_s=period,
                            replica_alpha=av.number("replica_alpha", d.replica_alpha, 0.0, 1.0, lo_open=True))
