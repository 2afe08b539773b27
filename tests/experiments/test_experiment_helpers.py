"""The Learning@home experiments' helpers (``scripts/experiments/dmoe_lab.py``): the latency
wrapper, the failure injector (also through a real ``RemoteMixtureOfExperts`` call), the
uid routing, the manifest copy and the concurrent step runner. No daemons, no timing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "experiments"))

import dmoe_lab

from volunteer.client.directory import StaticDirectory
from volunteer.client.moe import AVOID_CODES, NotEnoughExpertsError, RemoteMixtureOfExperts
from volunteer.manifest import load_manifest


class _Recorder:
    """A fake transport and a fake sleep writing into one event list."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.closed = False

    def request(self, frames, timeout):
        self.events.append(("request", list(frames), timeout))
        return [b"reply"]

    def close(self) -> None:
        self.closed = True

    def sleep(self, seconds: float) -> None:
        self.events.append(("sleep", seconds))


def test_latency_waits_the_one_way_delay_before_the_request_and_after_the_reply():
    rec = _Recorder()
    transport = dmoe_lab.LatencyTransport(rec, 0.05, sleep=rec.sleep)
    assert transport.request([b"a", b"b"], 7.0) == [b"reply"]
    assert rec.events == [("sleep", 0.05), ("request", [b"a", b"b"], 7.0), ("sleep", 0.05)]


def test_latency_can_change_between_calls_and_zero_never_sleeps():
    rec = _Recorder()
    transport = dmoe_lab.LatencyTransport(rec, 0.0, sleep=rec.sleep)
    transport.request([b"x"], 1.0)
    transport.one_way_s = 0.2
    transport.request([b"y"], 1.0)
    assert [e for e in rec.events if e[0] == "sleep"] == [("sleep", 0.2), ("sleep", 0.2)]
    assert [e[1] for e in rec.events if e[0] == "request"] == [[b"x"], [b"y"]]


def test_latency_close_leaves_the_inner_transport_to_its_owner_and_rejects_negative_delays():
    rec = _Recorder()
    dmoe_lab.LatencyTransport(rec, 0.01).close()
    assert not rec.closed
    with pytest.raises(ValueError):
        dmoe_lab.LatencyTransport(rec, -0.001)


def test_injector_drops_at_the_given_rate_and_a_seed_repeats_the_same_drops():
    draws = 20_000
    a, b, c = (dmoe_lab.FailureInjector(0.1, seed=s) for s in (7, 7, 8))
    seq_a = [a.should_drop() for _ in range(draws)]
    seq_b = [b.should_drop() for _ in range(draws)]
    seq_c = [c.should_drop() for _ in range(draws)]
    assert seq_a == seq_b and seq_a != seq_c
    assert a.calls == draws and a.dropped == sum(seq_a)
    # binomial(20000, 0.1): mean 2000, sd 42; fixed seeds, so this is exact, not a flake
    assert 1800 < a.dropped < 2200 and 1800 < c.dropped < 2200


def test_injector_extremes_and_pause():
    never, always = dmoe_lab.FailureInjector(0.0, seed=1), dmoe_lab.FailureInjector(1.0, seed=1)
    assert not any(never.should_drop() for _ in range(100)) and never.calls == 0
    assert all(always.should_drop() for _ in range(100))
    always.active = False
    assert not always.should_drop() and always.calls == 100
    with pytest.raises(ValueError):
        dmoe_lab.FailureInjector(1.5)


def test_injected_failure_does_not_make_the_layer_avoid_the_expert():
    assert dmoe_lab.InjectedFailure.code not in AVOID_CODES
    made: list[str] = []
    factory = dmoe_lab.FailureInjector(1.0).factory(lambda uid, t: made.append(uid) or nn.Identity())
    failed = factory("p.0", None)
    with pytest.raises(dmoe_lab.InjectedFailure):
        failed(torch.zeros(1, 2))
    assert made == []
    assert isinstance(dmoe_lab.FailureInjector(0.0).factory(lambda uid, t: nn.Identity())("p.1", None),
                      nn.Identity)


def _local_layer(rate: float, seed: int, experts: int = 4, k_best: int = 2, k_min: int = 1):
    """A real RemoteMixtureOfExperts whose experts are local Linear modules (no network)."""
    torch.manual_seed(0)
    modules = {f"t.{e}": nn.Linear(6, 6) for e in range(experts)}
    directory = StaticDirectory({uid: object() for uid in modules})  # type: ignore[dict-item]
    injector = dmoe_lab.FailureInjector(rate, seed=seed)
    moe = RemoteMixtureOfExperts(6, [experts], "t", directory, k_best=k_best, k_min=k_min,
                                 expert_factory=injector.factory(lambda uid, t: modules[uid]))
    return moe, injector, modules


def _expected(moe, modules, x, answered):
    """The mixture by hand: per sample, its top-k experts that answered, softmax over them."""
    with torch.no_grad():
        logits = moe.gate(x)[0]
        rows = []
        for b in range(x.shape[0]):
            top = torch.topk(logits[b], moe.k_best).indices.tolist()
            alive = [e for e in top if f"t.{e}" in answered]
            w = torch.softmax(logits[b, alive], dim=0)
            rows.append(sum(w[i] * modules[f"t.{e}"](x[b]) for i, e in enumerate(alive)))
        return torch.stack(rows)


def test_dropped_experts_are_renormalised_away_in_a_real_layer_call():
    moe, injector, modules = _local_layer(0.5, seed=3)
    try:
        x = torch.randn(16, 6, requires_grad=True)
        steps_with_drops = 0
        for _ in range(6):
            try:
                out = moe(x)
            except NotEnoughExpertsError:
                continue
            report = moe.last_report
            assert all(msg.startswith("injected_failure") for msg in report.failed.values())
            assert not set(report.answered) & set(report.failed)
            torch.testing.assert_close(out.detach(), _expected(moe, modules, x.detach(), set(report.answered)))
            out.sum().backward()
            assert torch.isfinite(x.grad).all()
            steps_with_drops += bool(report.failed)
        assert injector.dropped > 0 and steps_with_drops > 0
        assert moe.avoid.active() == set()  # injected failures never blacklist an expert
    finally:
        moe.close()


def test_no_failures_gives_the_plain_mixture():
    plain, _, _ = _local_layer(0.0, seed=0)
    faulty, injector, _ = _local_layer(1.0, seed=0)
    try:
        x = torch.randn(5, 6)
        assert plain(x).shape == (5, 6) and not plain.last_report.failed
        with pytest.raises(NotEnoughExpertsError):
            faulty(x)
        assert injector.dropped == injector.calls > 0
    finally:
        plain.close()
        faulty.close()


def test_route_spreads_neighbouring_uids_over_servers():
    uids = [f"p.{layer}.{e}" for layer in range(2) for e in range(4)]
    routes = dmoe_lab.route(uids, 3)
    assert list(routes.values()) == [0, 1, 2, 0, 1, 2, 0, 1]
    assert all(routes[f"p.0.{e}"] != routes[f"p.0.{e + 1}"] for e in range(3))
    with pytest.raises(ValueError):
        dmoe_lab.route(uids, 0)


@pytest.mark.parametrize("template", ["throughput", "convergence"])
def test_manifest_copy_sets_the_grid_and_width_and_stays_valid(tmp_path, template):
    path = dmoe_lab.write_manifest(template, tmp_path / "m.yaml", [3, 2, 5], hidden=48)
    manifest = load_manifest(str(path))
    assert manifest.grid.dims == (3, 2, 5) and manifest.expert.hidden_dim == 48
    assert len(list(manifest.grid.uids())) == 30
    assert manifest.experiment.name == template


def test_run_concurrently_runs_every_trainer_at_least_min_steps_and_sums_samples():
    now = [0.0]
    counts = [0, 0, 0]

    def make(i: int, samples: int):
        def step() -> int:
            counts[i] += 1
            return samples

        return step

    # the clock stands still at the end of an empty window: only min_steps keeps each loop going
    samples, steps, secs = dmoe_lab.run_concurrently([make(0, 4), make(1, 5), make(2, 6)], 0.0, 3,
                                                     clock=lambda: now[0])
    assert counts == [3, 3, 3] and steps == 9 and samples == 3 * (4 + 5 + 6) and secs == 0.0


def test_run_concurrently_stops_at_the_window_and_reraises_a_step_error():
    ticks = iter(range(1000))

    def clock() -> float:
        return float(next(ticks))

    samples, steps, _ = dmoe_lab.run_concurrently([lambda: 2], 5.0, 1, clock=clock)
    assert steps >= 1 and samples == 2 * steps and steps <= 6

    def broken() -> int:
        raise RuntimeError("expert gone")

    with pytest.raises(RuntimeError, match="expert gone"):
        dmoe_lab.run_concurrently([broken, lambda: 1], 0.0, 1)
