"""``run_doctor``: every check in order, each under its own time bound, into one ``Report``.

Order: software and device, home, disk, ports (cheap, local), then the bootstrap peers by
TCP (``bootstrap.py``), then, only when one of them answered, the libp2p probe
(``network.py``: handshake, dial-back reachability, relay, clock skew, hole punch). With no
bootstrap peer (a new swarm) or none reachable, the network part is skipped, so an offline
doctor finishes in the time torch takes to import.

Where the ports come from: ``zmq_host``/``zmq_port`` settings; ``listen_host`` setting and
the libp2p ``listen_port`` (the setting when the volunteer set one, else the manifest's
``network.listen_port``). A port held by this home's own running daemon is fine (asked
through the control API's ``status``, read-only).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from volunteer.doctor import bootstrap as boot
from volunteer.doctor.local import check_disk, check_home, check_software
from volunteer.doctor.ports import check_port
from volunteer.doctor.report import Report, skipped

TCP_TIMEOUT_S = 3.0
CONTROL_WAIT_S = 2.0


def listen_port_of(settings: Any, manifest_port: int) -> int:
    """The libp2p port: the ``listen_port`` setting when the volunteer set one (the setting
    arrives with the per-machine network settings), else the manifest's ``network.listen_port``."""
    values = settings.as_dict()
    if "listen_port" in values and settings.source("listen_port") != "default" \
            and str(values["listen_port"]).strip().isdigit():
        return int(values["listen_port"])
    return manifest_port


def _own_ports(root: Path) -> frozenset[int]:
    """TCP ports the daemon running on this home holds (empty when none runs)."""
    from volunteer.daemon.control_client import call
    from volunteer.daemon.home import NodeHome

    node = NodeHome(root)
    if not root.is_dir() or not node.is_locked():
        return frozenset()
    ports: set[int] = set()
    try:
        snap = call(root, "status", wait_s=CONTROL_WAIT_S)
    except Exception:  # starting, or an older daemon: treat its ports as unknown
        return frozenset()
    text = [str(snap.get("endpoint", ""))] if isinstance(snap, Mapping) else []
    net = snap.get("network") if isinstance(snap, Mapping) else None
    if isinstance(net, Mapping) and isinstance(net.get("addrs"), list):
        text += [str(a) for a in net["addrs"][:32]]
    for item in text:
        for sep in ("/tcp/", ":"):
            tail = item.rsplit(sep, 1)[-1].split("/")[0] if sep in item else ""
            if tail.isdigit() and 0 < int(tail) < 65536:
                ports.add(int(tail))
    return frozenset(ports)


def bootstrap_targets(flag_addrs: Sequence[str], manifest_addrs: Sequence[str]) -> list[boot.Target]:
    """Flag addresses first, then the manifest's; each tagged with where it came from."""
    out: dict[str, boot.Target] = {}
    for source, addrs in (("flag", flag_addrs), ("manifest", manifest_addrs)):
        for addr in addrs:
            if addr not in out:
                try:
                    out[addr] = boot.parse_target(addr, source)
                except ValueError:
                    continue  # /dnsaddr and other forms the TCP probe cannot follow
    return list(out.values())


def run_doctor(experiment: str | None, home: Path, flag_bootstrap: Sequence[str] = (),
               env: Mapping[str, str] | None = None, network: bool = True) -> Report:
    """Run every check (see module docstring); bad settings/manifest/flags raise their
    ``SettingsError`` / ``ManifestError`` (the CLI's exit code 2)."""
    from volunteer.daemon.home import NodeHome
    from volunteer.daemon.network import check_bootstrap_addrs
    from volunteer.daemon.settings import resolve_settings

    env = dict(os.environ) if env is None else env
    node = NodeHome(home)
    flags = check_bootstrap_addrs(flag_bootstrap)
    settings = resolve_settings(node.config_file if home.is_dir() else None, env, {})
    manifest = None
    if experiment is not None:
        from volunteer.manifest import load_manifest

        manifest = load_manifest(experiment)
    report = Report(manifest.experiment.name if manifest is not None else "(none)", str(home))
    report.add(*check_software(settings.device))
    report.add(*check_home(home))
    report.add(check_disk(home, int(settings.shard_cache_bytes)))

    own = _own_ports(home)
    report.add(check_port("zmq port", settings.zmq_host, int(settings.zmq_port), "ZeroMQ frontend", "zmq_port", own))
    listen_host = settings.listen_host
    listen_port = listen_port_of(settings, manifest.network.listen_port if manifest else 0)
    libp2p = check_port("libp2p port", listen_host, listen_port, "libp2p listener", "listen_port", own)
    report.add(libp2p)

    if not settings.network_enabled and not flags:
        report.add(skipped("network", "network_enabled is false: the node serves over ZeroMQ only"))
        return report
    targets = bootstrap_targets(flags, manifest.network.bootstrap if manifest else ())
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(targets)))) as pool:
        results = list(pool.map(lambda t: boot.probe_tcp(t, TCP_TIMEOUT_S), targets))
    report.add(*boot.check_bootstrap(results))
    live = [r.target for r in results if r.error is None]
    if not live:
        return report
    if not network:
        report.add(skipped("libp2p", "skipped (--offline)"))
        return report
    from volunteer.doctor.network import ProbePlan, probe_network
    from volunteer.doctor.network_checks import network_checks
    from volunteer.net.registry import DEFAULT_TTL

    port = listen_port if libp2p.verdict == "ok" and listen_port not in own else 0
    plan = ProbePlan(experiment=manifest.experiment.name if manifest else "", bootstrap=tuple(t.addr for t in live),
                     relays=tuple(manifest.network.relays) if manifest else (),
                     listen_host=listen_host, listen_port=port,
                     grid_prefix=manifest.grid.prefix if manifest else "",
                     grid_dims=tuple(manifest.grid.dims) if manifest else ())
    report.add(*network_checks(probe_network(plan), live, DEFAULT_TTL))
    return report
