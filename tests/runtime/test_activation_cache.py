"""Activation cache: bounds and eviction, and that a backward served from the cache equals
a recomputed one (and survives optimizer steps taken in between)."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.servers import Replies, make_backends, running
from volunteer.experts.backend import ExpertBackend, OptimizerSpec
from volunteer.runtime.activation_cache import ActivationCache
from volunteer.runtime.limits import ServingLimits
from volunteer.wire.errors import BadRequestError, CacheMissError
from volunteer.wire.messages import decode_reply, encode_request

H = 16
pytestmark = pytest.mark.timeout(60)


def graph_of(backend: ExpertBackend, rows: int = 2):
    return backend.forward_graph([torch.randn(rows, H)])


def test_cache_bounds_entries_bytes_and_age():
    b = ExpertBackend("u", "nop", H)
    cache = ActivationCache(max_entries=2, max_bytes=1000, ttl_s=60)
    for fid in range(3):
        assert cache.put("u", graph_of(b), {fid: (0, 2)}, nbytes=100)
    assert len(cache) == 2 and cache.lookup("u", 0) is None and cache.lookup("u", 2) is not None
    assert cache.evictions == 1
    assert not cache.put("u", graph_of(b), {9: (0, 2)}, nbytes=5000)  # larger than the byte bound
    cache.put("u", graph_of(b), {10: (0, 2)}, nbytes=950)
    assert cache.nbytes <= 1000 and cache.lookup("u", 10) is not None
    aged = ActivationCache(max_entries=8, max_bytes=10**6, ttl_s=0.0)
    aged.put("u", graph_of(b), {1: (0, 2)}, nbytes=1)
    assert aged.lookup("u", 1) is None
    off = ActivationCache(max_entries=0, max_bytes=10**6, ttl_s=60)
    assert not off.enabled and not off.put("u", graph_of(b), {1: (0, 2)}, nbytes=1)


def test_pop_removes_all_members_of_a_graph():
    b = ExpertBackend("u", "nop", H)
    cache = ActivationCache(max_entries=4, max_bytes=10**6, ttl_s=60)
    cache.put("u", graph_of(b, 4), {1: (0, 2), 2: (2, 4)}, nbytes=10)
    entry, start, end = cache.lookup("u", 2)
    assert (start, end) == (2, 4)
    cache.pop(entry.graph_id)
    assert cache.lookup("u", 1) is None and cache.lookup("u", 2) is None and cache.nbytes == 0


def run_forward_backward(cache_size: int, steps_between: int = 0):
    """Forward (will backward) two requests, optionally other updates, then their backwards."""
    backends = make_backends({"e": ("ffn", H)}, OptimizerSpec("sgd", lr=0.1), seed=3)
    torch.manual_seed(7)
    xs = [torch.randn(3, H) for _ in range(2)]
    gs = [torch.randn(3, H) for _ in range(2)]
    replies = Replies()
    with running(backends, ServingLimits(activation_cache_size=cache_size), zmq=False) as (rt, _):
        with rt.exclusive():
            for i in range(2):
                rt.submit(
                    encode_request("forward", "e", [xs[i]], request_id=10 + i, will_backward=True),
                    replies.callback(f"f{i}"),
                )
        replies.wait(2)
        for j in range(steps_between):
            other = torch.randn(3, H)
            rt.submit(
                encode_request("backward", "e", [other, other], request_id=50 + j),
                replies.callback(f"o{j}"),
            )
            replies.wait(3 + j)
        n = replies.count()
        with rt.exclusive():
            for i in range(2):
                rt.submit(
                    encode_request(
                        "backward", "e", [xs[i], gs[i]], request_id=20 + i, forward_id=10 + i
                    ),
                    replies.callback(f"b{i}"),
                )
        replies.wait(n + 2)
        stats = rt.stats()["e"]
    grads = [replies.decoded(f"b{i}").tensors[0] for i in range(2)]
    return grads, stats, backends["e"]


def test_cached_backward_equals_recomputed_backward():
    cached, stats_on, be_on = run_forward_backward(cache_size=8)
    recomputed, stats_off, be_off = run_forward_backward(cache_size=0)
    assert stats_on["activation_cache"].get("hits") == 2
    assert stats_off["activation_cache"].get("hits", 0) == 0
    for a, b in zip(cached, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p, q in zip(be_on.module.parameters(), be_off.module.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert be_on.updates_applied == be_off.updates_applied == 1


def test_cached_graph_survives_optimizer_steps_in_between():
    grads, stats, backend = run_forward_backward(cache_size=8, steps_between=2)
    assert stats["activation_cache"].get("hits") == 2
    assert backend.updates_applied == 3
    assert all(torch.isfinite(g).all() for g in grads)


def test_backward_with_different_inputs_than_the_cached_forward_recomputes():
    backends = make_backends({"e": ("ffn", H)}, seed=1)
    replies = Replies()
    x, other, g = torch.randn(2, H), torch.randn(2, H), torch.randn(2, H)
    with running(backends, zmq=False) as (rt, _):
        rt.submit(
            encode_request("forward", "e", [x], request_id=1, will_backward=True),
            replies.callback("f"),
        )
        replies.wait(1)
        rt.submit(
            encode_request("backward", "e", [other, g], request_id=2, forward_id=1),
            replies.callback("b"),
        )
        replies.wait(2)
        stats = rt.stats()["e"]
    assert stats["activation_cache"] == {"misses": 1}
    leaf = other.clone().requires_grad_()
    backend = make_backends({"e": ("ffn", H)}, seed=1)["e"]
    backend.module(leaf).backward(g)
    torch.testing.assert_close(replies.decoded("b").tensors[0], leaf.grad, rtol=1e-5, atol=1e-6)


def reference_grads(seed: int, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    backend = make_backends({"e": ("ffn", H)}, seed=seed)["e"]
    leaf = x.clone().requires_grad_()
    backend.module(leaf).backward(g)
    return leaf.grad


def test_backward_without_inputs_uses_the_cache_and_early_siblings_recompute_from_it():
    backends = make_backends({"e": ("ffn", H)}, OptimizerSpec("sgd", lr=0.0), seed=4)
    replies = Replies()
    xs = [torch.randn(2, H) for _ in range(3)]
    gs = [torch.randn(2, H) for _ in range(3)]
    with running(backends, zmq=False) as (rt, _):
        with rt.exclusive():  # three forwards merged into one cached graph
            for i in range(3):
                frames = encode_request(
                    "forward", "e", [xs[i]], request_id=i + 1, will_backward=True
                )
                rt.submit(frames, replies.callback(f"f{i}"))
        replies.wait(3)
        assert all(replies.decoded(f"f{i}").cached for i in range(3))

        def backward(i: int) -> list:
            return encode_request(
                "backward", "e", [gs[i]], request_id=10 + i, forward_id=i + 1, inputs_included=False
            )

        rt.submit(backward(0), replies.callback("b0"))  # early sibling: recomputed from the cache
        replies.wait(4)
        with rt.exclusive():
            rt.submit(backward(1), replies.callback("b1"))
            rt.submit(backward(2), replies.callback("b2"))
        replies.wait(6)
        stats = rt.stats()["e"]
        assert rt.cache_info()["entries"] == 0
    assert stats["activation_cache"] == {"hits": 3}
    assert stats["errors"] == {}
    for i in range(3):
        expected = reference_grads(4, xs[i], gs[i])
        torch.testing.assert_close(
            replies.decoded(f"b{i}").tensors[0], expected, rtol=1e-5, atol=1e-6
        )


def test_backward_without_inputs_after_eviction_is_a_cache_miss():
    backends = make_backends({"e": ("ffn", H)}, seed=5)
    replies = Replies()
    x, g = torch.randn(2, H), torch.randn(2, H)
    with running(backends, ServingLimits(activation_cache_size=1), zmq=False) as (rt, _):
        for i in range(2):  # the second forward evicts the first one's graph
            rt.submit(
                encode_request("forward", "e", [x], request_id=i + 1, will_backward=True),
                replies.callback(f"f{i}"),
            )
            replies.wait(i + 1)
        rt.submit(
            encode_request("backward", "e", [g], request_id=9, forward_id=1, inputs_included=False),
            replies.callback("lost"),
        )
        replies.wait(3)
        with pytest.raises(CacheMissError):
            replies.decoded("lost")
        assert backends["e"].updates_applied == 0
        with pytest.raises(BadRequestError, match="omitted"):
            decode_reply(
                _sync(
                    rt,
                    encode_request(
                        "backward", "e", [x, g], request_id=5, forward_id=2, inputs_included=False
                    ),
                )
            )
        with pytest.raises(BadRequestError, match="xi"):
            decode_reply(
                _sync(rt, encode_request("forward", "e", [x], request_id=6, inputs_included=False))
            )


def _sync(rt, frames) -> list:
    replies = Replies()
    rt.submit(frames, replies.callback("r"))
    replies.wait(1)
    return replies.frames[0][1]
