"""``ShardManager``: which experts this node hosts, where their weights come from, and moves.

The node joins the peer network first, then asks the swarm (``SwarmView``) who serves what
and lets ``assignment.plan_assignment`` choose (unserved uids first, then the least
replicated or most loaded, capacity ``num_experts``). For every chosen uid the weights come
from, in order:

1. the newest shard another node announces, when it is newer than this node's own
   checkpoint: downloaded from every holder of that root at once (``ShardNetwork.download``),
   verified, then loaded (a replica adopts the served weights instead of starting its own copy);
2. this node's checkpoint;
3. a deterministic init of (experiment seed, uid), so two newcomers agree bitwise.

A uid is announced as serving only once its weights are loaded. Downloads, adoptions,
snapshots and rebalances run one after another on the manager's worker thread, so the
supervisor's loop and the network's event loop never wait on them.

Snapshots (``Handouts``): every ``shards.snapshot_interval_s`` the experts whose version
changed are encoded into fresh shards in the cache, and the (version, root) of each is
announced. Every ``shards.rebalance_interval_s``
the plan is made again with the hosted set as the starting point (hysteresis lives in the
assignment); a dropped uid gets a last checkpoint and its queued requests a "draining" reply.

Adoption (``adopt``, called by the ``ShardServer`` when a leaving node offers a uid): the
node accepts up to ``num_experts`` + ``adopt_slack`` uids, downloads the offered root from the
holders the DHT lists for it, serves it, and answers once it is announced. Handing off on
leave is ``volunteer.daemon.handoff``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from volunteer.daemon.capacity import expert_state_bytes, host_capacity
from volunteer.daemon.handouts import Handouts
from volunteer.experts.assignment import choose_experts, plan_assignment
from volunteer.experts.checkpoint import clone_state, non_finite_tensor
from volunteer.experts.shard import decode_shard
from volunteer.experts.shard_cache import ShardCache

if TYPE_CHECKING:  # the network modules (trio, libp2p) load only when the network is on
    from volunteer.daemon.swarm_view import SwarmView
    from volunteer.net.shard_download import DownloadProgress

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 600.0
ADOPT_LOOKUP_TRIES = 5


class ShardManager:
    """Owns the hosted set and the shard cache of one node (see module docstring)."""

    def __init__(self, sup: Any, make_backend: Callable[[str, bool], Any]) -> None:
        self.sup = sup
        m = sup.manifest
        self.manifest = m
        self.fingerprint = m.fingerprint()
        self.grid = list(m.grid.uids())
        self.grid_set = set(self.grid)
        self.capacity, self.capacity_reason = host_capacity(
            int(sup.settings.num_experts), len(self.grid), expert_state_bytes(m), sup.devices, sup.hardware,
            float(sup.settings.max_gpu_memory_fraction))
        self.make_backend = make_backend  # (uid, seeded) -> ExpertBackend
        self.cache = ShardCache(sup.home.cache_dir / "shards" / m.experiment.name,
                                int(sup.settings.shard_cache_bytes))
        self.handouts = Handouts(self.cache, self.fingerprint, m.shards.chunk_bytes)
        self.origin: dict[str, str] = {}  # uid -> where its weights came from
        self.reasons: dict[str, str] = {}  # uid -> why it is hosted
        self.dropped: dict[str, str] = {}  # uid -> why it was dropped (recent)
        self.downloads: dict[str, DownloadProgress] = {}
        self.view: SwarmView | None = None
        self.view_at: float | None = None
        self.pending: set[str] = set()
        self.leaving = False
        self.moves = 0
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._next_snapshot = 0.0
        self._next_rebalance = 0.0
        self._periodic: set[str] = set()

    # ------------------------------------------------------------------ helpers

    @property
    def network(self) -> Any:
        return self.sup.network

    @property
    def hosted(self) -> list[str]:
        return list(self.sup.runtime.backends)

    @property
    def free(self) -> int:
        return max(0, self.capacity - len(self.hosted) - len(self.pending))

    def _me(self) -> str:
        return self.network.peer_id if self.network is not None else self.sup.node_id

    def read_view(self) -> SwarmView:
        """Ask the DHT who holds what (one lookup per parent prefix of the grid)."""
        from volunteer.daemon.swarm_view import SwarmView

        entries = self.network.shards.holders(self.grid)
        self.view = SwarmView(entries, self._me())
        self.view_at = time.time()
        return self.view

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Choose the first experts and load those that need no download; queue the rest.

        Runs in ``Supervisor.start`` after the network joined (or offline, without one).
        """
        store = self.sup.checkpointer.store
        if self.network is None:
            chosen = choose_experts(self.grid, self.capacity, self.sup.node_id, checkpointed=store.saved_uids())
            for uid in sorted(chosen):
                self._host(uid, self._load_local(uid)[0], "offline: resume checkpoint or fresh")
            return
        view = self.read_view()
        plan = plan_assignment(self.grid, self.capacity, self._me(), view.holders(),
                               checkpointed=store.saved_uids(), replication=self.manifest.shards.replication)
        for uid in plan.host:
            reason = plan.reasons.get(uid, "")
            offer = view.newest(uid)
            if offer is None and not view.replicas(uid):  # nobody else holds it: no download, load now
                self._host(uid, self._load_local(uid)[0], reason)
            else:
                self.pending.add(uid)
                self.submit(lambda uid=uid, reason=reason: self._acquire(uid, reason))
        self._start_worker()
        self.announce()
        interval = self.manifest.shards
        self._next_snapshot = time.monotonic() + interval.snapshot_interval_s
        self._next_rebalance = time.monotonic() + interval.rebalance_interval_s

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="volunteer-shards", daemon=True)
            self._worker.start()

    def submit(self, job: Callable[[], Any]) -> Future:
        """Run ``job`` on the worker thread, after the jobs queued before it."""
        fut: Future = Future()
        self._jobs.put((job, fut))
        return fut

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(job())
            except BaseException as exc:  # a job failure must not end the worker
                log.warning("shard job failed: %s", exc)
                fut.set_exception(exc)

    def stop(self, timeout: float) -> None:
        """Stop taking jobs: queued ones are cancelled, the running one may finish."""
        self.leaving = True
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].cancel()
        self._jobs.put(None)
        if self._worker is not None:
            self._worker.join(timeout)

    # ------------------------------------------------------------------ getting weights

    def _load_local(self, uid: str) -> tuple[Any, int | None]:
        """A backend with this node's checkpoint of ``uid`` (and its version), else the
        deterministic init (and None)."""
        backend = self.make_backend(uid, True)
        version = self.sup.checkpointer.restore_one(uid, backend)
        self.origin[uid] = f"local checkpoint (v{version})" if version is not None else "fresh (deterministic init)"
        return backend, version

    def _acquire(self, uid: str, reason: str, offered: tuple[int, bytes] | None = None) -> str:
        """Worker: host ``uid`` with the newest weights there are (see module docstring).

        ``offered`` (version, root): a leaving node's shard to adopt, downloaded whatever this
        node's own checkpoint holds (the adopter continues exactly where the leaver stopped).
        """
        try:
            if uid in self.sup.runtime.backends:
                return f"already serving {uid}"
            view = self.read_view()
            if offered is not None:
                version, root = offered
                sources = view.sources(uid, root)
            else:
                offer = view.newest(uid)
                version, root, sources = (offer.version, offer.root, offer.sources) if offer else (-1, None, ())
            if root is None and view.replicas(uid):
                raise RuntimeError(f"{len(view.replicas(uid))} volunteer(s) serve {uid} but announce no shard of "
                                   "it: not starting a different copy; retrying at the next rebalance")
            backend, local = self._load_local(uid)
            if root is not None and (offered is not None or local is None or version > local):
                if not sources:
                    raise RuntimeError(f"no holder of {uid}'s shard is listed in the DHT; retrying later")
                backend.load_state_dict(self._download(uid, root, sources))
                self.origin[uid] = (f"downloaded v{backend.updates_applied} from "
                                    f"{len(self.downloads[uid].by_source) or 'cached'} holder(s)")
                self.handouts.adopt(uid, int(backend.updates_applied), root)
            self._host(uid, backend, reason)
            self.announce()
            return f"serving {uid} v{backend.updates_applied}"
        finally:
            self.pending.discard(uid)

    def _download(self, uid: str, root: bytes, sources: Any) -> dict[str, Any]:
        from volunteer.net.shard_download import DownloadProgress

        progress = DownloadProgress(uid=uid, root_hex=root.hex())
        self.downloads[uid] = progress
        self.handouts.pin(uid, root)  # an eviction must not remove the partial shard under the download
        log.info("downloading %s (shard %s) from %d holder(s)", uid, root.hex()[:12], len(sources))
        header = self.network.shards.download(uid, self.fingerprint, root, sources, self.cache, progress,
                                              DOWNLOAD_TIMEOUT_S)
        self.cache.touch(root)
        d = progress.as_dict()
        log.info("downloaded %s v%d: %.1f MB in %.1fs (%.1f MB/s, %d resumed bytes) from %s", uid, header.version,
                 header.total_bytes / 1e6, d["elapsed_s"], d["mb_per_s"], progress.resumed_bytes,
                 ", ".join(f"{p[-8:]}: {n} chunks" for p, n in progress.by_source.items()) or "cache")
        state = decode_shard(header, self.cache.read_body(root))
        bad = non_finite_tensor(state)
        if bad is not None:  # the holders' own weights are poisoned: its bytes are what it announced
            self.cache.remove(root)
            raise RuntimeError(f"the shard of {uid} its holders announce has non-finite values in {bad}; not loaded")
        return state

    def _host(self, uid: str, backend: Any, reason: str) -> None:
        """Serve ``uid`` now: runtime, checkpoints, and a shard to hand out."""
        self.sup.runtime.add_expert(uid, backend)
        self.sup.checkpointer.add(uid, backend)
        self.reasons[uid] = reason
        self.dropped.pop(uid, None)
        if uid not in self.snapshots and self.network is not None:
            self.handouts.encode({uid: clone_state(backend.state_dict())})
        log.info("hosting %s: %s; weights: %s", uid, reason or "chosen", self.origin.get(uid, "?"))

    # ------------------------------------------------------------------ snapshots

    @property
    def snapshots(self) -> dict[str, tuple[int, bytes]]:
        """uid -> (version, root) of the shard this node hands out (``Handouts``)."""
        return self.handouts.current

    def snapshot(self, force: bool = False) -> list[str]:
        """Fresh shards of the hosted experts whose version changed (see ``Handouts.take``)."""
        return self.handouts.take(self.sup.runtime, force)

    # ------------------------------------------------------------------ periodic

    def tick(self) -> None:
        """Supervisor loop: queue a snapshot / rebalance when due (the worker runs them)."""
        if self.network is None or self.leaving:
            return
        now = time.monotonic()
        if now >= self._next_snapshot:
            self._next_snapshot = now + self.manifest.shards.snapshot_interval_s
            self._submit_once("snapshot", self._snapshot_and_announce)
        if now >= self._next_rebalance:
            self._next_rebalance = now + self.manifest.shards.rebalance_interval_s
            self._submit_once("rebalance", self.rebalance)

    def _submit_once(self, kind: str, job: Callable[[], Any]) -> None:
        """Queue a periodic job unless one of its kind still waits (a long download must not
        pile up snapshots and rebalances behind it)."""
        if kind in self._periodic:
            return
        self._periodic.add(kind)

        def run() -> Any:
            self._periodic.discard(kind)
            return job()

        self.submit(run)

    def _snapshot_and_announce(self) -> None:
        if self.snapshot():
            self.announce()

    def announce(self, state: str = "serving") -> Any:
        if self.network is None:
            return None
        hosted = self.hosted
        shards = {u: v for u, v in self.snapshots.items() if u in hosted}
        return self.network.announce(hosted, state, self.sup.network_load(), shards=shards, free=self.free)

    def rebalance(self) -> dict[str, Any]:
        """Worker: make the plan again from the swarm's view and apply it (adds, then drops)."""
        if self.leaving:
            return {}
        view = self.read_view()
        hosted = [u for u in self.hosted if u in self.grid_set]
        capacity = max(self.capacity, sum(1 for u in hosted if not view.replicas(u)))  # never shed a sole copy
        plan = plan_assignment(self.grid, capacity, self._me(), view.holders(), hosted=hosted,
                               checkpointed=self.sup.checkpointer.store.saved_uids(),
                               replication=self.manifest.shards.replication)
        for uid in plan.host:
            if uid in self.reasons:
                self.reasons[uid] = plan.reasons.get(uid, self.reasons[uid])
        for uid in plan.add:
            log.info("rebalance: taking %s (%s)", uid, plan.reasons.get(uid, ""))
            self.pending.add(uid)
            try:
                self._acquire(uid, plan.reasons.get(uid, ""))
            except Exception as exc:
                log.warning("rebalance: could not take %s: %s", uid, exc)
                continue
            self.moves += 1
        for uid in plan.drop:
            if uid in self.sup.runtime.backends:
                self.drop(uid, plan.reasons.get(uid, "rebalanced"))
        return {"add": list(plan.add), "drop": list(plan.drop)}

    def drop(self, uid: str, reason: str) -> None:
        """Stop hosting ``uid``: unannounce, stop serving, keep a last checkpoint."""
        log.info("rebalance: dropping %s (%s)", uid, reason)
        backend = self.sup.runtime.remove_expert(uid)
        self.sup.checkpointer.remove(uid)
        self.reasons.pop(uid, None)
        self.dropped[uid] = reason
        self.handouts.drop(uid)
        self.announce()
        try:
            self.sup.checkpointer.store.save(uid, clone_state(backend.state_dict()))
        except Exception as exc:
            log.warning("last checkpoint of dropped %s failed: %s", uid, exc)
        self.moves += 1

    # ------------------------------------------------------------------ adoption

    def adopt(self, uid: str, version: int, root: bytes, timeout: float) -> tuple[bool, str]:
        """``ShardServer`` callback: take over ``uid`` from a leaving node (see module docstring)."""
        if uid not in self.grid_set:
            return False, f"{uid} is not an expert of this experiment's grid"
        if self.leaving or self.sup.state != "serving":
            return False, "this node is leaving"
        if uid in self.sup.runtime.backends:
            have = self.sup.runtime.backends[uid].updates_applied
            return True, f"already serving {uid} (v{have})"
        if len(self.hosted) + len(self.pending) >= self.capacity + adopt_slack(self.capacity):
            return False, "no free slot"
        self.pending.add(uid)
        fut = self.submit(lambda: self._adopt(uid, version, root))
        try:
            return True, fut.result(timeout=timeout)
        except Exception as exc:
            return False, f"adoption failed: {exc}"

    def _adopt(self, uid: str, version: int, root: bytes) -> str:
        """Worker: wait (briefly) until the DHT lists the offered root, then acquire it."""
        for attempt in range(ADOPT_LOOKUP_TRIES):
            if self.read_view().sources(uid, root):
                break
            time.sleep(0.2 * (attempt + 1))
        result = self._acquire(uid, "adopted from a leaving node", offered=(version, root))
        self.moves += 1
        return result

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """The ``shards`` section of the status snapshot (control thread: reads copies only)."""
        view = self.view
        snapshots, downloads, backends = dict(self.snapshots), dict(self.downloads), self.sup.runtime.backends
        per_uid: dict[str, Any] = {}
        for uid in sorted(set(backends) | set(self.pending)):
            snap = snapshots.get(uid)
            replicas = view.replicas(uid) if view is not None else {}
            versions = [*replicas.values(), *([snap[0]] if snap else [])]
            per_uid[uid] = {
                "state": "serving" if uid in backends else "downloading",
                "version": snap[0] if snap else None, "root": snap[1].hex()[:16] if snap else None,
                "weights_from": self.origin.get(uid), "reason": self.reasons.get(uid),
                "other_replicas": len(replicas), "replica_versions": replicas,
                "version_spread": (max(versions) - min(versions)) if versions else 0,
            }
        return {
            "replication": self.manifest.shards.replication, "capacity": self.capacity,
            "capacity_reason": self.capacity_reason, "free": self.free,
            "hosted": per_uid, "dropped": dict(self.dropped), "moves": self.moves,
            "downloads": {u: p.as_dict() for u, p in downloads.items()},
            "view_age_s": round(time.time() - self.view_at, 1) if self.view_at else None,
            "cache": {"directory": str(self.cache.directory), "bytes": self.cache.total_bytes(),
                      "max_bytes": self.cache.max_bytes},
        }


def adopt_slack(capacity: int) -> int:
    """How many uids beyond ``num_experts`` a node adopts from leavers (the next rebalance sheds
    the ones others also serve)."""
    return max(2, capacity)
