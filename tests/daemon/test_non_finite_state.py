"""Non-finite weights are never written: not to a checkpoint (the last good one stays), not
into a shard handed to others; a downloaded shard holding them is not loaded."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import torch

from volunteer.daemon.checkpointer import Checkpointer
from volunteer.daemon.handouts import Handouts
from volunteer.experts.backend import ExpertBackend
from volunteer.experts.checkpoint import CheckpointStore, load_checkpoint, non_finite_tensor
from volunteer.experts.shard_cache import ShardCache


def test_non_finite_tensor_names_the_first_bad_tensor() -> None:
    state = {"module": {"w": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, "step": torch.tensor(2),
             "groups": [{"lr": 0.1}], "ints": torch.tensor([1, 2])}
    assert non_finite_tensor(state) == "state.module.b"
    state["module"]["b"] = torch.zeros(2)
    assert non_finite_tensor(state) is None
    assert non_finite_tensor([torch.ones(1), (torch.tensor([float("inf")]),)]) == "state.1.0"


def poison(backend: ExpertBackend) -> None:
    with torch.no_grad():
        next(backend.module.parameters())[0].fill_(float("nan"))
    backend.updates_applied += 1


def test_checkpoint_keeps_the_last_good_file(tmp_path: Path) -> None:
    backend = ExpertBackend("g.0", "ffn", 16)
    store = CheckpointStore(tmp_path, "fp")
    ck = Checkpointer(store, {"g.0": backend})
    assert ck.checkpoint().written == ["g.0"]
    good = load_checkpoint(store.path("g.0"), "g.0", "fp")
    poison(backend)
    report = ck.checkpoint()
    assert not report.written and "non-finite values in state.module." in report.failed["g.0"]
    kept = load_checkpoint(store.path("g.0"), "g.0", "fp")
    assert kept["updates_applied"] == good["updates_applied"] == 0 and non_finite_tensor(kept) is None
    assert "kept the last good checkpoint" in (ck.last_error or "")


def test_a_poisoned_expert_keeps_handing_out_its_last_good_shard(tmp_path: Path) -> None:
    backend = ExpertBackend("g.0", "ffn", 16)
    handouts = Handouts(ShardCache(tmp_path, 1 << 30), "fp", 1 << 16)

    runtime = SimpleNamespace(backends={"g.0": backend}, exclusive=contextlib.nullcontext)  # what take() uses
    assert handouts.take(runtime) == ["g.0"]
    first = handouts.current["g.0"]
    poison(backend)
    assert handouts.take(runtime) == []  # nothing new to announce
    assert handouts.current["g.0"] == first  # the NaN state was not encoded nor announced
    assert handouts.cache.roots() == [first[1]]


def test_a_downloaded_shard_with_non_finite_weights_is_not_loaded(tmp_path: Path) -> None:
    import pytest

    from volunteer.daemon.hardware import HardwareInfo
    from volunteer.daemon.shards import ShardManager
    from volunteer.experts.shard import encode_shard
    from volunteer.manifest import load_manifest

    m = load_manifest("demo")
    poisoned = ExpertBackend("demo.ffn.0.0", "ffn", 64)
    poison(poisoned)
    header, body = encode_shard("demo.ffn.0.0", m.fingerprint(), poisoned.state_dict())

    def download(uid, fingerprint, root, sources, cache, progress, timeout):
        cache.put_complete(header, body)  # the holder's bytes hash to the root it announced
        return header

    sup = SimpleNamespace(
        manifest=m, device="cpu", devices=["cpu"], hardware=HardwareInfo("cpu", 2, 1, 8 << 30, "linux", "3.11", "2.13", None, []),
        settings=SimpleNamespace(num_experts=4, shard_cache_bytes=1 << 30, max_gpu_memory_fraction=0.9),
        home=SimpleNamespace(cache_dir=tmp_path), network=SimpleNamespace(shards=SimpleNamespace(download=download)))
    manager = ShardManager(sup, lambda uid, seeded: ExpertBackend(uid, "ffn", 64))
    with pytest.raises(RuntimeError, match=r"non-finite values in state\.module"):
        manager._download("demo.ffn.0.0", header.root, ())
    assert not manager.cache.has_complete(header.root)  # not kept, not served to others
