"""``run_doctor``: every check in order, each under its own time bound, into one ``Report``.

Order: software and device, the manifest's expert kind (installed here?), home, disk, ports (cheap, local), then the bootstrap peers
(``bootstrap.py``: a TCP connect and a libp2p handshake each), then, only when one of them
answered, the libp2p probe (``network.py``: dial-back reachability, relay, clock skew, hole
punch). With no bootstrap peer (a new swarm) or none answering, the network part is skipped,
so an offline doctor finishes in the time torch takes to import.

The network values are the ones ``join`` would use: ``daemon.network.effective_network``
applies ``--bootstrap`` and the per-machine settings (``listen_port``, ``announce_addrs``,
``public``) to the manifest's section and says where each came from. The libp2p port is that
``listen_port``; left at 0 it is the port this home used last (``NodeHome.kept_listen_port``),
which the daemon reuses when free and replaces (with a warning) when taken. A port held by
this home's own running daemon is fine (asked through the control API's ``status``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from volunteer.doctor import bootstrap as boot
from volunteer.doctor.local import check_disk, check_expert_kind, check_home, check_software
from volunteer.doctor.ports import check_port
from volunteer.doctor.report import Report, skipped

CONTROL_WAIT_S = 2.0


def own_ports(snap: Mapping[str, Any] | None) -> frozenset[int]:
    """TCP ports named in a running daemon's status snapshot (its endpoint and multiaddrs)."""
    if not isinstance(snap, Mapping):
        return frozenset()
    text = [str(snap.get("endpoint", ""))]
    net = snap.get("network")
    if isinstance(net, Mapping) and isinstance(net.get("addrs"), list):
        text += [str(a) for a in net["addrs"][:32]]
    zmq = snap.get("zmq")
    if isinstance(zmq, Mapping):
        text.append(str(zmq.get("endpoint", "")))
    ports: set[int] = set()
    for item in text:
        for sep in ("/tcp/", ":"):
            tail = item.rsplit(sep, 1)[-1].split("/")[0] if sep in item else ""
            if tail.isdigit() and 0 < int(tail) < 65536:
                ports.add(int(tail))
    return frozenset(ports)


def daemon_snapshot(root: Path) -> Mapping[str, Any] | None:
    """The status of the daemon running on ``root``, None when none runs or answers."""
    from volunteer.daemon.control_client import call
    from volunteer.daemon.home import NodeHome

    if not root.is_dir() or not NodeHome(root).is_locked():
        return None
    try:
        snap = call(root, "status", wait_s=CONTROL_WAIT_S)
    except Exception:  # starting, or stuck: its ports count as unknown
        return None
    return snap if isinstance(snap, Mapping) else None


def run_doctor(experiment: str | None, home: Path, flag_bootstrap: Sequence[str] = (),
               env: Mapping[str, str] | None = None, network: bool = True) -> Report:
    """Run every check (see module docstring); bad settings/manifest/flags raise their
    ``SettingsError`` / ``ManifestError`` (the CLI's exit code 2)."""
    from volunteer.daemon.home import NodeHome
    from volunteer.daemon.network import effective_network, port_fix
    from volunteer.daemon.settings import resolve_settings
    from volunteer.manifest.schema import NetworkConfig as NetworkSection

    env = dict(os.environ) if env is None else env
    node = NodeHome(home)
    settings = resolve_settings(node.config_file if home.is_dir() else None, env, {})
    manifest = None
    if experiment is not None:
        from volunteer.manifest import load_manifest

        manifest = load_manifest(experiment)
    net = effective_network(manifest.network if manifest else NetworkSection(), flag_bootstrap, False, settings,
                            manifest.source if manifest else "")
    report = Report(manifest.experiment.name if manifest else "(none)", str(home))
    report.add(*check_software(settings.device))
    if manifest is not None:
        report.add(check_expert_kind(manifest.expert.kind, manifest.expert.package, manifest.source))
    report.add(*check_home(home))
    report.add(check_disk(home, int(settings.shard_cache_bytes)))

    mine = own_ports(daemon_snapshot(home))
    report.add(check_port("zmq port", settings.zmq_host, int(settings.zmq_port), "ZeroMQ frontend",
                          "stop what holds it, or pick another port: join --port N (the setting zmq_port; "
                          "0 = any free port)", mine))
    listen_port, movable = net.listen_port, False
    if not listen_port and net.keep_port and home.is_dir():
        listen_port, movable = node.kept_listen_port() or 0, True
    libp2p = check_port("libp2p port", settings.listen_host, listen_port, "libp2p listener",
                        port_fix(net.listen_port_origin), mine, movable)
    report.add(libp2p)

    if not settings.network_enabled and not flag_bootstrap:
        report.add(skipped("network", "network_enabled is false: the node serves over ZeroMQ only"))
        return report
    results = boot.probe(net.bootstrap)
    report.add(*boot.check_bootstrap(results, net.origin_of))
    live = tuple(r.addr for r in results if r.ok)
    if not live:
        return report
    if not network:
        report.add(skipped("libp2p", "reachability, relay, clock and hole punch skipped (--offline)"))
        return report
    from volunteer.doctor.network import ProbePlan, probe_network
    from volunteer.doctor.network_checks import network_checks
    from volunteer.net.registry import DEFAULT_TTL

    port = listen_port if libp2p.verdict == "ok" and listen_port not in mine else 0
    plan = ProbePlan(experiment=manifest.experiment.name if manifest else "", bootstrap=live,
                     relays=tuple(net.relays), listen_host=settings.listen_host, listen_port=port,
                     grid_prefix=manifest.grid.prefix if manifest else "",
                     grid_dims=tuple(manifest.grid.dims) if manifest else (),
                     identity_dir=node.cache_dir / "doctor-identity" if node.cache_dir.is_dir() else None)
    report.add(*network_checks(probe_network(plan), DEFAULT_TTL))
    return report
