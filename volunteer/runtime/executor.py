"""``BatchExecutor``: runs one batch of tasks (same expert, same op) on the expert's device
and answers every task exactly once.

- forward: concatenate inputs, compute (``no_grad``, or with a graph kept in the
  ``ActivationCache`` when any task will backward), slice the output per task, reply.
- backward: tasks whose forward graph is cached (and whose inputs match the cached rows
  bit for bit, when they carry inputs) are differentiated from that graph (or recomputed
  from its stored inputs when siblings of the graph are still to come, see
  ``activation_cache.py``); the others recompute their forward in one merged batch, except
  those that omitted their inputs: they are answered "cache_miss" (the client resends
  with inputs). Parameter gradients of all groups are summed into one optimizer step.
- CUDA: inputs are concatenated into pinned host memory and copied with
  ``non_blocking=True``; outputs come back into pinned memory. With a ``Completer`` (the
  runtime's default on CUDA) the loop thread only launches the batch and records a CUDA
  event; the completer waits for that event (the batch's one device synchronisation) and
  builds and sends the replies, while the loop launches the next batch. Without one the
  stream is synchronised in the loop thread, just before the replies need the bytes.
  Results are built by closures (``Build``/``Fill``) that run after the device is done, so
  both paths share one code path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from volunteer.experts.backend import ExpertBackend
from volunteer.runtime.activation_cache import ActivationCache, CachedGraph
from volunteer.runtime.completer import Completer
from volunteer.runtime.stats import ExpertStats
from volunteer.runtime.task_pool import Task
from volunteer.runtime.transfers import (
    gather,
    reply_dtype,
    restores,
    split,
    to_host,
    upload,
    wire_dtype,
)
from volunteer.wire.errors import CacheMissError, InternalError, RemoteError
from volunteer.wire.messages import encode_error, encode_result_or_error, frames_nbytes

log = logging.getLogger(__name__)

Hits = dict[Task, tuple[CachedGraph, int, int]]
ParamGrads = list[list[torch.Tensor | None]]
Build = Callable[[], list]  # per-task results (tensors or a RemoteError), once the device is done
Fill = Callable[[], None]  # fills some tasks' input gradients, once the device is done


def send_reply(task: Task, frames: list) -> bool:
    """Call the task's reply callback once; a failing callback is logged, never raised."""
    if task.replied:
        return False
    task.replied = True
    try:
        task.reply(frames)
    except Exception:
        log.exception("reply callback failed for request %s", task.request_id)
    return True


def send_error(task: Task, err: RemoteError, stats: ExpertStats | None = None) -> None:
    """Answer a task with a typed error reply."""
    if send_reply(task, encode_error(task.request_id, err.code, err.message)) and stats is not None:
        stats.record_error(err.code)


class BatchExecutor:
    """Compute for batches; used by the runtime's serving-loop thread only."""

    def __init__(
        self,
        cache: ActivationCache,
        on_success: Callable[[int], None],
        completer: Completer | None = None,
        cpu_too: bool = False,
    ) -> None:
        self.cache = cache
        self._on_success = on_success
        self.completer = completer  # None: CUDA batches are finished in the loop thread too
        # CPU batches through the completer as well (tests drive its path without a GPU; a
        # CPU expert computes in the loop thread anyway, so it gains nothing from it)
        self.cpu_too = cpu_too

    def run(
        self,
        backend: ExpertBackend,
        op: str,
        tasks: list[Task],
        stats: ExpertStats,
        inline: bool = False,
    ) -> None:
        """Compute one batch and answer its tasks: here, or (with a completer) launch it here
        and let the completer answer once the device is done (a CUDA event marks that).
        ``inline``: no other work waits, so answer here unless earlier batches are still in
        the completer (replies of one expert then keep their order): lowest latency."""
        started = time.monotonic()
        try:
            build = (self._forward if op == "forward" else self._backward)(backend, tasks, stats)
            event = None
            if self.completer is not None and not backend.on_cpu:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(backend.device))
        except Exception as e:
            self._fail(backend, op, tasks, stats, e)
            return
        if (
            self.completer is None
            or (backend.on_cpu and not self.cpu_too)
            or (inline and self.completer.pending == 0)
        ):
            self._finish(backend, op, tasks, stats, started, build, event)
        else:
            self.completer.submit(
                lambda: self._finish(backend, op, tasks, stats, started, build, event)
            )

    def _finish(
        self,
        backend: ExpertBackend,
        op: str,
        tasks: list[Task],
        stats: ExpertStats,
        started: float,
        build: Build,
        event: torch.cuda.Event | None,
    ) -> None:
        """Wait for the device (CUDA), build the per-task results and send the replies."""
        try:
            if event is not None:
                event.synchronize()  # releases the GIL while the device works
            results = build()
            done = time.monotonic()
            frames = [
                r
                if isinstance(r, RemoteError)
                else encode_result_or_error(
                    t.request_id, r, t.compression, t.cached, restores(t, r)
                )
                for t, r in zip(tasks, results, strict=True)
            ]
        except Exception as e:
            self._fail(backend, op, tasks, stats, e)
            return
        # recorded before the replies go out: a client that got its answer finds it counted
        stats.record_batch(
            op,
            len(tasks),
            sum(t.rows for t in tasks),
            [(started - t.enqueued) * 1e3 for t in tasks],
            (done - started) * 1e3,
        )
        sent = 0
        for t, f in zip(tasks, frames, strict=True):
            if isinstance(f, RemoteError):
                send_error(t, f, stats)
            elif send_reply(t, f):
                sent += 1
                stats.record_bytes_out(frames_nbytes(f))
        self._on_success(sent)

    @staticmethod
    def _fail(
        backend: ExpertBackend, op: str, tasks: list[Task], stats: ExpertStats, e: Exception
    ) -> None:
        log.error("batch of %d %s tasks failed on %s", len(tasks), op, backend.uid, exc_info=e)
        err = InternalError(f"{type(e).__name__}: {e}")
        for t in tasks:
            send_error(t, err, stats)

    # -- ops --

    def _forward(self, backend: ExpertBackend, tasks: list[Task], stats: ExpertStats) -> Build:
        xs = [
            gather(backend, [t.inputs[i] for t in tasks])
            for i in range(len(backend.input_shapes))
        ]
        if self.cache.enabled and any(t.will_backward for t in tasks):
            graph = backend.forward_graph(xs)
            out = graph.output.detach()
            members, start = {}, 0
            for t in tasks:
                if t.will_backward:
                    members[t.request_id] = (start, start + t.rows)
                start += t.rows
            nbytes = backend.activation_bytes_per_sample * start
            if self.cache.put(backend.uid, graph, members, nbytes):
                for t in tasks:
                    t.cached = t.will_backward
            else:
                stats.record_cache("not_stored", len(members))
        else:
            out = backend.forward(xs)
        wire = wire_dtype(backend, tasks)
        (host,) = to_host(backend, [out], wire, sync=self.completer is None)
        dtypes = [reply_dtype(t, 0, wire) for t in tasks]
        return lambda: [[o] for o in split(host, tasks, dtypes)]

    def _lookup_hits(
        self, backend: ExpertBackend, tasks: list[Task]
    ) -> dict[Task, tuple[CachedGraph, int, int]]:
        candidates: list[tuple[Task, CachedGraph, int, int]] = []
        for t in tasks:
            if t.forward_id is None:
                continue
            found = self.cache.lookup(backend.uid, t.forward_id)
            if found is not None and found[2] - found[1] == t.rows:
                candidates.append((t, *found))
        if not candidates:
            return {}
        if not any(t.inputs for t, _, _, _ in candidates):  # inputs omitted: trust the forward id
            return {t: (entry, s, e) for t, entry, s, e in candidates}
        with torch.no_grad():
            checks = []
            for t, entry, s, e in candidates:
                same = [
                    torch.equal(cached[s:e], sent.to(cached.device, cached.dtype))
                    if cached.device.type == "cpu"
                    else (
                        cached[s:e] == sent.to(cached.device, cached.dtype, non_blocking=True)
                    ).all()
                    for cached, sent in zip(entry.graph.inputs, t.inputs, strict=False)
                ]  # a backward that omitted its inputs trusts its (random 64-bit) forward id
                if backend.device.type == "cpu" or not same:
                    checks.append(all(bool(x) for x in same))
                else:
                    checks.append(torch.stack(same).all())
            if backend.device.type != "cpu":
                checks = torch.stack(
                    [torch.as_tensor(c, device=backend.device) for c in checks]
                ).tolist()  # one synchronisation for the whole batch
        return {
            t: (entry, s, e) for (t, entry, s, e), ok in zip(candidates, checks, strict=True) if ok
        }

    def _backward(
        self, backend: ExpertBackend, tasks: list[Task], stats: ExpertStats
    ) -> Build:
        hits = self._lookup_hits(backend, tasks)
        grads_for: dict[Task, list[torch.Tensor]] = {}
        fills: list[Fill] = []  # run once the device is done: they read the host copies
        param_grads: list[list[torch.Tensor | None]] = []
        by_graph: dict[int, list[Task]] = {}
        for t, (entry, _, _) in hits.items():
            by_graph.setdefault(entry.graph_id, []).append(t)
        # (task, its input rows) to recompute: cache misses with inputs, and early siblings
        recompute: list[tuple[Task, list[torch.Tensor]]] = []
        for gid, group in by_graph.items():
            entry = hits[group[0]][0]
            fids = entry.members.keys()  # every task of group is one of them
            if len(fids) == 1 or fids <= {t.forward_id for t in group}:
                self.cache.pop(gid)
                fills.append(self._backward_graph(backend, entry, group, hits, grads_for, param_grads))
            else:  # siblings still to come: recompute these rows, keep the graph for them
                for t in group:
                    _, s, e = hits[t]
                    recompute.append((t, [x.detach()[s:e] for x in entry.graph.inputs]))
                    self.cache.drop_member(gid, backend.uid, t.forward_id)
        misses = [t for t in tasks if t not in hits]
        recompute += [(t, t.inputs) for t in misses if t.inputs]
        if hits:
            stats.record_cache("hits", len(hits))
        if misses:
            stats.record_cache("misses", sum(t.forward_id is not None for t in misses))
        if recompute:
            fills.append(self._backward_recompute(backend, recompute, grads_for, param_grads))
        if param_grads:
            backend.apply_gradients(param_grads)

        def build() -> list[list[torch.Tensor] | RemoteError]:
            for fill in fills:
                fill()
            if len(grads_for) == len(tasks):
                return [grads_for[t] for t in tasks]
            miss = CacheMissError("forward activations are no longer cached; resend with inputs")
            return [grads_for.get(t, miss) for t in tasks]

        return build

    def _backward_graph(
        self,
        backend: ExpertBackend,
        entry: CachedGraph,
        group: list[Task],
        hits: Hits,
        grads_for: dict[Task, list[torch.Tensor]],
        param_grads: ParamGrads,
    ) -> Fill:
        """Differentiate a cached graph once for the requests of ``group``."""
        out = entry.graph.output
        whole = len(group) == 1 and hits[group[0]][1:] == (0, out.shape[0])
        if whole:
            grad_out = upload(group[0].grad_outputs[0], out)
        else:
            grad_out = torch.zeros_like(out)
            for t in group:
                _, s, e = hits[t]
                grad_out[s:e] = upload(t.grad_outputs[0], out)
        in_grads, p_grads = backend.gradients(entry.graph, grad_out)
        param_grads.append(p_grads)
        wire = wire_dtype(backend, group)
        host = to_host(backend, in_grads, wire, sync=self.completer is None)

        def fill() -> None:
            for t in group:
                _, s, e = hits[t]
                dtypes = [reply_dtype(t, i, wire) for i in range(len(host))]
                grads_for[t] = [
                    (h if whole else h[s:e]) if h.dtype == d else h[s:e].to(d)
                    for h, d in zip(host, dtypes, strict=True)
                ]

        return fill

    def _backward_recompute(
        self,
        backend: ExpertBackend,
        items: list[tuple[Task, list[torch.Tensor]]],
        grads_for: dict[Task, list[torch.Tensor]],
        param_grads: ParamGrads,
    ) -> Fill:
        """Forward again (one merged batch) and differentiate, for tasks without a usable graph."""
        tasks = [t for t, _ in items]
        xs = [
            gather(backend, [rows[i] for _, rows in items])
            for i in range(len(backend.input_shapes))
        ]
        grad_out = gather(backend, [t.grad_outputs[0] for t in tasks])
        in_grads, p_grads = backend.gradients(backend.forward_graph(xs), grad_out)
        param_grads.append(p_grads)
        wire = wire_dtype(backend, tasks)
        host = to_host(backend, in_grads, wire, sync=self.completer is None)

        def fill() -> None:
            per_input = [
                split(h, tasks, [reply_dtype(t, i, wire) for t in tasks])
                for i, h in enumerate(host)
            ]
            for j, t in enumerate(tasks):
                grads_for[t] = [per_input[i][j] for i in range(len(host))]

        return fill
