"""The daemon's side of the peer network: which bootstrap peers, start-up, load, errors.

``effective_network(manifest.network, extra_bootstrap, new_swarm, settings, source)`` applies
the node's own choices to the manifest's ``network`` section, which is the experiment's
default: ``--bootstrap ADDR`` (repeatable) adds peers in front of the manifest's,
``--new-swarm`` ignores the manifest's peers and starts a new swarm (the node's multiaddrs are
then what other volunteers pass as ``--bootstrap``), and the per-machine settings
``listen_port``, ``announce_addrs`` and ``public`` (config file, ``VOLUNTEER_*``, ``--set``,
``join --listen-port/--announce/--public``) replace the manifest's values unless left at
``auto``. Addresses are validated by the manifest's own check
(``volunteer.manifest.validate.multiaddr_problem``). The result, an ``EffectiveNetwork``
(the manifest's section plus where each value came from), flows through the supervisor
unchanged, so errors can name the flag, setting or manifest file to fix.

The libp2p port is kept in the home (``NodeHome.keep_listen_port``): with ``listen_port``
left to the manifest's 0, ``start_network`` listens on the port of the last run again, so the
``--bootstrap`` address printed at the first start stays valid; when another program took
it meanwhile, it says so in one line and listens on a new port. A port set explicitly (setting
or manifest) is never replaced: taken, it is a one-line error naming who holds it and where
the port was set.

``start_network(...)`` builds the typed ``volunteer.net.config.NetworkConfig`` from the
(effective) manifest section and the local ``listen_host``, starts
``volunteer.net.service.NetworkService`` with the node's ``ServingLimits`` (the manifest's
``serving`` section, so the libp2p RPC server applies the limits the ZeroMQ frontend does)
and announces the hosted experts (a listen that fails, e.g. a port taken, is the service's
``ListenError``). Any failure becomes ``NetworkStartError`` with a one-line
reason and the fix: the daemon then exits non-zero instead of serving half-joined (a node
that no trainer can find is worse than a clear error; ``network_enabled=false`` serves over
ZeroMQ only, on purpose).

When no bootstrap peer answered the first round, ``start_network`` dials each one again from
a throwaway host (``volunteer.net.dialing.probe_bootstraps``) and logs, per address, what
happened in plain words and where the address came from ("connection refused at
127.0.0.1:4001 (address from the --bootstrap flag)"); the node keeps retrying in the
background. ``announce_line(...)`` is the ready line about the DHT: it claims the experts are
announced only when some peer is connected (or the node starts a new swarm).

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

from volunteer.daemon.settings import AUTO, BY_NAME, Settings, SettingsError
from volunteer.manifest.admission import OPEN, AdmissionSpec
from volunteer.manifest.schema import NetworkConfig as NetworkSection
from volunteer.runtime.limits import ServingLimits
from volunteer.status.announce import IN_A_NEW_SWARM, announced_where
from volunteer.status.fmt import duration

if TYPE_CHECKING:  # the network modules (trio, libp2p) load only when the network starts
    from volunteer.net.config import NetworkConfig
    from volunteer.net.service import NetworkService
    from volunteer.net.shard_rpc import ShardServer

log = logging.getLogger(__name__)

MAX_FLAG_BOOTSTRAP = 32
MAX_ANNOUNCE_ADDRS = 16
NETWORK_START_TIMEOUT_S = 90.0
BOOTSTRAP_PROBE_TIMEOUT_S = 5.0
FROM_FLAG = "the --bootstrap flag"
_FLAGS = {"listen_port": "--listen-port", "announce_addrs": "--announce", "public": "--public"}


class NetworkStartError(Exception):
    """The peer network could not start; ``str(err)`` is one line naming cause and fix."""


@dataclasses.dataclass(frozen=True)
class EffectiveNetwork(NetworkSection):
    """The manifest's ``network`` section after this node's flags and settings, and where
    the values came from (for error messages; the fields the network reads are the section's).

    ``bootstrap_origins``: (address, origin) pairs, e.g. "the --bootstrap flag";
    ``listen_port_origin``: where a fixed port was set ("" for the manifest's 0, any port);
    ``keep_port``: reuse the port of the last run (the port was left to the manifest's 0).
    """

    bootstrap_origins: tuple[tuple[str, str], ...] = ()
    listen_port_origin: str = ""
    keep_port: bool = True

    def origin_of(self, addr: str) -> str:
        """Where a bootstrap address came from ("the manifest's network.bootstrap (...)")."""
        return dict(self.bootstrap_origins).get(addr, "the manifest's network.bootstrap")


def check_bootstrap_addrs(addrs: Sequence[str]) -> tuple[str, ...]:
    """Validate ``--bootstrap`` values: multiaddrs with a ``/p2p/<peer id>`` (SettingsError)."""
    if len(addrs) > MAX_FLAG_BOOTSTRAP:
        raise SettingsError(f"--bootstrap: at most {MAX_FLAG_BOOTSTRAP} addresses, got {len(addrs)}")
    out = [_checked(str(addr).strip(), "--bootstrap", need_peer_id=True) for addr in addrs]
    return tuple(dict.fromkeys(out))


def _checked(addr: str, where: str, need_peer_id: bool) -> str:
    """``addr`` when the manifest's rule accepts it, else a one-line SettingsError."""
    from volunteer.manifest.validate import multiaddr_problem

    problem = multiaddr_problem(addr, need_peer_id=need_peer_id)
    if problem is None:
        return addr
    if problem.startswith("expected a multiaddr ending in"):
        raise SettingsError(f"{where} {addr!r}: {problem}, as printed by the first volunteer "
                            "(`volunteer status` shows it)")
    raise SettingsError(f"{where} {addr!r}: not a multiaddr ({problem})")


def setting_origin(settings: Settings, name: str) -> str:
    """Where a setting's value came from, as a user would name it."""
    source = settings.source(name)
    if source == "config":
        return f"the setting {name} in config.yaml"
    if source == "env":
        return f"the environment variable {BY_NAME[name].env}"
    if source == "flag":
        flag = _FLAGS.get(name)
        return f"{flag} (or --set {name}=...)" if flag else f"--set {name}=..."
    return f"the default of {name}"


def announce_setting(text: str, origin: str) -> tuple[str, ...]:
    """The ``announce_addrs`` setting (comma-separated multiaddrs, empty: none) as a tuple,
    each checked like the manifest's ``network.announce_addrs``; SettingsError naming origin."""
    addrs = [a.strip() for a in text.replace(" ", ",").split(",") if a.strip()]
    if len(addrs) > MAX_ANNOUNCE_ADDRS:
        raise SettingsError(f"{origin}: announce_addrs: at most {MAX_ANNOUNCE_ADDRS} addresses, got {len(addrs)}")
    return tuple(dict.fromkeys(_checked(a, f"{origin}: announce_addrs", need_peer_id=False) for a in addrs))


def effective_network(network: NetworkSection, extra_bootstrap: Sequence[str] = (),
                      new_swarm: bool = False, settings: Settings | None = None,
                      source: str = "") -> EffectiveNetwork:
    """The manifest's network section with the ``join`` flags and the node's network settings
    applied (see module docstring); ``source`` names the manifest in origins."""
    if new_swarm and extra_bootstrap:
        raise SettingsError("--new-swarm starts a swarm without bootstrap peers: drop --bootstrap or --new-swarm")
    in_manifest = f"the manifest's network.bootstrap ({source})" if source else "the manifest's network.bootstrap"
    flags = check_bootstrap_addrs(extra_bootstrap)
    manifest_peers = () if new_swarm else tuple(network.bootstrap)
    origins = {addr: in_manifest for addr in manifest_peers}
    origins.update({addr: FROM_FLAG for addr in flags})
    values: dict[str, Any] = {"bootstrap": tuple(dict.fromkeys([*flags, *manifest_peers]))}
    port_origin = f"the manifest's network.listen_port ({source or 'manifest'})" if network.listen_port else ""
    keep = not network.listen_port
    if settings is not None:
        if settings.listen_port != AUTO:
            values["listen_port"] = int(settings.listen_port)
            port_origin, keep = setting_origin(settings, "listen_port"), False
        if settings.announce_addrs != AUTO:
            values["announce_addrs"] = announce_setting(str(settings.announce_addrs),
                                                        setting_origin(settings, "announce_addrs"))
        if settings.public != AUTO:
            values["public"] = "yes" if settings.public else "no"
    fields = {f.name: getattr(network, f.name) for f in dataclasses.fields(NetworkSection)}
    return EffectiveNetwork(**{**fields, **values}, bootstrap_origins=tuple(origins.items()),
                            listen_port_origin=port_origin, keep_port=keep)


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
    from volunteer.daemon.home import NodeHome

    node_home = NodeHome(home)
    try:
        config = _network_config(network, listen_host)
    except ValueError as exc:
        raise NetworkStartError(f"bad network configuration: {exc}") from None
    kept = _kept_port(node_home, network, config)
    service = _start_service(home, experiment, config.with_local(listen_port=kept) if kept else config,
                             network, submit, zmq_endpoint, timeout, shard_server, limits, admission,
                             retry_any_port=bool(kept))
    _keep_bound_port(node_home, service, network)
    try:
        report = service.announce(list(uids), "serving", load)
    except BaseException as exc:
        _stop_quietly(service)
        raise NetworkStartError(f"announcing the hosted experts in the DHT failed: {_one_line(exc)}") from None
    if not report.ok:
        log.warning("the first DHT announce reached no peer; heartbeats keep retrying (%s)", report)
    if config.bootstrap and not int(service.snapshot().get("connected_peers", 0) or 0):
        for line in explain_bootstrap(network, config.bootstrap):
            log.warning("%s", line)
    return service


def _network_config(network: NetworkSection | NetworkConfig, listen_host: str) -> NetworkConfig:
    """The net layer's config; an ``EffectiveNetwork`` also hands down where each bootstrap
    address came from (plain data: the net layer never imports the daemon)."""
    from volunteer.net.config import network_config

    config = network_config(network, listen_host=listen_host or None)
    origin_of = getattr(network, "origin_of", None)
    if callable(origin_of) and config.bootstrap:
        config = config.with_local(bootstrap_origins=tuple((a, origin_of(a)) for a in config.bootstrap))
    return config


def _start_service(home: Path, experiment: str, config: NetworkConfig, network: Any,
                   submit: Callable[..., None], zmq_endpoint: str | None, timeout: float,
                   shard_server: ShardServer | None, limits: ServingLimits | None,
                   admission: AdmissionSpec, retry_any_port: bool) -> NetworkService:
    """Build and start the service; ``retry_any_port``: the port is the one kept from the last
    run, and taken between our probe and the listen: try once more on any free port."""
    from volunteer.net.admission import AdmissionError
    from volunteer.net.host import IdentityError
    from volunteer.net.listen_error import ListenError
    from volunteer.net.service import NetworkService

    try:
        service = NetworkService(home, experiment, config, submit=submit, zmq_endpoint=zmq_endpoint,
                                 limits=limits, shard_server=shard_server, admission=admission)
    except (IdentityError, AdmissionError) as exc:
        raise NetworkStartError(str(exc)) from None
    try:
        service.start(timeout=timeout)
    except BaseException as exc:
        _stop_quietly(service)
        leaf = _leaf(exc)
        if retry_any_port and isinstance(leaf, ListenError) and leaf.in_use:
            _warn_port_moved(config.listen_port, leaf.reason + (f" by {leaf.holder}" if leaf.holder else ""))
            return _start_service(home, experiment, config.with_local(listen_port=0), network, submit,
                                  zmq_endpoint, timeout, shard_server, limits, admission, retry_any_port=False)
        if not isinstance(leaf, (OSError, TimeoutError)):  # a bug, not the environment:
            log.error("the peer network crashed while starting", exc_info=exc)  # keep the trace
        raise NetworkStartError(_start_failure(exc, config.listen_port, service.listen_host,
                                               getattr(network, "listen_port_origin", ""))) from None
    return service


def _kept_port(node_home: Any, network: Any, config: NetworkConfig) -> int:
    """The port of the last run when the port is left to the manifest's 0 and that port is
    still free (0 otherwise: any free port; see module docstring)."""
    if config.listen_port or not getattr(network, "keep_port", False):
        return 0
    kept = node_home.kept_listen_port()
    if not kept:
        return 0
    from volunteer.net.host import default_listen_host
    from volunteer.net.listen_error import port_holder_error

    err = port_holder_error(config.listen_host or default_listen_host(), kept)
    if err is None:
        return kept
    _warn_port_moved(kept, err.reason + (f" by {err.holder}" if err.holder else ""))
    return 0


def _warn_port_moved(port: int, why: str) -> None:
    log.warning("the libp2p port %d of the last run is taken (%s): listening on a new port, so the "
                "--bootstrap address printed before changed; share the new one below (set --listen-port "
                "to keep one fixed)", port, why)


def _keep_bound_port(node_home: Any, service: NetworkService, network: Any) -> None:
    """Remember the port actually bound for the next start (not for an explicit 0)."""
    if not getattr(network, "keep_port", True) and not service.listen_port:
        return
    port = next((p for p in (_tcp_port(a) for a in service.listen_addrs) if p), 0)
    if port:
        try:
            node_home.keep_listen_port(port)
        except OSError as exc:  # the node runs; only the next start may pick another port
            log.warning("cannot keep the libp2p port in %s: %s", node_home.network_file, exc)


def _tcp_port(addr: str) -> int:
    parts = addr.split("/")
    try:
        return int(parts[parts.index("tcp") + 1])
    except (ValueError, IndexError):
        return 0


def explain_bootstrap(network: Any, addrs: Sequence[str],
                      timeout: float = BOOTSTRAP_PROBE_TIMEOUT_S) -> list[str]:
    """One line per bootstrap address that does not answer: what a fresh dial found, in plain
    words, and where the address came from; then the fix. Empty when every one answers now."""
    from volunteer.net.dialing import probe_bootstraps

    origin = getattr(network, "origin_of", lambda addr: "the manifest's network.bootstrap")
    lines, from_flag = [], False
    for r in probe_bootstraps(addrs, timeout):
        if r.ok:
            continue
        from_flag = from_flag or origin(r.addr) == FROM_FLAG
        lines.append(f"bootstrap peer {r.addr}: {r.problem} (address from {origin(r.addr)})")
    if lines:
        fix = ("check the --bootstrap address (copy it from `volunteer status` on that peer) and that the "
               "peer runs" if from_flag else
               "the manifest's bootstrap peers are down or their addresses are stale: pass a live one with "
               "--bootstrap (from `volunteer status` on a running peer)")
        lines.append(f"no bootstrap peer answered; this node retries in the background. Fix: {fix}")
    return lines


def announce_line(peer_id: str, experiment: str, ready_s: float,
                  snapshot: Mapping[str, Any] | None) -> tuple[int, str]:
    """(log level, line) saying whether the experts are announced in the DHT: only claimed
    when a peer is connected or the node starts a new swarm (nobody else to store them)."""
    head = f"peer id {peer_id}"
    where = announced_where(snapshot)
    ready = f"(network ready in {duration(ready_s)})"
    if where == IN_A_NEW_SWARM:  # no other peer holds the records yet: say so plainly
        return logging.INFO, (f"{head}; experts recorded in this node's DHT of experiment {experiment} "
                              f"(a new swarm: peers that join through it will find them) {ready}")
    if where:
        return logging.INFO, f"{head}; experts announced in {where} of experiment {experiment} {ready}"
    return logging.WARNING, (f"{head}; connected to no peer, so the experts are not announced in the DHT of "
                             f"experiment {experiment} yet (announced once a bootstrap peer answers)")


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


def port_fix(origin: str) -> str:
    """How to choose another libp2p port, given where the taken one was set."""
    if origin.startswith("the manifest"):
        return f"the port is set by {origin}: pick another on this machine with --listen-port N (0 = any free port)"
    return "pick another with --listen-port N (0 = any free port) or stop what holds it"


def _start_failure(exc: BaseException, port: int, listen_host: str, origin: str = "") -> str:
    from volunteer.net.listen_error import ListenError, held_port_line

    exc = _leaf(exc)
    if isinstance(exc, ListenError):  # the probe names the address, the reason and the holder
        if not exc.in_use:
            return (f"cannot listen on {exc.address} for the peer network ({exc.reason}); "
                    "set listen_host to an address of this machine (0.0.0.0: all, 127.0.0.1: loopback)")
        return held_port_line(exc, "libp2p", "--listen-port", origin)
    text = _one_line(exc)
    if isinstance(exc, OSError) or "address already in use" in text.lower() or "errno 98" in text.lower():
        return f"cannot listen on {listen_host}:{port} for the peer network ({text}); {port_fix(origin)}"
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
