"""Self-benchmark: a real (short) measurement, cached per device and expert spec."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from volunteer.experts import selfbench
from volunteer.experts.selfbench import (
    cached_thread_choice,
    cached_throughput,
    candidate_threads,
    choose_threads,
)


@pytest.mark.timeout(60)
def test_measures_once_then_reads_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "selfbench.json"
    first = cached_throughput(cache, "cpu", "cpu (test)", "ffn", 16, {}, 8)
    assert first["cached"] is False
    assert first["train_samples_per_s"] > 0 and first["forward_samples_per_s"] > 0
    second = cached_throughput(cache, "cpu", "cpu (test)", "ffn", 16, {}, 8)
    assert second["cached"] is True and second["train_samples_per_s"] == first["train_samples_per_s"]
    other = cached_throughput(cache, "cpu", "cpu (test)", "nop", 16, {}, 8)  # another spec: measured anew
    assert other["cached"] is False
    assert len(json.loads(cache.read_text())) == 2
    assert sorted(p.name for p in cache.parent.iterdir()) == ["selfbench.json"]  # no temp files
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600


def test_garbage_cache_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "selfbench.json"
    cache.write_text("[not a mapping")
    assert cached_throughput(cache, "cpu", "cpu (test)", "nop", 4, {}, 4)["cached"] is False


# ------------------------------------------------------------------ thread choice

def test_choose_threads_keeps_the_fewest_within_the_margin() -> None:
    assert choose_threads({1: 100.0, 2: 190.0}) == 2
    assert choose_threads({1: 100.0, 2: 104.0}) == 1  # 4% more is not worth a core
    assert choose_threads({1: 100.0, 2: 50.0}) == 1
    assert choose_threads({1: 100.0, 2: 200.0, 4: 205.0}) == 2
    assert choose_threads({1: 100.0, 2: 200.0, 4: 205.0}, margin=0.0) == 4
    assert choose_threads({"3": 10.0, 1: float("nan")}) == 3  # cached keys are strings
    with pytest.raises(ValueError):
        choose_threads({1: 0.0, 2: float("nan")})


def test_candidate_threads() -> None:
    assert candidate_threads(1) == [1]
    assert candidate_threads(2) == [1, 2]
    assert candidate_threads(4) == [1, 2, 3, 4]
    assert candidate_threads(6) == [1, 2, 4, 5, 6]
    assert candidate_threads(16) == [1, 2, 4, 8, 15, 16]


class FakeClock:
    """``perf_counter`` for ``time_threads``: a step costs ``cost[threads]`` fake seconds."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.now = 0.0
        self.cost = cost
        self.threads = 0
        self.calls: list[int] = []

    def set_threads(self, n: int) -> None:
        self.calls.append(n)
        self.threads = n

    def step(self) -> None:
        self.now += self.cost[self.threads]


def test_time_threads_rates_alternate_the_order_and_restore_the_count(monkeypatch) -> None:
    import torch

    clock = FakeClock({1: 0.1, 2: 0.04, 3: 0.05})
    monkeypatch.setattr(selfbench.time, "perf_counter", lambda: clock.now)
    before = torch.get_num_threads()
    rates = selfbench.time_threads(clock.step, [1, 2, 3], batch_size=10, budget_s=0.3, rounds=2,
                                   set_threads=clock.set_threads)
    assert rates == pytest.approx({1: 100.0, 2: 250.0, 3: 200.0})
    assert clock.calls == [1, 2, 3, 3, 2, 1, before]  # forward, backward, then restored
    assert selfbench.choose_threads(rates) == 2


def test_thread_choice_is_measured_once_then_cached(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "selfbench.json"
    measured: list[list[int]] = []

    def fake_time(step, candidates, batch_size, **kw):
        measured.append(list(candidates))
        return {1: 100.0, 2: 180.0, 3: 181.0}

    monkeypatch.setattr(selfbench, "time_threads", fake_time)
    monkeypatch.setattr(selfbench, "serving_step", lambda *a: (lambda: None))
    args = (cache, "cpu (test)", "ffn", 16, {}, 8)
    first = cached_thread_choice(*args, [1, 2, 3])
    assert (first["threads"], first["cached"]) == (2, False)
    second = cached_thread_choice(*args, [3, 2, 1])
    assert (second["threads"], second["cached"]) == (2, True)
    assert measured == [[1, 2, 3]]
    cached_thread_choice(*args, [1, 2])  # other candidates (another CPU count): measured anew
    assert measured == [[1, 2, 3], [1, 2]]
    assert cached_throughput(cache, "cpu", "cpu (test)", "nop", 4, {}, 4)["cached"] is False
    assert len(json.loads(cache.read_text())) == 3  # both kinds of entry share the file


def test_a_damaged_thread_entry_is_measured_again(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "selfbench.json"
    monkeypatch.setattr(selfbench, "serving_step", lambda *a: (lambda: None))
    monkeypatch.setattr(selfbench, "time_threads", lambda *a, **k: {1: 50.0, 2: 100.0})
    args = (cache, "cpu (test)", "ffn", 16, {}, 8, [1, 2])
    cached_thread_choice(*args)
    doc = json.loads(cache.read_text())
    (key,) = doc
    doc[key]["rates"] = {"1": "fast", "2": None}
    cache.write_text(json.dumps(doc))
    again = cached_thread_choice(*args)
    assert (again["threads"], again["cached"]) == (2, False)


@pytest.mark.timeout(60)
def test_a_real_thread_measurement_picks_a_candidate(tmp_path: Path) -> None:
    pick = cached_thread_choice(tmp_path / "selfbench.json", "cpu (test)", "ffn", 16, {}, 8, [1, 2])
    assert pick["threads"] in (1, 2) and set(pick["rates"]) == {1, 2}
    assert all(r > 0 for r in pick["rates"].values())


def test_thread_chooser_answers_the_cached_choice_and_logs_it(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(selfbench, "serving_step", lambda *a: (lambda: None))
    monkeypatch.setattr(selfbench, "time_threads", lambda *a, **k: {1: 100.0, 2: 150.0, 3: 100.0})
    choose = selfbench.thread_chooser(tmp_path / "selfbench.json", "cpu (test)", "ffn", 16, {}, 8)
    with caplog.at_level("INFO", logger="volunteer.experts.selfbench"):
        assert choose([1, 2, 3]) == 2
        assert choose([1, 2, 3]) == 2
    assert "torch threads: 2" in caplog.text and "cached" in caplog.records[-1].getMessage()
