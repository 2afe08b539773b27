"""A real ``volunteer join`` daemon attacked by a garbage peer on every protocol it serves.

The garbage peer (``garbage.py``) hits the ZeroMQ endpoint and every libp2p protocol at the
same time from two threads, then the control socket. While the attacks run and afterwards
a legitimate trainer keeps working: forwards through the public client API over libp2p
(``ClientNode`` + ``RemoteExpert``) and over ZeroMQ, DHT lookups that return only the
node's own sane entries, and ``volunteer status`` answering.

Memory bound: the daemon's RSS, sampled with psutil during and after the attack, may grow
by at most ``RSS_GROWTH_BOUND`` (256 MiB) over its warmed-up baseline. Justification: what
a garbage request may hold is one message (the demo manifest's ``max_bytes`` is 64 MiB,
the bulk messages here are 4 MiB) plus per-connection buffers, and legitimate forwards of
4x64 tensors allocate kilobytes; while the attack pushes ``BULK_MIB`` (384 MiB) of garbage
through ZeroMQ, tries a 300 MiB multipart message, and claims 2-4 GiB sizes on libp2p
streams. A node that kept what peers
sent, or allocated what they claimed, would exceed the bound; one that bounds by its own
limits stays far below it. The bound is on memory, not time: no timing is asserted.

The seed of the garbage is printed (``-s``) and can be fixed with
``VOLUNTEER_ADVERSARIAL_SEED``.
"""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import trio

from tests.adversarial.garbage import attack_control, attack_libp2p, attack_zmq
from tests.conftest import DaemonFactory, DaemonProc, run_cli
from tests.integration.shard_helpers import poll, status
from volunteer.client.node import ClientNode
from volunteer.client.remote_expert import RemoteExpert
from volunteer.net.records import dht_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
RSS_GROWTH_BOUND = 256 * 2**20
BULK_MIB = 384
PREFIXES = ("demo.ffn.", "demo.ffn.0.", "demo.ffn.1.")  # the demo grid is 2 x 4
CHILDREN = {"demo.ffn.": {"0", "1"}, "demo.ffn.0.": set("0123"), "demo.ffn.1.": set("0123")}


class Trainer:
    """The legitimate client: forwards over libp2p and ZeroMQ, lookups, status."""

    def __init__(self, daemon: DaemonProc, snap: dict[str, Any]) -> None:
        self.daemon = daemon
        self.peer = snap["network"]["peer_id"]
        self.addrs = snap["network"]["addrs"]
        self.uids = sorted(snap["experts"])
        self.client = ClientNode("demo", self.addrs, listen_addrs=LOOPBACK, nat=False).start()
        self.checks = 0

    def forward(self, uid: str, endpoint: Any) -> None:
        expert = RemoteExpert(uid, endpoint, timeout=30)
        try:
            with torch.no_grad():
                y = expert(torch.randn(4, 64))
        finally:
            expert.close()
        assert y.shape == (4, 64) and bool(torch.isfinite(y).all())

    def check(self) -> None:
        """One round of legitimate use; raises if the node fails any of it."""
        uid = self.uids[self.checks % len(self.uids)]
        self.forward(uid, self.client.transport(self.peer, self.addrs))  # libp2p
        self.forward(uid, self.daemon.endpoint)  # ZeroMQ
        for u in self.uids:
            entries = self.client.servers(u)
            assert entries and {e.peer_id for e in entries} == {self.peer}, entries
        for prefix, entries in self.client.lookup(PREFIXES).items():
            for e in entries:
                assert e.peer_id == self.peer and e.state in ("serving", "draining"), e
                assert set(e.children) <= CHILDREN[prefix], e
        assert status(self.daemon)["state"] == "serving"
        self.checks += 1

    def close(self) -> None:
        self.client.stop()


def _dropped(snap: dict[str, Any]) -> int:
    """How many DHT record entries/values the node dropped so far (all reasons)."""
    return sum((snap["network"].get("records_dropped") or {}).values())


def _in_thread(results: dict[str, Any], name: str, fn: Any, *args: Any) -> threading.Thread:
    def run() -> None:
        try:
            results[name] = fn(*args)
        except BaseException as exc:  # reported by the test, with the seed
            results[name] = exc

    thread = threading.Thread(target=run, name=f"attack-{name}", daemon=True)
    thread.start()
    return thread


def test_garbage_on_every_protocol_leaves_the_node_serving(tmp_path: Path,
                                                           volunteer_daemon: DaemonFactory) -> None:
    seed = int(os.environ.get("VOLUNTEER_ADVERSARIAL_SEED") or random.randrange(2**32))
    print(f"garbage seed: VOLUNTEER_ADVERSARIAL_SEED={seed}")
    home = tmp_path / "home"
    daemon = volunteer_daemon.start(home, "--num-experts", "2", network=True)
    snap = poll(lambda: (s := status(daemon))["network"].get("last_announce_ok") and
                s["network"].get("announced_uids") == 2 and s, 60, "the experts to be announced")
    trainer = Trainer(daemon, snap)
    try:
        poll(lambda: trainer.client.servers(trainer.uids[0]), 60, "the trainer to find an expert")
        trainer.check()  # warm-up: both transports, lookups, status
        dropped_before = _dropped(status(daemon))
        proc = psutil.Process(daemon.proc.pid)
        baseline = proc.memory_info().rss
        peak = baseline

        keys = [dht_key("demo", p) for p in PREFIXES]
        results: dict[str, Any] = {}
        threads = [
            _in_thread(results, "zmq", attack_zmq, daemon.endpoint, random.Random(seed), BULK_MIB),
            _in_thread(results, "libp2p", lambda: trio.run(
                attack_libp2p, trainer.addrs[0], random.Random(seed + 1), keys)),
        ]
        during = 0
        while any(t.is_alive() for t in threads):
            trainer.check()
            during += 1
            peak = max(peak, proc.memory_info().rss)
        for t in threads:
            t.join()
        for name in ("zmq", "libp2p"):
            assert not isinstance(results[name], BaseException), (name, seed, results[name])
        sent_control = attack_control(daemon.control["socket"], random.Random(seed + 2))
        peak = max(peak, proc.memory_info().rss)

        zmq_sent: Counter = results["zmq"]
        libp2p_sent, listed = results["libp2p"]
        print(f"zmq: {dict(zmq_sent)}; libp2p: {dict(libp2p_sent)}; control: {dict(sent_control)}")
        print(f"identify listed: {sorted(listed)}")
        print(f"legit rounds during the attack: {during}; rss baseline {baseline / 2**20:.0f} MiB, "
              f"peak {peak / 2**20:.0f} MiB")
        # the attacks really ran, on the protocols that matter
        assert zmq_sent["answered"] == 5 and zmq_sent["cut_off"] == 3
        assert zmq_sent["bulk_mib"] == BULK_MIB
        for protocol in ("/volunteer/expert-rpc/1.0.0", "/volunteer/shard/1.0.0", "/ipfs/kad/1.0.0",
                         "/ipfs/id/push/1.0.0", "/ipfs/ping/1.0.0"):
            assert libp2p_sent[protocol] >= 6, (protocol, libp2p_sent)
        assert sent_control["control"] == 7
        after = status(daemon)
        print(f"records dropped: {after['network'].get('records_dropped')}; "
              f"rpc: {after['network'].get('rpc')}")
        assert _dropped(after) > dropped_before  # the garbage records were dropped and counted

        # afterwards: still serving, lookups sane, status answers, memory bounded
        for _ in range(2):
            trainer.check()
        assert daemon.proc.poll() is None
        cli = run_cli("status", "--home", str(home))
        assert cli.returncode == 0 and "serving" in cli.stdout, cli.stdout + cli.stderr
        peak = max(peak, proc.memory_info().rss)
        assert peak - baseline <= RSS_GROWTH_BOUND, (
            f"RSS grew by {(peak - baseline) / 2**20:.0f} MiB > {RSS_GROWTH_BOUND / 2**20:.0f} MiB")
        assert "Traceback" not in daemon.output(), daemon.output()[-3000:]
    finally:
        trainer.close()

