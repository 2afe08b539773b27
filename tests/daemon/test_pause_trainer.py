"""The trainer's side of a paused volunteer: a "paused" reply marks the server unavailable
(not broken, not fast), choices pass over it, and a forward is retried once on another
replica (``server_choice``, ``dispatch.CallPlan.reroute``); a real runtime's gate answers
the typed reply with in-flight work finished."""

from __future__ import annotations

import concurrent.futures as cf
import random
import threading
import time

import torch

from volunteer.client.dispatch import CallPlan, ExpertCall, dispatch
from volunteer.client.server_choice import MeasuredTransport, ServerScores
from volunteer.net.records import ServerEntry
from volunteer.wire.errors import PausedError
from volunteer.wire.messages import encode_error


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def entry(peer: str) -> ServerEntry:
    return ServerEntry("exp", "ffn.", peer, 1, time.time() + 60, ("1",), "serving", 0.0)


class Replying:
    def __init__(self, frames: list) -> None:
        self.frames = frames

    def request(self, frames, timeout):
        return self.frames

    def close(self) -> None:
        pass


def test_paused_reply_marks_unavailable_not_broken_and_choice_passes_over_it() -> None:
    clock = Clock()
    scores = ServerScores(clock=clock)
    for peer in ("A", "B"):
        scores.record_success(peer, 0.01)
    MeasuredTransport(Replying(encode_error(1, "paused", "resting")), "A", scores).request([b"x"], 1.0)
    m = scores.measure("A")
    assert m is not None and m.errors == 0 and m.successes == 1  # no failure, no fake latency counted
    assert not scores.available("A")
    assert {scores.choose([entry("A"), entry("B")], random.Random(i)).peer_id for i in range(50)} == {"B"}
    assert scores.choose([entry("A")], random.Random(0)).peer_id == "A"  # the only one: still offered
    clock.t += 31.0
    assert scores.available("A")
    scores.record_unavailable("A")
    scores.record_success("A", 0.01)  # it answered: working again
    assert scores.available("A")
    MeasuredTransport(Replying(encode_error(1, "overloaded", "full")), "B", scores).request([b"x"], 1.0)
    assert scores.measure("B").errors == 1 and scores.available("B")  # a fault still counts as one


class Paused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        raise PausedError("paused")


class Double(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.w


def _plan(expert, pool, reroute, failures):
    call = ExpertCall("e.0", expert, torch.tensor([0, 1]), torch.tensor([0, 0]))
    return CallPlan(calls=[call], batch=2, k=1, out_features=3, pool=pool, k_min=0, forward_timeout=30.0,
                    backward_timeout=30.0, timeout_after_k_min=None,
                    on_failure=lambda uid, exc: failures.append(exc), reroute=reroute)


def test_a_paused_forward_is_retried_on_another_replica_and_its_backward_follows() -> None:
    other = Double()
    asked: list[str] = []

    def reroute(uid, expert, exc):
        asked.append(f"{uid}:{exc.code}")
        return other

    failures: list = []
    with cf.ThreadPoolExecutor(2) as pool:
        plan = _plan(Paused(), pool, reroute, failures)
        x = torch.ones(2, 3, requires_grad=True)
        out, mask = dispatch(plan, x)
        out.sum().backward()
    assert asked == ["e.0:paused"] and failures == [] and bool(mask.all())
    assert torch.equal(out[:, 0], torch.full((2, 3), 2.0)) and other.w.grad is not None  # backward went there
    assert torch.equal(x.grad, torch.full((2, 3), 2.0))


def test_without_another_replica_the_refusal_stands() -> None:
    failures: list = []
    paused = Paused()
    with cf.ThreadPoolExecutor(2) as pool:
        for reroute in (None, lambda uid, expert, exc: None, lambda uid, expert, exc: expert):
            plan = _plan(paused, pool, reroute, failures)
            _out, mask = dispatch(plan, torch.ones(2, 3))
            assert not bool(mask.any())
    assert len(failures) == 3 and all(isinstance(f, PausedError) for f in failures) and paused.calls == 3


def test_the_runtime_gate_answers_paused_and_finishes_what_it_admitted() -> None:
    from volunteer.experts.backend import ExpertBackend, OptimizerSpec
    from volunteer.runtime.runtime import Runtime
    from volunteer.wire.messages import decode_reply, encode_request

    backend = ExpertBackend("e.0", "ffn", 8, OptimizerSpec(name="sgd", lr=0.1), seed=1)
    runtime = Runtime({"e.0": backend})
    runtime.start()
    answers: list = []
    done = threading.Event()

    def reply(frames) -> None:
        answers.append(frames)
        done.set()

    try:
        with runtime.exclusive():  # batches wait: the admitted request is in flight while we pause
            runtime.submit(encode_request("forward", "e.0", [torch.randn(2, 8)], request_id=1, timeout=30.0), reply)
            runtime.pause_gate.close()
            runtime.submit(encode_request("forward", "e.0", [torch.randn(2, 8)], request_id=2, timeout=30.0), reply)
            assert done.wait(10) and len(answers) == 1  # the refusal, at once
        refused = answers[0]
        try:
            decode_reply(refused)
            raise AssertionError("expected the typed paused reply")
        except PausedError as exc:
            assert "another replica" in exc.message
        deadline = time.monotonic() + 30
        while len(answers) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert decode_reply(answers[1]).tensors[0].shape == (2, 8)  # in-flight work finished
        runtime.pause_gate.open()
        done.clear()
        runtime.submit(encode_request("forward", "e.0", [torch.randn(2, 8)], request_id=3, timeout=30.0), reply)
        deadline = time.monotonic() + 30
        while len(answers) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert decode_reply(answers[2]).tensors[0].shape == (2, 8)  # resumed at once
    finally:
        runtime.stop()
