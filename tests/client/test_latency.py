"""Adaptive deadlines: the estimator with an injected clock (deterministic), the request
header carrying the deadline, and a real-socket run where a server that became slow gets a
longer deadline and a fast one a shorter deadline than the configured timeout."""

from __future__ import annotations

import math
import socket
import threading

import pytest
import torch

from tests.runtime.servers import make_backends, running
from volunteer.client.latency import LatencyTracker, default_tracker, endpoint_key
from volunteer.client.remote_expert import RemoteExpert
from volunteer.client.zmq_transport import ZmqTransport
from volunteer.wire.errors import RemoteTimeoutError
from volunteer.wire.messages import decode_request, encode_result

H = 8


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker(**kw) -> tuple[LatencyTracker, FakeClock]:
    clock = FakeClock()
    opts = {"percentile": 0.95, "factor": 3.0, "floor": 0.1, "window": 20, "min_samples": 4}
    opts.update(kw)
    return LatencyTracker(clock=clock, **opts), clock


def test_no_history_means_the_configured_timeout():
    t, _ = tracker()
    assert t.deadline("a|forward", 30.0) == 30.0
    for _ in range(3):  # below min_samples: still no guess
        t.observe("a|forward", 0.01)
    assert t.estimate("a|forward") is None
    assert t.deadline("a|forward", 30.0) == 30.0
    t.observe("a|forward", 0.01)
    assert t.deadline("a|forward", 30.0) == pytest.approx(0.1)  # the floor
    assert t.deadline("b|forward", 30.0) == 30.0  # keys are independent


def test_deadline_is_factor_times_the_nearest_rank_percentile_capped_by_configured():
    t, _ = tracker()
    for i in range(1, 21):
        t.observe("k", float(i))  # 1..20: the 95th percentile by nearest rank is 19
    assert t.estimate("k") == 19.0
    assert t.deadline("k", 100.0) == pytest.approx(57.0)
    assert t.deadline("k", 30.0) == 30.0  # never beyond the configured timeout


def test_window_is_bounded_and_forgets_the_oldest():
    t, _ = tracker(window=5, min_samples=5)
    for _ in range(100):
        t.observe("k", 10.0)
    for _ in range(5):
        t.observe("k", 0.5)
    assert t.estimate("k") == 0.5
    assert t.snapshot()["k"]["samples"] == 5


def test_old_samples_expire_by_the_clock():
    t, clock = tracker(max_age=60.0)
    for _ in range(4):
        t.observe("k", 0.2)
    assert t.deadline("k", 30.0) == pytest.approx(0.6)
    clock.now += 61.0
    assert t.estimate("k") is None
    assert t.deadline("k", 30.0) == 30.0  # stale history is no history
    clock.now += 1.0
    t.observe("k", 0.2)  # one fresh sample is not enough yet
    assert t.deadline("k", 30.0) == 30.0


def test_a_timeout_at_least_doubles_the_next_deadline_until_an_answer():
    t, _ = tracker()  # window 20: one timeout alone does not move the 95th percentile
    for _ in range(20):
        t.observe("k", 0.05)
    short = t.deadline("k", 30.0)
    assert short == pytest.approx(0.15)
    t.observe_timeout("k", short)
    assert t.deadline("k", 30.0) == pytest.approx(0.3)  # the backoff: twice the cut call
    t.observe_timeout("k", 0.3)
    assert t.deadline("k", 30.0) == pytest.approx(0.6)
    t.observe_timeout("k", 20.0)
    assert t.deadline("k", 30.0) == 30.0  # capped
    t.observe("k", 0.05)  # an answer ends the backoff; the censored samples remain:
    assert t.deadline("k", 30.0) == pytest.approx(3 * 0.3)  # 0.3 is now the 19th of 20


def test_keys_are_bounded_least_recently_used_first():
    t, _ = tracker(max_keys=3)
    for key in ("a", "b", "c"):
        t.observe(key, 1.0)
    t.observe("a", 1.0)  # a is now the most recent
    t.observe("d", 1.0)
    assert set(t.snapshot()) == {"a", "c", "d"}
    assert len(t) == 3


def test_bad_values_are_ignored_and_bad_settings_refused():
    t, _ = tracker(min_samples=1)
    for bad in (math.nan, math.inf, -1.0):
        t.observe("k", bad)
        t.observe_timeout("k", bad)
    assert t.estimate("k") is None
    with pytest.raises(ValueError):
        LatencyTracker(percentile=0.0)
    with pytest.raises(ValueError):
        LatencyTracker(factor=0.5)
    with pytest.raises(ValueError):
        LatencyTracker(window=4, min_samples=5)


def test_endpoint_keys_name_the_server_and_the_op():
    transport = ZmqTransport("tcp://127.0.0.1:9")
    assert endpoint_key(transport, "forward") == "tcp://127.0.0.1:9|forward"

    class Peer:
        peer_id = "12D3KooWpeer"

    assert endpoint_key(Peer(), "backward") == "12D3KooWpeer|backward"
    assert default_tracker() is default_tracker()


class RecordingTransport:
    """Answers every forward with zeros; records each call's timeout and header ttl."""

    def __init__(self) -> None:
        self.endpoint = "tcp://recording:1"
        self.calls: list[tuple[float, float | None]] = []

    def request(self, frames, timeout):
        req = decode_request(frames)
        self.calls.append((timeout, req.ttl))
        return encode_result(req.request_id, [torch.zeros_like(req.tensors[0])])

    def close(self) -> None:
        pass


def test_remote_expert_sends_its_adaptive_deadline_in_the_header():
    t, _ = tracker(floor=0.25)
    transport = RecordingTransport()
    expert = RemoteExpert("r.0", transport, timeout=20.0, latency=t)
    with torch.no_grad():
        for _ in range(6):
            expert(torch.randn(1, H))
    # first calls (no history) wait the configured timeout, and say so to the server
    assert transport.calls[0] == (20.0, 20.0)
    assert transport.calls[3] == (20.0, 20.0)
    assert transport.calls[4] == (0.25, 0.25)  # 4 quick answers: the floor
    assert expert.deadline("forward") == 0.25
    assert expert.deadline("backward") == 20.0  # tracked apart
    fixed = RemoteExpert("r.0", transport, timeout=20.0, adaptive=False)
    with torch.no_grad():
        fixed(torch.randn(1, H))
    assert transport.calls[-1] == (20.0, 20.0)


class DelayProxy:
    """A loopback TCP proxy that holds each chunk of the server's replies ``delay`` seconds
    before passing it on: a server that became slow, seen through real sockets."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream[len("tcp://"):].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.delay = 0.0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._socks += [client, server]
            self._spawn(self._pump, client, server, False)
            self._spawn(self._pump, server, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, delayed: bool) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if delayed and self.delay and self._stop.wait(self.delay):
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        for s in [self.listener, *self._socks]:  # shutdown wakes threads blocked on them
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        for s in [self.listener, *self._socks]:
            s.close()


@pytest.mark.timeout(60)
def test_a_slow_servers_deadline_grows_and_a_fast_ones_shrinks():
    backends = make_backends({"fast.0": ("nop", H), "slow.0": ("nop", H)})
    t = LatencyTracker(floor=0.05, window=16, min_samples=4)
    configured = 10.0
    with running(backends) as (_, fe):
        proxy = DelayProxy(fe.endpoint)
        try:
            fast = RemoteExpert("fast.0", fe.endpoint, timeout=configured, latency=t)
            slow = RemoteExpert("slow.0", proxy.endpoint, timeout=configured, latency=t)
            with torch.no_grad():
                for _ in range(6):
                    fast(torch.randn(2, H))
                    slow(torch.randn(2, H))
            assert fast.deadline() < configured  # a fast server's deadline shrank
            before = slow.deadline()
            assert before < configured
            # now slower than its deadline (a new connection's handshake is delayed too)
            proxy.delay = max(0.3, 2 * before)
            timeouts, answered = 0, False
            with torch.no_grad():
                for _ in range(12):
                    try:
                        slow(torch.randn(2, H))
                    except RemoteTimeoutError:
                        timeouts += 1
                        continue
                    answered = True
                    break
            assert timeouts >= 1  # the first slow call was cut at the short deadline...
            assert answered  # ...and the deadline grew until the server could answer
            assert slow.deadline() > before
            assert slow.deadline() >= proxy.delay
            assert slow.deadline() <= configured
            assert fast.deadline() < slow.deadline()  # tracked per server
        finally:
            proxy.close()
            fast.close()
            slow.close()
