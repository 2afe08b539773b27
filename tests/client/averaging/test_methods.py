"""The thesis's averaging arithmetic against hand-computed cases, and config validation."""

from __future__ import annotations

import random

import pytest
import torch

from volunteer.client.averaging.methods import (
    METHODS,
    AveragingConfig,
    average_into_,
    divergence,
    elastic_pull_,
    mean_,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_elastic_pull_two_peers_symmetric() -> None:
    a = [t(0.0, 4.0), t(2.0)]
    b = [t(8.0, 0.0), t(6.0)]
    a_before = [x.clone() for x in a]
    elastic_pull_(a, b, 0.25)  # a - 0.25 (a - b)
    elastic_pull_(b, a_before, 0.25)
    assert torch.equal(a[0], t(2.0, 3.0)) and torch.equal(a[1], t(3.0))
    assert torch.equal(b[0], t(6.0, 1.0)) and torch.equal(b[1], t(5.0))


def test_elastic_pull_alpha_half_is_the_pair_mean() -> None:
    a, b = [t(1.0, 3.0)], [t(5.0, -3.0)]
    a0 = [a[0].clone()]
    elastic_pull_(a, b, 0.5)
    elastic_pull_(b, a0, 0.5)
    assert torch.equal(a[0], t(3.0, 0.0)) and torch.equal(b[0], t(3.0, 0.0))


def test_elastic_pull_three_peers_in_sequence() -> None:
    # a pulls with b, then b (already moved) pulls with c: alpha 0.5
    a, b, c = [t(0.0)], [t(4.0)], [t(10.0)]
    a0 = [a[0].clone()]
    elastic_pull_(a, b, 0.5)
    elastic_pull_(b, a0, 0.5)  # a = b = 2
    b1 = [b[0].clone()]
    elastic_pull_(b, c, 0.5)
    elastic_pull_(c, b1, 0.5)  # b = c = 6
    assert [float(x[0]) for x in (a, b, c)] == [2.0, 6.0, 6.0]


def test_average_into_weights() -> None:
    mine = [t(2.0, 4.0)]
    average_into_(mine, [t(6.0, 0.0)])
    assert torch.equal(mine[0], t(4.0, 2.0))
    average_into_(mine, [t(8.0, 6.0)], weight=0.25)  # 0.75 mine + 0.25 theirs
    assert torch.equal(mine[0], t(5.0, 3.0))


def test_average_into_converts_dtype() -> None:
    mine = [t(1.0)]
    average_into_(mine, [torch.tensor([3.0], dtype=torch.float16)])
    assert mine[0].dtype == torch.float32 and float(mine[0][0]) == 2.0


def test_gossip_push_three_peers() -> None:
    # a pushes to b (b averages a in), then c pushes to b
    a, b, c = [t(0.0)], [t(4.0)], [t(12.0)]
    average_into_(b, a)
    assert float(b[0][0]) == 2.0
    average_into_(b, c)
    assert float(b[0][0]) == 7.0
    assert float(a[0][0]) == 0.0 and float(c[0][0]) == 12.0


def test_mean_two_and_three_peers() -> None:
    into = [t(1.0, 2.0), t(3.0)]
    mean_(into, [[t(3.0, 4.0), t(5.0)]])
    assert torch.equal(into[0], t(2.0, 3.0)) and torch.equal(into[1], t(4.0))
    into = [t(0.0, 3.0)]
    mean_(into, [[t(3.0, 6.0)], [t(6.0, 0.0)]])
    assert torch.equal(into[0], t(3.0, 3.0))


def test_mean_of_nothing_is_unchanged() -> None:
    into = [t(1.5)]
    mean_(into, [])
    assert torch.equal(into[0], t(1.5))


def test_divergence() -> None:
    assert divergence([t(3.0), t(4.0)], [t(3.0), t(4.0)]) == 0.0
    # ||(3,4) - (0,0)|| / ||(3,4)|| = 1
    assert divergence([t(3.0), t(4.0)], [t(0.0), t(0.0)]) == pytest.approx(1.0)
    # ||(1,1) - (1,0)|| / sqrt(2)
    assert divergence([t(1.0, 1.0)], [t(1.0, 0.0)]) == pytest.approx(2 ** -0.5)
    assert divergence([t(0.0)], [t(1.0)]) == pytest.approx(1e12)


def test_arithmetic_refuses_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="length"):
        mean_([t(1.0)], [[t(1.0), t(2.0)]])
    with pytest.raises(ValueError, match="shape"):
        elastic_pull_([t(1.0)], [t(1.0, 2.0)], 0.5)


def test_should_average_schedules() -> None:
    rng = random.Random(0)
    every4 = AveragingConfig("elasticGossip", period=4)
    assert [s for s in range(1, 13) if every4.should_average(s, rng)] == [4, 8, 12]
    always = AveragingConfig("gossipingSgd")
    assert all(always.should_average(s, rng) for s in range(1, 5))
    assert all(AveragingConfig("gradAllReduce").should_average(s, rng) for s in range(1, 5))
    assert not any(AveragingConfig(m).should_average(s, rng) for m in ("local", "noComm")
                   for s in range(1, 5))
    coin = AveragingConfig("elasticGossip", prob=0.25)
    hits = sum(coin.should_average(s, random.Random(7)) for s in range(1, 2))
    assert hits in (0, 1)
    rng = random.Random(1)
    hits = sum(coin.should_average(s, rng) for s in range(1, 4001))
    assert 800 < hits < 1200  # binomial(4000, 0.25): mean 1000, sd 27


def test_should_average_prob_is_reproducible() -> None:
    coin = AveragingConfig("gossipingSgd", prob=0.5)
    one = [coin.should_average(s, random.Random(3)) for s in range(20)]
    two = [coin.should_average(s, random.Random(3)) for s in range(20)]
    assert one == two


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"method": "allReduce"}, "method"),
    ({"method": "elasticGossip", "period": 0}, "period"),
    ({"method": "elasticGossip", "period": 2.5}, "period"),
    ({"method": "elasticGossip", "period": True}, "period"),
    ({"method": "elasticGossip", "prob": 0.0}, "prob"),
    ({"method": "elasticGossip", "prob": 1.5}, "prob"),
    ({"method": "elasticGossip", "period": 2, "prob": 0.5}, "period, prob"),
    ({"method": "gradAllReduce", "period": 2}, "period, prob"),
    ({"method": "noComm", "prob": 0.5}, "period, prob"),
    ({"method": "elasticGossip", "alpha": 0.0}, "alpha"),
    ({"method": "elasticGossip", "alpha": 1.01}, "alpha"),
    ({"method": "gradAllReduce", "timeout": 0}, "timeout"),
    ({"method": "gradAllReduce", "timeout": float("inf")}, "timeout"),
    ({"method": "gossipingSgd", "gossip": "both"}, "gossip"),
])
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError) as err:
        AveragingConfig(**kwargs)
    text = str(err.value)
    assert text.startswith(f"{field}:") and "\n" not in text


def test_config_accepts_every_method() -> None:
    for method in METHODS:
        cfg = AveragingConfig(method)
        assert cfg.uses_group == (method not in ("local", "noComm"))
    AveragingConfig("elasticGossip", period=4, alpha=1.0, timeout=0.5)
    AveragingConfig("gossipingSgd", prob=1.0, gossip="pull")
