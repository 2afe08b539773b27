"""The lines a node logs once it is ready: what it joined, where it runs, what it hosts, how
trainers and other volunteers reach it, and how to check on it or leave."""

from __future__ import annotations

import logging
import shlex
from typing import TYPE_CHECKING

from volunteer import __version__
from volunteer.daemon.network import announce_line

if TYPE_CHECKING:
    from volunteer.daemon.supervisor import Supervisor

log = logging.getLogger("volunteer.daemon.supervisor")


def log_ready(sup: Supervisor) -> None:
    """The start-up lines: experiment, device, hosted experts, endpoint, network, how to leave."""
    m, ck = sup.manifest, sup.checkpointer
    assert ck is not None
    log.info("volunteer %s joined experiment %s v%s (%s)", __version__, m.experiment.name,
             m.experiment.version, m.source)
    bench = ""
    if sup.selfbench:
        bench = (f"; self-benchmark {sup.selfbench['train_samples_per_s']:.0f} train samples/s"
                 f"{' (cached)' if sup.selfbench.get('cached') else ''}")
    log.info("device: %s; %d torch thread(s)%s", sup.device_description, sup.torch_threads or 0, bench)
    hosted = [f"{u} (resumed at {ck.resumed[u]} updates)" if u in ck.resumed else u for u in sup.backends]
    log.info("hosting %d %s expert(s): %s", len(hosted), m.expert.kind, ", ".join(hosted) or "none yet")
    if sup.shards is not None and sup.shards.pending:
        log.info("downloading %d expert shard(s) from the swarm: %s (each is served once loaded)",
                 len(sup.shards.pending), ", ".join(sorted(sup.shards.pending)))
    log.info("trainers reach this node at %s", sup.endpoint)
    if sup.network is not None:
        _log_network(sup)
    log.info("status: volunteer status --home %s | leave: volunteer leave --home %s (or Ctrl-C)",
             sup.home.root, sup.home.root)


def _log_network(sup: Supervisor) -> None:
    net = sup.network
    full = list(net.multiaddrs)
    boot = list(sup.manifest.network.bootstrap)
    snap = net.snapshot()
    level, line = announce_line(net.peer_id, sup.manifest.experiment.name, sup.network_ready_s or 0.0, snap)
    log.log(level, "%s", line)  # claims "announced" only when a peer is connected (or in a new swarm)
    announced = {a.split("/p2p/")[0] for a in getattr(net.config, "announce_addrs", ())}
    for addr in full:  # with --announce, the host advertises those addresses, not its own
        log.info("  %s %s", "announced as" if addr.split("/p2p/")[0] in announced else "listening on", addr)
    if announced:
        for addr in net.listen_addrs:
            log.info("  listening on %s", addr)
    if boot:
        peers = int(snap.get("connected_peers", 0) or 0)
        if peers:
            log.info("joined the swarm through %d bootstrap peer(s): connected to %d peer(s)", len(boot), peers)
        else:
            log.warning("none of the %d bootstrap peer(s) answered yet (retrying): trainers cannot find this "
                        "node through the DHT until one does", len(boot))
    elif full:
        log.info("started a new swarm: other volunteers join it with `volunteer join %s --bootstrap %s`"
                 " (or list it under network.bootstrap in their manifest)", manifest_argument(sup.manifest.source),
                 full[0])


def manifest_argument(source: str) -> str:
    """What another volunteer passes to ``volunteer join`` for this manifest: the shipped name
    (``source`` reads "demo (shipped: volunteer/configs/demo.yaml)") or the path as given,
    quoted for a shell when it needs it."""
    name, sep, _ = source.partition(" (shipped: ")
    return name if sep else shlex.quote(source)
