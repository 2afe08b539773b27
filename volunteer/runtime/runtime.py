"""``Runtime``: the in-process serving entry point shared by every frontend.

``submit(frames, reply)`` first admits the request's payload bytes against
``max_queued_bytes`` (held from arrival until its reply: queued, computing or being
answered; beyond it "overloaded" at once, nothing decoded), then decodes and validates it in
the caller's thread (cheap, never blocks on compute) and queues it in the task pool of its (expert, op). The runtime's
single ``ServingLoop`` thread does IO for attached sockets (the ZeroMQ frontend) and
compute: whenever work waits, it takes the pool whose oldest task waited longest (so a lone
old task is served even while another pool is flooded), merges that pool's waiting tasks
into a batch of at most ``max_batch_size`` rows, drops tasks whose deadline passed, and runs
the batch through the ``BatchExecutor``. Every ``reply`` is called exactly once, from the
loop thread (after ``stop()``, from the caller's thread: no runtime thread is left).

Lifecycle: ``start()`` -> serving -> ``drain(timeout)`` (new work gets "draining", queued and
running work is answered) -> ``stop()``. ``exclusive()`` pauses batch execution (IO goes on)
so the daemon can snapshot weights and optimizer state consistently.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from volunteer.experts.backend import ExpertBackend
from volunteer.runtime.activation_cache import ActivationCache
from volunteer.runtime.completer import Completer
from volunteer.runtime.executor import BatchExecutor, send_error
from volunteer.runtime.limits import ServingLimits
from volunteer.runtime.loop import ServingLoop
from volunteer.runtime.pause_gate import PauseGate
from volunteer.runtime.request_budget import RequestBudget
from volunteer.runtime.stats import ExpertStats
from volunteer.runtime.task_pool import ReleasingReply, Task, TaskPool, payload_nbytes
from volunteer.runtime.validation import validate_request
from volunteer.wire.errors import (
    DeadlineExpiredError,
    DrainingError,
    OverloadedError,
    RemoteError,
    UnknownExpertError,
)
from volunteer.wire.messages import (
    decode_request,
    encode_error,
    encode_info_reply,
    reply_request_id,
)

log = logging.getLogger(__name__)

# batches up to this many request bytes are finished in the loop thread when nothing else
# waits (lowest latency); larger ones always overlap through the completer. On an H100,
# finishing every idle batch inline held the loop in the device wait (half its time at
# h=4096) while new requests arrived, and served/local fell (h=1024: 0.27 -> 0.18).
INLINE_MAX_BYTES = 256 * 1024

ReplyFn = Callable[[list], None]


@dataclass(frozen=True)
class DrainReport:
    """What ``drain`` achieved: tasks answered during the drain and tasks cut short."""

    completed: int
    cut_short: int
    clean: bool


class Runtime:
    """Batching runtime over the hosted expert backends (``add_expert`` / ``remove_expert``)."""

    def __init__(
        self,
        backends: Mapping[str, ExpertBackend],
        limits: ServingLimits | None = None,
        pipeline: bool | None = None,
    ) -> None:
        """``pipeline``: finish CUDA batches in a ``Completer`` thread so the loop launches
        the next batch while the device computes (None: on where torch sees a CUDA device;
        True also sends CPU batches through it, which only tests want)."""
        self.backends = dict(backends)
        self.limits = limits or ServingLimits()
        # CPU node: 16-bit request tensors are restored on arrival; a GPU node uploads them
        # as they came (half the bytes) and casts on the device (``transfers.gather``)
        self._restore_on_host = all(b.on_cpu for b in self.backends.values())
        self._wire_limits = self.limits.wire()
        self.state = "starting"
        self._cond = threading.Condition()
        self._pools: dict[tuple[str, str], TaskPool] = {
            (uid, op): TaskPool(uid, op, self.limits.max_queue_size)
            for uid in self.backends
            for op in ("forward", "backward")
        }
        self._stats = {uid: ExpertStats() for uid in self.backends}
        self.rejected = ExpertStats()  # errors of requests that named no hosted expert
        self._cache = ActivationCache(
            self.limits.activation_cache_size,
            self.limits.activation_cache_bytes,
            self.limits.activation_cache_ttl_s,
        )
        use = torch.cuda.is_available() if pipeline is None else pipeline
        self._completer = Completer(on_done=self._notify) if use else None
        self._executor = BatchExecutor(self._cache, self._count_completed, self._completer,
                                       cpu_too=pipeline is True)
        self._exec_lock = threading.Lock()
        self._pause_requests = 0
        self._running = False
        self._stop = False
        self._completed = 0
        self._queued = 0  # tasks in all pools
        self._queued_bytes = 0
        # payload bytes of admitted requests until their reply (``submit``): <= max_queued_bytes
        self._budget = RequestBudget(self.limits.max_queued_bytes)
        self.pause_gate = PauseGate()  # closed: new work answered "paused" (``pause_gate.py``)
        self.loop = ServingLoop(self._step, self._on_loop_exit)
        # (accepts(frames), submit(frames, reply)): requests the wire decoder does not know
        # (e.g. shard chunks, ``volunteer.net.shard_rpc``) go there; costs nothing on the hot
        # path, it is only consulted after a decode failure. Its replies go out on the loop.
        self.side: tuple[Callable[[list], bool], Callable[[list, ReplyFn], None]] | None = None

    # -- lifecycle --

    def start(self) -> None:
        """Start the serving loop thread; returns once serving."""
        if self.state != "starting":
            raise RuntimeError(f"cannot start a runtime in state {self.state!r}")
        self.loop.start()
        with self._cond:
            self.state = "serving"

    def drain(self, timeout: float) -> DrainReport:
        """Refuse new work, wait up to ``timeout`` s for queued and running work, cut the rest."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self.state in ("serving", "starting"):
                self.state = "draining"
            start_completed = self._completed
            while self._busy() and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            leftovers = self._take_all()
            completed = self._completed - start_completed
        err = DrainingError("node is leaving; request cut short by drain")
        for task in leftovers:
            self._answer(task, err)
        return DrainReport(completed=completed, cut_short=len(leftovers), clean=not leftovers)

    def stop(self) -> None:
        """Stop the loop (a running batch finishes); queued tasks are answered "draining"."""
        with self._cond:
            self.state = "stopped"
            self._stop = True
            self._cond.notify_all()
        self.loop.stop()  # also when stopped already: returns once the loop has exited
        if self._completer is not None:  # the batches still on the device: finished and answered
            self._completer.stop()
        with self._cond:  # never started, or raced with the loop's exit
            leftovers = self._take_all()
        for task in leftovers:
            send_error(task, DrainingError("runtime stopped"), self._stats.get(task.uid))
        self._cache.clear()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Pause batch execution (waits for the running batch) for the duration of the block."""
        with self._cond:
            self._pause_requests += 1
        try:
            with self._exec_lock:
                if self._completer is not None:  # launched batches: done and answered first
                    self._completer.wait_idle()
                yield
        finally:
            with self._cond:
                self._pause_requests -= 1
                self._cond.notify_all()
            self.loop.wake()

    # -- entry point --

    def submit(self, frames: list, reply: ReplyFn, held: int | None = None) -> None:
        """Queue one request (thread-safe, never blocks on compute); ``reply`` gets called once.

        Admission comes first: the request's payload bytes are reserved against
        ``max_queued_bytes`` before anything is decoded or validated, and given back when
        ``reply`` is called; beyond the bound the request is answered "overloaded" at once.
        A frontend that reserved the message's bytes itself while reading them
        (``reserve_bytes``) passes ``held``: those bytes are given back with the reply instead.
        """
        if held is not None:
            if held:
                reply = ReleasingReply(reply, self._budget.release, held)
            nbytes = 0
        else:
            nbytes = payload_nbytes(frames)
        if nbytes:
            refusal = self._budget.reserve(nbytes)
            if refusal is not None:
                self.rejected.record_error(refusal.code)
                rid = reply_request_id(frames[0], self._wire_limits) if frames else None
                self._respond(reply, encode_error(rid, refusal.code, refusal.message))
                return
            reply = ReleasingReply(reply, self._budget.release, nbytes)
        now = time.monotonic()
        try:
            request = decode_request(frames, self._wire_limits, restore=self._restore_on_host)
        except RemoteError as e:
            side = self.side
            if side is not None and side[0](frames):  # another protocol on the same socket
                side[1](frames, lambda out: self._respond(reply, out))
                return
            self.rejected.record_error(e.code)
            self._respond(reply, encode_error(getattr(e, "request_id", None), e.code, e.message))
            return
        except Exception as e:  # a decoder bug must still be answered, never stall the caller
            log.exception("unexpected error decoding a request")
            self.rejected.record_error("bad_request")
            self._respond(reply, encode_error(None, "bad_request", f"undecodable request: {e}"))
            return
        if request.op == "info":
            self._respond(reply, encode_info_reply(request.request_id, self.info()))
            return
        backend = self.backends.get(request.uid)
        stats = self._stats.get(request.uid)
        if stats is not None:
            stats.record_bytes_in(request.wire_nbytes)
        try:
            if backend is None or stats is None:
                raise UnknownExpertError(f"this node hosts no expert {request.uid!r}")
            if self.state != "serving":
                raise DrainingError(f"node is {self.state}; not accepting new requests")
            self.pause_gate.check()
            task = validate_request(request, backend, self.limits, reply, now)
            if task.deadline <= now:
                raise DeadlineExpiredError("deadline already passed on arrival")
            with self._cond:
                if self.state != "serving":
                    raise DrainingError(f"node is {self.state}; not accepting new requests")
                pool = self._pools.get((task.uid, task.op))
                if pool is None:  # removed since the lookup above (moved to another node)
                    raise UnknownExpertError(f"this node no longer hosts {request.uid!r}")
                if pool.full():
                    raise OverloadedError(
                        f"{task.op} queue of {task.uid} is full ({pool.max_size} tasks); retry later or elsewhere"
                    )
                pool.tasks.append(task)
                self._queued += 1
                self._queued_bytes += task.nbytes
        except RemoteError as e:
            (stats or self.rejected).record_error(e.code)
            self._respond(reply, encode_error(request.request_id, e.code, e.message))
            return
        except Exception as e:
            log.exception("unexpected error validating a request")
            (stats or self.rejected).record_error("internal")
            self._respond(
                reply, encode_error(request.request_id, "internal", f"{type(e).__name__}: {e}")
            )
            return
        if not self.loop.in_loop():
            self.loop.wake()

    # -- hosted experts (shards move in and out while serving) --

    def add_expert(self, uid: str, backend: ExpertBackend) -> None:
        """Start serving ``uid`` (thread-safe; the node adopted or downloaded it)."""
        with self._cond:
            if uid in self.backends:
                raise ValueError(f"expert {uid!r} is already hosted")
            for op in ("forward", "backward"):
                self._pools[(uid, op)] = TaskPool(uid, op, self.limits.max_queue_size)
            # copy-on-write: readers iterate these dicts without the lock
            self._stats = {**self._stats, uid: ExpertStats()}
            self.backends = {**self.backends, uid: backend}
            self._restore_on_host = self._restore_on_host and backend.on_cpu

    def remove_expert(self, uid: str) -> ExpertBackend:
        """Stop serving ``uid``: waits for a running batch, answers its queued work with "draining"
        (trainers retry on another server) and returns the backend (for a last checkpoint)."""
        with self.exclusive(), self._cond:
            backend = self.backends[uid]
            self.backends = {k: v for k, v in self.backends.items() if k != uid}
            tasks: list[Task] = []
            for op in ("forward", "backward"):
                pool = self._pools.pop((uid, op))
                tasks.extend(pool.tasks)
            self._queued -= len(tasks)
            self._queued_bytes -= sum(t.nbytes for t in tasks)
            stats = self._stats.get(uid)
            self._stats = {k: v for k, v in self._stats.items() if k != uid}
        for task in tasks:
            self._answer_with(task, DrainingError(f"expert {uid} moved to another volunteer; retry elsewhere"), stats)
        return backend

    # -- introspection --

    def info(self) -> dict[str, dict]:
        """The ``info`` table: hosted experts with their schema and state."""
        state = "serving" if self.state in ("serving", "starting") else "draining"
        return {uid: b.info(state) for uid, b in self.backends.items()}

    def stats(self) -> dict[str, dict]:
        """Per-uid statistics (JSON-serialisable)."""
        with self._cond:
            rows = [
                (uid, self._stats[uid], len(self._pools[(uid, "forward")]) + len(self._pools[(uid, "backward")]),
                 backend.updates_applied)
                for uid, backend in self.backends.items()
            ]
        out = {uid: s.snapshot(depth, updates) for uid, s, depth, updates in rows}
        for uid, entry in out.items():  # steps refused for non-finite gradients
            backend = self.backends.get(uid)
            entry["steps_skipped"] = backend.steps_skipped if backend is not None else 0
        return out

    def cache_info(self) -> dict:
        """Activation cache occupancy (entries, estimated bytes, evictions)."""
        return {
            "entries": len(self._cache),
            "bytes": self._cache.nbytes,
            "evictions": self._cache.evictions,
        }

    def held_bytes(self) -> dict[str, int]:
        """Payload bytes of requests held (admitted, not yet answered): now, peak, bound."""
        return self._budget.held_bytes()

    def reserve_bytes(self, nbytes: int) -> RemoteError | None:
        """Take ``nbytes`` of ``max_queued_bytes`` for a frontend reading a request (thread-safe);
        None on success, else the typed refusal (``too_large`` / ``overloaded``). Give them
        back with ``release_bytes``, or hand them to ``submit(..., held=)``."""
        return self._budget.reserve(nbytes) if nbytes > 0 else None

    def release_bytes(self, nbytes: int) -> None:
        """Give back bytes taken with ``reserve_bytes`` (not handed to ``submit``)."""
        if nbytes > 0:
            self._budget.release(nbytes)

    # -- internals --

    def _respond(self, reply: ReplyFn, frames: list) -> None:
        """Answer without compute: directly in the loop thread, else through the loop."""
        if self.loop.in_loop() or not self.loop.alive:
            _call(reply, frames)
        else:
            self.loop.call_soon(_call, reply, frames)

    def _answer(self, task: Task, err: RemoteError) -> None:
        self._answer_with(task, err, self._stats.get(task.uid))

    def _answer_with(self, task: Task, err: RemoteError, stats: ExpertStats | None) -> None:
        if self.loop.in_loop() or not self.loop.alive:
            send_error(task, err, stats)
        else:
            self.loop.call_soon(send_error, task, err, stats)

    def _count_completed(self, n: int) -> None:
        # the loop thread, or the completer's: drain() reads it under the lock
        with self._cond:
            self._completed += n

    def _notify(self) -> None:
        """A launched batch was answered: wake drain(), which waits for ``_busy()`` to clear."""
        with self._cond:
            self._cond.notify_all()

    def _busy(self) -> bool:
        return (
            self._running
            or self._queued > 0
            or (self._completer is not None and self._completer.pending > 0)
        )

    def _take_all(self) -> list[Task]:
        tasks: list[Task] = []
        for pool in self._pools.values():
            tasks.extend(pool.tasks)
            pool.tasks.clear()
        self._queued = 0
        self._queued_bytes = 0
        return tasks

    def _oldest_pool(self) -> TaskPool | None:
        best, best_t = None, 0.0
        for pool in self._pools.values():
            tasks = pool.tasks
            if tasks and (best is None or tasks[0].enqueued < best_t):
                best, best_t = pool, tasks[0].enqueued
        return best

    def _step(self) -> bool:
        """Run at most one batch (loop thread); True when more work is ready right away."""
        # racy peeks (loop thread): rechecked under the lock; a task queued from another
        # thread after this peek wakes the loop, which steps again
        if self._pause_requests or self._stop or not self._queued:
            return False
        if not self._exec_lock.acquire(blocking=False):  # exclusive() holds it; it wakes us after
            return False
        try:
            with self._cond:
                pool = None if self._pause_requests or self._stop else self._oldest_pool()
                if pool is None:
                    return False
                batch = pool.take_batch(self.limits.max_batch_size)
                self._queued -= len(batch)
                self._queued_bytes -= sum(t.nbytes for t in batch)
                self._running = True
            try:
                self._run_batch(pool, batch)
            finally:
                with self._cond:
                    self._running = False
                    if self.state != "serving":  # drain() may be waiting for the queues to empty
                        self._cond.notify_all()
                    more = self._queued > 0 and not self._pause_requests
        finally:
            self._exec_lock.release()
        return more

    def _on_loop_exit(self) -> None:
        with self._cond:
            leftovers = self._take_all()
        for task in leftovers:
            send_error(task, DrainingError("runtime stopped"), self._stats.get(task.uid))

    def _run_batch(self, pool: TaskPool, batch: list[Task]) -> None:
        stats = self._stats[pool.uid]
        now = time.monotonic()
        live = []
        for task in batch:
            if task.deadline <= now:
                send_error(
                    task,
                    DeadlineExpiredError("deadline passed while queued; dropped before compute"),
                    stats,
                )
            else:
                live.append(task)
        if live:
            # a small batch with nothing else waiting: finish it here (the hand-off to the
            # completer costs more latency than the device time it would overlap); a large
            # one goes to the completer, so requests that arrive meanwhile are launched
            inline = self._queued == 0 and sum(t.nbytes for t in live) <= INLINE_MAX_BYTES
            self._executor.run(self.backends[pool.uid], pool.op, live, stats, inline=inline)


def _call(reply: ReplyFn, frames: list) -> None:
    try:
        reply(frames)
    except Exception:
        log.exception("reply callback failed")
