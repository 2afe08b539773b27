"""The Learning@home experiments' lab: real volunteer daemons, DMoE models through them, and
the two conditions the paper imposed on the network (latency, failing experts).

- ``Swarm``: ``n`` ``volunteer join`` processes at their default settings, offline
  (``network_enabled=false``: ZeroMQ only, as a user runs a local swarm without the DHT),
  each with its own home under one temporary folder, started from a manifest that
  ``write_manifest`` copies from ``configs/`` with the run's grid. Every daemon loads the whole
  (small) grid; ``route`` gives each uid to one daemon, round-robin along the grid, so every
  expert is served by exactly one process and neighbouring experts of a layer by different
  ones. Leaving the ``with`` block stops every process (SIGTERM, then SIGKILL) and removes the
  homes, also on an exception, Ctrl-C or SIGTERM.
- ``LatencyTransport``: the paper's latency method: every request waits the one-way latency
  before it leaves and its reply waits it again after it arrives (a sleep in the calling
  thread, so concurrent calls overlap their waits as they would on a real network).
- ``FailureInjector``: the paper's failure method: each expert call of a layer fails with
  probability ``rate`` (a seeded rng, drawn in the caller's thread in a deterministic order);
  the failed call never leaves the trainer and raises ``InjectedFailure``, so the layer drops
  that expert and renormalises its softmax over the others (``k_min`` guards the rest).
- ``dmoe_layers``: ``RemoteMixtureOfExperts`` layers over a grid row each;
  ``run_concurrently``: steps from several trainer threads for a time window.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "configs"
for _p in (ROOT, ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_shards import daemon_status, env  # noqa: E402  (the benchmarks' daemon environment)

from volunteer.wire.errors import RemoteError  # noqa: E402

Frame = bytes | bytearray | memoryview


# ----------------------------------------------------------------------------- network conditions


class LatencyTransport:
    """A ``Transport`` whose every request and every reply waits ``one_way_s`` seconds.

    ``one_way_s`` may be changed between measurements. The wrapped transport belongs to
    whoever made it: ``close()`` leaves it open. ``sleep`` is injectable for tests.
    """

    def __init__(self, inner: Any, one_way_s: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if one_way_s < 0:
            raise ValueError(f"one_way_s must be >= 0, got {one_way_s}")
        self.inner = inner
        self.one_way_s = float(one_way_s)
        self._sleep = sleep

    def request(self, frames: Sequence[Frame], timeout: float) -> list[Frame]:
        delay = self.one_way_s
        if delay > 0:
            self._sleep(delay)
        reply = self.inner.request(frames, timeout)
        if delay > 0:
            self._sleep(delay)
        return reply

    def close(self) -> None:
        """Nothing to close: the inner transport is its maker's."""

    def __repr__(self) -> str:
        return f"LatencyTransport({self.inner!r}, one_way_s={self.one_way_s})"


class InjectedFailure(RemoteError):
    """An expert call the experiment chose to fail. Its code is none of the codes after
    which a layer avoids an expert (``volunteer.client.moe.AVOID_CODES``): each call fails
    on its own draw, the next call may reach the same expert, as in the paper."""

    code = "injected_failure"


class _FailedCall:
    """Stands in for an expert on a call that fails: raises ``InjectedFailure`` when called."""

    def __init__(self, uid: str) -> None:
        self.uid = uid

    def __call__(self, *inputs: Any) -> Any:
        raise InjectedFailure(f"{self.uid}: dropped by the experiment")


class FailureInjector:
    """Fails each expert call with probability ``rate`` (``random.Random(seed)``).

    ``factory(make)`` wraps an expert factory ``(uid, transport) -> module`` for
    ``RemoteMixtureOfExperts(expert_factory=...)``: the layer calls it once per expert per
    call, in its own thread, in a fixed order, so a seed gives the same failures every run.
    ``active = False`` pauses injection (evaluation). ``calls`` and ``dropped`` count draws.
    """

    def __init__(self, rate: float, seed: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        self.rate = float(rate)
        self.active = True
        self.calls = 0
        self.dropped = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def should_drop(self) -> bool:
        """One draw: True when this call fails. Inactive or rate 0: False without a draw."""
        if not self.active or self.rate == 0.0:
            return False
        with self._lock:
            self.calls += 1
            drop = self._rng.random() < self.rate
            self.dropped += drop
            return drop

    def factory(self, make: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
        def build(uid: str, transport: Any) -> Any:
            return _FailedCall(uid) if self.should_drop() else make(uid, transport)

        return build


def remote_expert_factory(timeout: float) -> Callable[[str, Any], Any]:
    """What ``RemoteMixtureOfExperts`` builds by default: a ``RemoteExpert`` per call."""
    from volunteer.client.remote_expert import RemoteExpert

    return lambda uid, transport: RemoteExpert(uid, transport, timeout=timeout)


# ----------------------------------------------------------------------------- the swarm


def write_manifest(template: str, dest: Path, dims: Sequence[int], hidden: int | None = None) -> Path:
    """Copy ``configs/<template>.yaml`` to ``dest`` with ``grid.dims`` (and the width) set."""
    import yaml

    doc = yaml.safe_load((CONFIGS / f"{template}.yaml").read_text())
    doc["grid"]["dims"] = [int(d) for d in dims]
    if hidden is not None:
        doc["expert"]["hidden_dim"] = int(hidden)
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def route(uids: Sequence[str], servers: int) -> dict[str, int]:
    """uid -> server index, round-robin in the given (grid) order."""
    if servers < 1:
        raise ValueError("need at least one server")
    return {uid: i % servers for i, uid in enumerate(uids)}


class Swarm:
    """``daemons`` offline ``volunteer join`` processes serving every uid of ``manifest``.

    Use as a context manager; ``endpoints`` and ``uids`` are filled once all serve.
    """

    def __init__(self, template: str, dims: Sequence[int], daemons: int, hidden: int | None = None,
                 start_timeout: float = 180.0) -> None:
        if daemons < 1:
            raise ValueError("need at least one daemon")
        self.template, self.dims, self.count, self.hidden = template, list(dims), daemons, hidden
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.procs: list[subprocess.Popen] = []
        self.homes: list[Path] = []
        self.endpoints: list[str] = []
        self.uids: list[str] = []
        self.started_s = 0.0
        self._old_term: Any = None

    def __enter__(self) -> Swarm:
        self._old_term = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _start(self) -> None:
        from volunteer.manifest import load_manifest

        t0 = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix=f"dmoe-lab-{self.template}-"))
        manifest = write_manifest(self.template, self.dir / "manifest.yaml", self.dims, self.hidden)
        self.uids = list(load_manifest(str(manifest)).grid.uids())
        for i in range(self.count):
            home = self.dir / f"v{i}"
            log = open(self.dir / f"v{i}.log", "wb")  # noqa: SIM115 - the child holds it
            try:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "volunteer", "join", str(manifest), "--home", str(home),
                     "--num-experts", str(len(self.uids)), "--set", "network_enabled=false",
                     "--set", "selfbench=false"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env()))
            finally:
                log.close()
            self.homes.append(home)
        self.endpoints = [self._wait_serving(i, t0 + self.start_timeout) for i in range(self.count)]
        self.started_s = time.monotonic() - t0

    def _wait_serving(self, i: int, deadline: float) -> str:
        want = set(self.uids)
        while time.monotonic() < deadline:
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"volunteer {i} exited ({self.procs[i].returncode}):\n{self.log_tail(i)}")
            snap = daemon_status(self.homes[i])
            if snap and snap.get("state") == "serving" and want <= set(snap.get("experts") or {}):
                return str(snap["endpoint"])
            time.sleep(0.1)
        raise TimeoutError(f"volunteer {i} not serving within {self.start_timeout:.0f}s:\n{self.log_tail(i)}")

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) the running daemons have used so far."""
        import psutil

        total = 0.0
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(proc.pid).cpu_times()
                total += times.user + times.system
        return total

    def log_tail(self, i: int, lines: int = 20) -> str:
        assert self.dir is not None
        path = self.dir / f"v{i}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Stop every daemon (SIGTERM, then SIGKILL after 20 s) and remove the folder."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 20.0
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None

    @contextlib.contextmanager
    def transports(self, one_way_s: float = 0.0) -> Iterator[dict[str, LatencyTransport]]:
        """uid -> a ``LatencyTransport`` over one ZeroMQ transport per daemon (closed after)."""
        from volunteer.client.zmq_transport import ZmqTransport

        zmq = [ZmqTransport(e) for e in self.endpoints]
        wrapped = [LatencyTransport(t, one_way_s) for t in zmq]
        try:
            yield {uid: wrapped[i] for uid, i in route(self.uids, len(zmq)).items()}
        finally:
            for t in zmq:
                t.close()


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------- models and runs


def dmoe_layers(hidden: int, prefix: str, layers: int, experts: int, directory: Any, *, k_best: int,
                k_min: int = 1, timeout: float = 30.0, expert_factory: Callable[[str, Any], Any] | None = None,
                max_workers: int = 8) -> list[Any]:
    """``layers`` DMoE layers; layer ``l`` mixes the grid row ``<prefix>.<l>.0 .. experts-1``."""
    from volunteer.client.moe import RemoteMixtureOfExperts

    return [RemoteMixtureOfExperts(hidden, [experts], f"{prefix}.{layer}", directory, k_best=k_best,
                                   k_min=k_min, forward_timeout=timeout, backward_timeout=timeout,
                                   expert_factory=expert_factory, max_workers=max_workers)
            for layer in range(layers)]


def run_concurrently(steps: Sequence[Callable[[], int]], window_s: float, min_steps: int = 1,
                     clock: Callable[[], float] = time.monotonic) -> tuple[int, int, float]:
    """Call each ``steps[i]`` (returns samples done) over and over in its own thread until
    ``window_s`` has passed and it ran at least ``min_steps`` times. Returns (samples, steps,
    seconds from the start until the last thread finished). A step's exception is re-raised."""
    totals = [[0, 0] for _ in steps]
    errors: list[BaseException] = []
    start = clock()
    deadline = start + window_s

    def loop(i: int) -> None:
        try:
            while not errors and (totals[i][1] < min_steps or clock() < deadline):
                totals[i][0] += int(steps[i]())
                totals[i][1] += 1
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i,), name=f"trainer-{i}", daemon=True)
               for i in range(len(steps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(s for s, _ in totals), sum(n for _, n in totals), clock() - start
