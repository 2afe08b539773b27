"""Expert shards between real volunteer daemons on loopback: download, resume, hand-off.

Each test runs ``volunteer join`` processes on a small manifest written to ``tmp_path``
(``shard_helpers.write_manifest``) and checks weights bitwise: a shard's root hash commits to
every byte, and the decoded states are compared tensor by tensor as well.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory, DaemonProc, cli_env
from tests.integration.shard_helpers import (
    assert_states_equal,
    hosted,
    load_checkpoint_state,
    load_shard_state,
    poll,
    shard_dir,
    status,
    write_manifest,
)
from tests.integration.toy_trainer import ToyTrainer
from volunteer.client.moe import RemoteMixtureOfExperts
from volunteer.client.node import ClientNode
from volunteer.manifest import load_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def boot_addr(daemon: DaemonProc) -> str:
    return status(daemon)["network"]["addrs"][0]


def test_newcomer_downloads_from_two_holders_and_serves_equal_weights(
        tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    manifest = write_manifest(tmp_path / "m.yaml", "twoholders", [1, 2], hidden=256, replication=2)
    v0 = volunteer_daemon.start(tmp_path / "v0", "--new-swarm", "--num-experts", "2",
                                experiment=str(manifest), network=True)
    boot = boot_addr(v0)
    first = hosted(status(v0))
    assert sorted(first) == ["twoholders.ffn.0.0", "twoholders.ffn.0.1"]
    assert all(h["weights_from"] == "fresh (deterministic init)" for h in first.values())

    # A second volunteer: each uid has 1 of 2 replicas, so it takes both, downloaded from v0.
    v1 = volunteer_daemon.start(tmp_path / "v1", "--bootstrap", boot, "--num-experts", "2",
                                experiment=str(manifest), network=True)
    second = poll(lambda: len(hosted(status(v1))) == 2 and hosted(status(v1)), 60, "v1 to serve both uids")
    for uid, h in second.items():
        assert h["weights_from"].startswith("downloaded v0 from 1 holder"), h
        assert h["root"] == first[uid]["root"]  # same bytes: the root commits to every chunk

    # A third: both uids are at target; it takes one and fetches it from both holders at once.
    v2 = volunteer_daemon.start(tmp_path / "v2", "--bootstrap", boot, "--num-experts", "1",
                                experiment=str(manifest), network=True)
    third = poll(lambda: len(hosted(status(v2))) == 1 and status(v2), 60, "v2 to serve one uid")
    (uid, h), = hosted(third).items()
    assert h["root"] == first[uid]["root"]
    download = third["shards"]["downloads"][uid]
    assert download["state"] == "done" and download["chunks_total"] >= 16
    assert len(download["sources"]) == 2 and all(n > 0 for n in download["sources"].values()), download
    assert sum(download["sources"].values()) == download["chunks_total"]
    assert download["fetched_bytes"] == download["total_bytes"] and not download["bad_sources"]
    # A holder whose record says it is publicly reachable serves over ZeroMQ (plain TCP), the
    # others over libp2p streams; here v1 passed the dial-back check, v0 (the first) could not.
    for holder in (v0, v1):
        net = status(holder)["network"]
        assert download["via"][net["peer_id"]] == ("zmq" if net["reachability"] == "public" else "libp2p")
    # And bitwise, tensor by tensor: the newcomer's shard equals the first holder's.
    assert_states_equal(load_shard_state(v2.home, "twoholders", h["root"], uid),
                        load_shard_state(v0.home, "twoholders", first[uid]["root"], uid))


def test_kill_during_download_resumes_from_the_chunks_on_disk(
        tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    # 4 uids of ~33 MB each, downloaded one after another: a kill -9 lands inside one of them.
    manifest = write_manifest(tmp_path / "m.yaml", "resume", [1, 4], hidden=1024, replication=2,
                              chunk_bytes=1 << 20)
    v0 = volunteer_daemon.start(tmp_path / "v0", "--new-swarm", "--num-experts", "4",
                                experiment=str(manifest), network=True)
    boot = boot_addr(v0)
    roots = {u: h["root"] for u, h in hosted(status(v0)).items()}
    v1 = volunteer_daemon.spawn(tmp_path / "v1", "--bootstrap", boot, "--num-experts", "4",
                                experiment=str(manifest), network=True)
    v1.wait_ready(120)

    def mid_download() -> str | None:
        downloads = status(v1)["shards"]["downloads"]
        for uid, d in downloads.items():
            if d["state"] == "downloading" and 0 < d["chunks_done"] < d["chunks_total"] - 4:
                return uid
        return None

    uid = poll(mid_download, 120, "a download in progress", every=0.01)
    v1.kill()
    partial = [d for d in shard_dir(v1.home, "resume").iterdir() if (d / "body.part").exists()]
    assert partial, "the interrupted download left its chunks in the home's cache"

    v1b = volunteer_daemon.start(tmp_path / "v1", "--bootstrap", boot, "--num-experts", "4",
                                 experiment=str(manifest), network=True)
    final = poll(lambda: len(hosted(status(v1b))) == 4 and status(v1b), 180, "v1 to serve all 4 uids again")
    d = final["shards"]["downloads"][uid]
    assert d["state"] == "done" and d["resumed_bytes"] > 0, d
    assert d["fetched_bytes"] == d["total_bytes"] - d["resumed_bytes"], d  # only the missing bytes travelled
    assert {u: h["root"] for u, h in hosted(final).items()} == roots  # every shard verified, same bytes


def test_leave_hands_each_uid_to_an_adopter_while_a_trainer_trains(
        tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    rebalance_s = 10.0
    manifest = write_manifest(tmp_path / "m.yaml", "handoff", [2, 3], hidden=64, replication=1,
                              rebalance_s=rebalance_s, snapshot_s=2.0)
    v0 = volunteer_daemon.start(tmp_path / "v0", "--new-swarm", "--num-experts", "2",
                                experiment=str(manifest), network=True)
    boot = boot_addr(v0)
    daemons = [v0] + [volunteer_daemon.start(tmp_path / f"v{i}", "--bootstrap", boot, "--num-experts", "2",
                                             experiment=str(manifest), network=True) for i in (1, 2)]
    owned = {i: set(hosted(status(d))) for i, d in enumerate(daemons)}
    assert sorted(u for s in owned.values() for u in s) == sorted(load_manifest(str(manifest)).grid.uids())

    m = load_manifest(str(manifest))
    client = ClientNode("handoff", [boot], listen_addrs=LOOPBACK).start()
    directory = client.directory()
    moe = RemoteMixtureOfExperts(64, m.grid.dims, m.grid.prefix, directory, k_best=2, k_min=1,
                                 forward_timeout=10, backward_timeout=10, timeout_after_k_min=1.0)
    leaver = daemons[2]
    try:
        trainer = ToyTrainer(moe)
        losses: list[float] = []
        failed_since: float | None = None
        longest_gap = 0.0

        def step() -> None:  # one step; tracks the longest stretch with fewer than k_min experts
            nonlocal failed_since, longest_gap
            loss = trainer.step()
            if loss is None:
                failed_since = failed_since or time.monotonic()
                longest_gap = max(longest_gap, time.monotonic() - failed_since)
                return
            losses.append(loss)
            failed_since = None

        for _ in range(30):
            step()
        leave = subprocess.Popen([sys.executable, "-m", "volunteer", "leave", "--json", "--home", str(leaver.home)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(network=True))
        while leave.poll() is None:
            step()
        out, err = leave.communicate()
        assert leave.returncode == 0, err
        report = json.loads(out)
        assert leaver.wait_exit(30) == 0
        for _ in range(60):
            step()
    finally:
        moe.close()
        directory.close()
        client.stop()

    # Every uid of the leaver was adopted by one of the others...
    handoffs = {h["uid"]: h for h in report["handoffs"]}
    assert set(handoffs) == owned[2]
    peers = {status(d)["network"]["peer_id"]: d for d in daemons[:2]}
    for uid, h in handoffs.items():
        assert h["outcome"] == "adopted" and h["peer"] in peers, h
        adopter = peers[h["peer"]]
        assert uid in hosted(status(adopter))
        # ... with weights bitwise equal to the leaver's final checkpoint.
        final = load_checkpoint_state(leaver.home, "handoff", uid, m.fingerprint())
        assert final["updates_applied"] == h["version"] > 0
        assert_states_equal(load_shard_state(adopter.home, "handoff", h["root"], uid), final)
    assert "handed off" in leaver.output()
    # Training went on: the loss fell, and no stretch without k_min experts outlasted a rebalance.
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert longest_gap < rebalance_s


def test_two_fresh_volunteers_taking_the_same_uid_start_bitwise_equal(
        tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    from volunteer.manifest.schema import NetworkConfig
    from volunteer.net.service import NetworkService

    manifest = write_manifest(tmp_path / "m.yaml", "sameuid", [1], hidden=128, replication=2)
    # A bootstrap peer that hosts nothing: the uid is unserved when both newcomers look.
    hub = NetworkService(tmp_path / "hub", "sameuid", NetworkConfig(), listen_host="127.0.0.1",
                         enable_nat=False).start()
    try:
        boot = hub.multiaddrs[0]
        a = volunteer_daemon.spawn(tmp_path / "a", "--bootstrap", boot, "--num-experts", "1",
                                   experiment=str(manifest), network=True)
        b = volunteer_daemon.spawn(tmp_path / "b", "--bootstrap", boot, "--num-experts", "1",
                                   experiment=str(manifest), network=True)
        a.wait_ready(120)
        b.wait_ready(120)
        served = [poll(lambda d=d: hosted(status(d)), 60, "the uid served")["sameuid.ffn.0"] for d in (a, b)]
    finally:
        hub.stop()
    # Either both initialised it (bitwise equal by the deterministic init) or one downloaded
    # the other's: one consistent state, never two different copies.
    assert served[0]["root"] == served[1]["root"], served
    assert {s["weights_from"].split(" ")[0] for s in served} <= {"fresh", "downloaded"}
    assert_states_equal(load_shard_state(a.home, "sameuid", served[0]["root"], "sameuid.ffn.0"),
                        load_shard_state(b.home, "sameuid", served[1]["root"], "sameuid.ffn.0"))


def test_a_holder_serving_a_corrupt_chunk_is_dropped_for_that_shard(
        tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    from volunteer.experts.shard_cache import ShardCache
    from volunteer.manifest.schema import NetworkConfig
    from volunteer.net.service import NetworkService
    from volunteer.net.shard_rpc import ShardServer

    manifest = write_manifest(tmp_path / "m.yaml", "liar", [1], hidden=256, replication=3)
    v0 = volunteer_daemon.start(tmp_path / "v0", "--new-swarm", "--num-experts", "1",
                                experiment=str(manifest), network=True)
    boot = boot_addr(v0)
    uid = "liar.ffn.0"
    good = hosted(status(v0))[uid]
    root_dir = next(d for d in shard_dir(v0.home, "liar").iterdir() if d.name.startswith(good["root"]))
    root = bytes.fromhex(root_dir.name)

    class LyingCache(ShardCache):
        """Holds the real shard but flips a byte of every chunk it hands out."""

        def read_chunk(self, r: bytes, i: int) -> bytes:
            data = bytearray(super().read_chunk(r, i))
            data[0] ^= 0xFF
            return bytes(data)

    cache = LyingCache(tmp_path / "liar-cache", 1 << 30)
    shutil.copytree(root_dir, cache.directory / root_dir.name)
    server = ShardServer(cache)
    liar = NetworkService(tmp_path / "liar-home", "liar", NetworkConfig(bootstrap=(boot,)), listen_host="127.0.0.1",
                          enable_nat=False, shard_server=server).start()
    try:
        liar.announce([uid], "serving", 0.0, shards={uid: (0, root)}, free=0)
        v1 = volunteer_daemon.start(tmp_path / "v1", "--bootstrap", boot, "--num-experts", "1",
                                    experiment=str(manifest), network=True)
        snap = poll(lambda: hosted(status(v1)) and status(v1), 60, "the newcomer to serve the uid")
        d = snap["shards"]["downloads"][uid]
        assert d["state"] == "done" and d["bad_sources"] == [liar.peer_id], d
        assert liar.peer_id not in d["sources"] and sum(d["sources"].values()) == d["chunks_total"]
        assert server.stats.chunks <= 2  # one bad chunk per worker, then never asked again
        assert hosted(snap)[uid]["root"] == good["root"]
    finally:
        liar.stop()
        server.close()


def test_rebalance_moves_an_excess_replica_to_a_uid_orphaned_by_a_kill(
        tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    manifest = write_manifest(tmp_path / "m.yaml", "rebal", [3], hidden=64, replication=1, rebalance_s=3.0)
    v0 = volunteer_daemon.start(tmp_path / "v0", "--new-swarm", "--num-experts", "2",
                                experiment=str(manifest), network=True)
    boot = boot_addr(v0)
    v1 = volunteer_daemon.start(tmp_path / "v1", "--bootstrap", boot, "--num-experts", "1",
                                experiment=str(manifest), network=True)
    # Every uid is served once (the target): the third volunteer adds a second replica of one.
    v2 = volunteer_daemon.start(tmp_path / "v2", "--bootstrap", boot, "--num-experts", "1",
                                experiment=str(manifest), network=True)
    (extra,) = poll(lambda: hosted(status(v2)), 60, "v2 to serve a replica")
    held = {d: set(hosted(status(d))) for d in (v0, v1)}
    assert held[v0] | held[v1] == {"rebal.ffn.0", "rebal.ffn.1", "rebal.ffn.2"} and extra in held[v0] | held[v1]
    # Kill (no hand-off) the volunteer whose uids have no other replica: they become unserved.
    victim = v0 if extra in held[v1] else v1
    orphans = held[victim]
    victim.kill()
    others = [d for d in (v0, v1, v2) if d is not victim]
    # The excess holder of the replicated uid (ranked by hash, exactly one) moves to an orphan:
    # it takes the orphan first, then drops the replica (coverage never dips during a move).
    def moved() -> list[dict] | None:
        snaps = [status(d)["shards"] for d in others]
        taken = orphans & set().union(*(s["hosted"] for s in snaps))
        return snaps if taken and any(s["dropped"] for s in snaps) else None

    snaps = poll(moved, 90, "an orphan to be taken and the replica dropped")
    moved = [s for s in snaps if s["dropped"]]
    assert len(moved) == 1 and list(moved[0]["dropped"]) == [extra], snaps
    assert "over-covered (1 other replica) -> moved to" in moved[0]["dropped"][extra]
    assert extra in set().union(*(s["hosted"] for s in snaps))  # the replicated uid keeps its other holder
