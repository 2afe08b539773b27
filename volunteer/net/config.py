"""``NetworkConfig``: everything ``NetworkService`` needs to join the peer network, typed.

Built from the manifest's ``network`` section (``NetworkConfig.from_section``: bootstrap
peers, relays, listen port, announce addresses, ``public``) plus the node's local choices
(listen host, record TTL and heartbeat, NAT traversal on/off, how often the DHT mode rule is
re-applied). Frozen and validated on construction, so the service never reads attributes
of an untyped object and a bad value fails at start-up with the field's name.

The serving limits are not here: ``NetworkService`` takes the node's one
``volunteer.runtime.limits.ServingLimits`` next to this config and hands it to the libp2p
RPC server, as the runtime hands it to the ZeroMQ frontend. ``peer_limits`` is where the
per-peer fairness bounds (``volunteer.net.peer_limits.PeerLimits``) reach the RPC server;
None keeps the server's defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from volunteer.net.registry import DEFAULT_TTL

PUBLIC_CHOICES = ("auto", "yes", "no")
MAX_ADDRS = 64
MAX_ADDR_CHARS = 512


class NetworkSection(Protocol):
    """The manifest's ``network`` section (``volunteer.manifest.schema.NetworkConfig``)."""

    bootstrap: Sequence[str]
    relays: Sequence[str]
    listen_port: int
    announce_addrs: Sequence[str]
    public: str


@dataclass(frozen=True)
class NetworkConfig:
    """The network service's configuration (see module docstring).

    ``listen_host`` None means ``volunteer.net.host.default_listen_host()``;
    ``heartbeat_interval`` None means ``ttl / 2`` (a failed re-announce is retried after a
    third of that, still well before the entries expire).
    """

    bootstrap: tuple[str, ...] = ()
    relays: tuple[str, ...] = ()
    listen_host: str | None = None
    listen_port: int = 0
    announce_addrs: tuple[str, ...] = ()
    public: str = "auto"
    ttl: float = DEFAULT_TTL
    heartbeat_interval: float | None = None
    enable_nat: bool = True
    dht_mode_interval: float = 5.0
    peer_limits: object | None = None  # volunteer.net.peer_limits.PeerLimits, for RpcServer
    # (address, where it came from in words, e.g. "the --bootstrap flag"): named in errors
    bootstrap_origins: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("bootstrap", "relays", "announce_addrs"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ValueError(f"NetworkConfig.{name}: expected a list of multiaddr strings, got {value!r}")
            addrs = tuple(value)
            if len(addrs) > MAX_ADDRS or not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDR_CHARS
                                                  for a in addrs):
                raise ValueError(f"NetworkConfig.{name}: expected at most {MAX_ADDRS} multiaddr strings")
            object.__setattr__(self, name, addrs)
        origins = tuple(tuple(pair) for pair in self.bootstrap_origins)
        if len(origins) > MAX_ADDRS or not all(
                len(p) == 2 and all(isinstance(x, str) and 0 < len(x) <= MAX_ADDR_CHARS for x in p)
                for p in origins):
            raise ValueError("NetworkConfig.bootstrap_origins: expected (address, origin) string pairs")
        object.__setattr__(self, "bootstrap_origins", origins)
        port = self.listen_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"NetworkConfig.listen_port: expected an integer in [0, 65535], got {port!r}")
        if self.listen_host is not None and (not isinstance(self.listen_host, str) or not self.listen_host):
            raise ValueError(f"NetworkConfig.listen_host: expected a host name or address, got {self.listen_host!r}")
        if self.public not in PUBLIC_CHOICES:
            raise ValueError(f"NetworkConfig.public: expected one of {', '.join(PUBLIC_CHOICES)}, "
                             f"got {self.public!r}")
        for name in ("ttl", "heartbeat_interval", "dht_mode_interval"):
            value = getattr(self, name)
            if value is None and name == "heartbeat_interval":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and 0 < value <= 86400):
                raise ValueError(f"NetworkConfig.{name}: expected seconds in (0, 86400], got {value!r}")
        if not isinstance(self.enable_nat, bool):
            raise ValueError(f"NetworkConfig.enable_nat: expected a boolean, got {self.enable_nat!r}")

    @property
    def heartbeat_s(self) -> float:
        """Seconds between re-announces (half the record TTL unless set). Each re-announce
        costs a store at 5 DHT servers per key: at a third of the TTL, the re-announces of 64
        daemons were most of the DHT messages that saturated their machine."""
        return self.heartbeat_interval if self.heartbeat_interval is not None else self.ttl / 2

    @property
    def origins(self) -> dict[str, str]:
        """Bootstrap address -> where it came from, in words (empty when not told)."""
        return dict(self.bootstrap_origins)

    @property
    def new_swarm(self) -> bool:
        """True without bootstrap peers: this node starts a swarm of its own."""
        return not self.bootstrap

    @classmethod
    def from_section(cls, section: NetworkSection, **local: Any) -> NetworkConfig:
        """The config for the manifest's ``network`` section and the node's local choices
        (``listen_host``, ``ttl``, ``heartbeat_interval``, ``enable_nat``, ...)."""
        return cls(bootstrap=tuple(section.bootstrap), relays=tuple(section.relays),
                   listen_port=section.listen_port, announce_addrs=tuple(section.announce_addrs),
                   public=section.public, **local)

    def with_local(self, **local: Any) -> NetworkConfig:
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **local)


def network_config(network: NetworkConfig | NetworkSection | None, **local: Any) -> NetworkConfig:
    """``network`` as a ``NetworkConfig``: a config as is (with ``local`` applied), a manifest
    ``network`` section through ``from_section``, None as the defaults (a new swarm)."""
    local = {k: v for k, v in local.items() if v is not None}
    if isinstance(network, NetworkConfig):
        return network.with_local(**local) if local else network
    if network is None:
        return NetworkConfig(**local)
    return NetworkConfig.from_section(network, **local)
