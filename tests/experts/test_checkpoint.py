"""Checkpoints: atomic files, exact restore of weights + optimizer, fingerprint guard,
no code execution on load."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import pytest
import torch

from volunteer.daemon.checkpointer import Checkpointer
from volunteer.experts.backend import ExpertBackend, OptimizerSpec
from volunteer.experts.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointStore,
    clone_state,
    load_checkpoint,
)


def trained_backend(uid: str = "t.ffn.0.0", steps: int = 3) -> ExpertBackend:
    torch.manual_seed(0)
    backend = ExpertBackend(uid, "ffn", 8, OptimizerSpec(name="adam", lr=0.01))
    for _ in range(steps):
        graph = backend.forward_graph([torch.randn(4, 8)])
        _, grads = backend.gradients(graph, torch.ones(4, 8))
        backend.apply_gradients([grads])
    return backend


def test_round_trip_restores_weights_optimizer_and_counter(tmp_path: Path) -> None:
    src = trained_backend()
    store = CheckpointStore(tmp_path, "fp1")
    store.save(src.uid, clone_state(src.state_dict()))
    dst = ExpertBackend(src.uid, "ffn", 8, OptimizerSpec(name="adam", lr=0.01))
    state = store.load(src.uid)
    assert state is not None
    dst.load_state_dict(state)
    assert dst.updates_applied == 3
    for a, b in zip(src.module.state_dict().values(), dst.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert dst.optimizer.state_dict()["state"][0]["step"] == src.optimizer.state_dict()["state"][0]["step"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{src.uid}.pt"]  # no temp files left


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    backend = trained_backend(steps=1)
    store = CheckpointStore(tmp_path, "fp")
    store.save(backend.uid, clone_state(backend.state_dict()))
    before = store.path(backend.uid).read_bytes()
    with pytest.raises(TypeError, match="pickle"):  # a lock cannot be saved: torch.save fails
        store.save(backend.uid, {**backend.state_dict(), "bad": threading.Lock()})
    assert store.path(backend.uid).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{backend.uid}.pt"]


def test_clone_state_is_independent_of_later_updates() -> None:
    backend = trained_backend(steps=1)
    snap = clone_state(backend.state_dict())
    before = snap["module"]["fc1.weight"].clone()
    graph = backend.forward_graph([torch.randn(4, 8)])
    backend.apply_gradients([backend.gradients(graph, torch.ones(4, 8))[1]])
    assert torch.equal(snap["module"]["fc1.weight"], before)
    assert not torch.equal(backend.module.fc1.weight.detach(), before)


def test_fingerprint_mismatch_and_wrong_uid(tmp_path: Path) -> None:
    backend = trained_backend()
    CheckpointStore(tmp_path, "old").save(backend.uid, backend.state_dict())
    with pytest.raises(CheckpointMismatchError, match="fingerprint old, this experiment has new"):
        CheckpointStore(tmp_path, "new").load(backend.uid)
    os.replace(tmp_path / f"{backend.uid}.pt", tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="holds expert"):
        load_checkpoint(tmp_path / "other.pt", "other", "old")
    assert CheckpointStore(tmp_path, "old").load("absent") is None


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_and_malicious_files_are_rejected(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "fp")
    store.path("x").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        store.load("x")

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with store.path("y").open("wb") as fh:
        pickle.dump({"format": 1, "uid": "y", "fingerprint": "fp", "state": Evil()}, fh)
    with pytest.raises(CheckpointError):
        store.load("y")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError):
        store.path("../escape")


def test_checkpointer_restores_and_sets_aside_mismatches(tmp_path: Path) -> None:
    a, b = trained_backend("t.ffn.0.0", steps=2), trained_backend("t.ffn.0.1", steps=1)
    CheckpointStore(tmp_path, "fp").save(a.uid, a.state_dict())
    CheckpointStore(tmp_path, "other").save(b.uid, b.state_dict())
    fresh = {u: ExpertBackend(u, "ffn", 8, OptimizerSpec(lr=0.01)) for u in (a.uid, b.uid)}
    ck = Checkpointer(CheckpointStore(tmp_path, "fp"), fresh)
    ck.restore()
    assert ck.resumed == {a.uid: 2}
    assert fresh[b.uid].updates_applied == 0
    assert len(ck.set_aside) == 1 and "mismatch" in ck.set_aside[0] and Path(ck.set_aside[0]).exists()

    report = ck.checkpoint()
    assert report.ok and report.written == [b.uid] and report.unchanged == [a.uid]
    assert ck.checkpoint().written == []  # nothing changed since
    assert ck.checkpoint(force=True).written == [a.uid, b.uid]


def test_checkpointer_reports_write_failures(tmp_path: Path) -> None:
    backend = trained_backend()
    target = tmp_path / "ck"
    target.write_text("a file where the directory should be")
    ck = Checkpointer(CheckpointStore(target, "fp"), {backend.uid: backend})
    report = ck.checkpoint()
    assert not report.ok and backend.uid in report.failed
    assert ck.last_error and backend.uid in ck.last_error
