"""The daemon's side of the peer network: which bootstrap peers, start-up, load, errors.

``effective_network(manifest.network, extra_bootstrap, new_swarm)`` applies the ``join``
flags to the manifest's ``network`` section: ``--bootstrap ADDR`` (repeatable) adds peers
in front of the manifest's, ``--new-swarm`` ignores the manifest's peers and starts a new
swarm (the node's multiaddrs are then what other volunteers pass as ``--bootstrap``).
Flag addresses are validated like the manifest's (a multiaddr ending in ``/p2p/<id>``).

``start_network(...)`` builds the typed ``volunteer.net.config.NetworkConfig`` from the
(effective) manifest section and the local ``listen_host``, starts
``volunteer.net.service.NetworkService`` with the node's ``ServingLimits`` (the manifest's
``serving`` section, so the libp2p RPC server applies the limits the ZeroMQ frontend does)
and announces the hosted experts (a listen that fails, e.g. a port taken, is the service's
``ListenError``). Any failure becomes ``NetworkStartError`` with a one-line
reason and the fix: the daemon then exits non-zero instead of serving half-joined (a node
that no trainer can find is worse than a clear error; ``network_enabled=false`` serves over
ZeroMQ only, on purpose).

``network_load(stats, max_queue_size)`` is the load carried by the DHT records (0..1, the
fullest task queue), so trainers prefer idle servers; ``network_problem(snapshot)`` is the
"why" line when the network is unwell (pure, for the health rules).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volunteer.daemon.settings import SettingsError
from volunteer.manifest.admission import OPEN, AdmissionSpec
from volunteer.manifest.schema import NetworkConfig as NetworkSection
from volunteer.runtime.limits import ServingLimits

if TYPE_CHECKING:  # the network modules (trio, libp2p) load only when the network starts
    from volunteer.net.config import NetworkConfig
    from volunteer.net.service import NetworkService
    from volunteer.net.shard_rpc import ShardServer

log = logging.getLogger(__name__)

MAX_FLAG_BOOTSTRAP = 32
NETWORK_START_TIMEOUT_S = 90.0


class NetworkStartError(Exception):
    """The peer network could not start; ``str(err)`` is one line naming cause and fix."""


def check_bootstrap_addrs(addrs: Sequence[str]) -> tuple[str, ...]:
    """Validate ``--bootstrap`` values: multiaddrs with a ``/p2p/<peer id>`` (SettingsError)."""
    from multiaddr import Multiaddr

    if len(addrs) > MAX_FLAG_BOOTSTRAP:
        raise SettingsError(f"--bootstrap: at most {MAX_FLAG_BOOTSTRAP} addresses, got {len(addrs)}")
    out = []
    for addr in addrs:
        text = str(addr).strip()
        try:
            parsed = Multiaddr(text)
        except Exception as exc:  # the multiaddr parser raises several unrelated types
            raise SettingsError(f"--bootstrap {text!r}: not a multiaddr ({exc})") from None
        if "p2p" not in [p.name for p in parsed.protocols()]:
            raise SettingsError(f"--bootstrap {text!r}: expected a multiaddr ending in /p2p/<peer id>, "
                                "as printed by the first volunteer (`volunteer status` shows it)")
        out.append(text)
    return tuple(dict.fromkeys(out))


def effective_network(network: NetworkSection, extra_bootstrap: Sequence[str] = (),
                      new_swarm: bool = False) -> NetworkSection:
    """The manifest's network section with the ``join`` flags applied (see module docstring)."""
    if new_swarm and extra_bootstrap:
        raise SettingsError("--new-swarm starts a swarm without bootstrap peers: drop --bootstrap or --new-swarm")
    if new_swarm:
        return dataclasses.replace(network, bootstrap=())
    if not extra_bootstrap:
        return network
    merged = tuple(dict.fromkeys([*check_bootstrap_addrs(extra_bootstrap), *network.bootstrap]))
    return dataclasses.replace(network, bootstrap=merged)


def start_network(
    home: Path, experiment: str, network: NetworkSection | NetworkConfig, submit: Callable[..., None],
    zmq_endpoint: str | None, listen_host: str, uids: Sequence[str], load: float,
    timeout: float = NETWORK_START_TIMEOUT_S, shard_server: ShardServer | None = None,
    limits: ServingLimits | None = None, admission: AdmissionSpec = OPEN,
) -> NetworkService:
    """Start the ``NetworkService`` and announce ``uids``; NetworkStartError on failure.

    ``network``: the manifest's (effective) ``network`` section, or a ready ``NetworkConfig``;
    ``limits``: the node's serving limits (the manifest's ``serving`` section);
    ``shard_server`` (a ``ShardServer``) answers other volunteers' shard and adoption requests;
    ``admission``: the manifest's admission section (a closed experiment needs this node's
    token: its absence is a one-line NetworkStartError naming the fix).
    """
    from volunteer.net.admission import AdmissionError
    from volunteer.net.config import network_config
    from volunteer.net.host import IdentityError
    from volunteer.net.service import NetworkService

    try:
        config = network_config(network, listen_host=listen_host or None)
    except ValueError as exc:
        raise NetworkStartError(f"bad network configuration: {exc}") from None
    try:
        service = NetworkService(home, experiment, config, submit=submit, zmq_endpoint=zmq_endpoint,
                                 limits=limits, shard_server=shard_server, admission=admission)
    except (IdentityError, AdmissionError) as exc:
        raise NetworkStartError(str(exc)) from None
    try:
        service.start(timeout=timeout)
    except BaseException as exc:
        _stop_quietly(service)
        if not isinstance(_leaf(exc), (OSError, TimeoutError)):  # a bug, not the environment:
            log.error("the peer network crashed while starting", exc_info=exc)  # keep the trace
        raise NetworkStartError(_start_failure(exc, config.listen_port, service.listen_host)) from None
    try:
        report = service.announce(list(uids), "serving", load)
    except BaseException as exc:
        _stop_quietly(service)
        raise NetworkStartError(f"announcing the hosted experts in the DHT failed: {_one_line(exc)}") from None
    if not report.ok:
        log.warning("the first DHT announce reached no peer; heartbeats keep retrying (%s)", report)
    return service


def network_load(stats: Mapping[str, Mapping[str, Any]], max_queue_size: int) -> float:
    """Fill of the fullest task queue, in [0, 1], rounded (what DHT records carry as load)."""
    depths = [float(s.get("queue_depth", 0) or 0) for s in stats.values()]
    return round(min(1.0, max(depths, default=0.0) / max(1, max_queue_size)), 2)


def network_problem(snapshot: Mapping[str, Any] | None) -> str | None:
    """One line saying what is wrong with the network section of the status, else None."""
    if not snapshot:
        return None
    if snapshot.get("error"):
        return f"the network service failed: {snapshot['error']}"
    boot = snapshot.get("bootstrap") if isinstance(snapshot.get("bootstrap"), Mapping) else {}
    connected = int(snapshot.get("connected_peers", 0) or 0)
    if not snapshot.get("new_swarm") and connected == 0:
        err = boot.get("last_error")
        return ("connected to no peer: the bootstrap peers are unreachable"
                + (f" ({err})" if err else "") + "; trainers cannot find this node through the DHT")
    if snapshot.get("last_announce_ok") is False:
        return "the last DHT announce reached no peer: trainers may not find this node (retrying)"
    return None


def _start_failure(exc: BaseException, port: int, listen_host: str) -> str:
    from volunteer.net.service import ListenError

    exc = _leaf(exc)
    if isinstance(exc, ListenError):  # the service names the address and the reason
        return (f"cannot listen on {exc.address} for the peer network ({exc.reason}); "
                "pick another network.listen_port in the manifest or set listen_host")
    text = _one_line(exc)
    if isinstance(exc, OSError) or "address already in use" in text.lower() or "errno 98" in text.lower():
        return (f"cannot listen on {listen_host}:{port} for the peer network ({text}); "
                "pick another network.listen_port in the manifest or set listen_host")
    if isinstance(exc, TimeoutError):
        return (f"the peer network did not become ready in time ({text}); check the bootstrap addresses "
                "or run offline with --set network_enabled=false")
    return f"the peer network failed to start: {text}"


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from trio nurseries."""
    inner = getattr(exc, "exceptions", None)
    while isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    return exc


def _one_line(exc: BaseException) -> str:
    exc = _leaf(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def _stop_quietly(service: NetworkService) -> None:
    try:
        service.stop()
    except Exception:
        log.debug("stopping a network service that failed to start failed too", exc_info=True)
