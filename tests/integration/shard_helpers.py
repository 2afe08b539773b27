"""Helpers for the shard tests: small experiment manifests, status over the control socket,
and reading a node's shards and checkpoints from its home to compare weights bitwise."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.conftest import DaemonProc
from volunteer.daemon.control_client import call
from volunteer.experts.checkpoint import load_checkpoint
from volunteer.experts.shard import decode_shard, parse_header


def write_manifest(path: Path, name: str, dims: list[int], hidden: int = 64, replication: int = 2,
                   chunk_bytes: int = 65536, rebalance_s: float = 60.0, snapshot_s: float = 30.0) -> Path:
    """A manifest of a small ffn experiment (grid prefix ``<name>.ffn``)."""
    path.write_text(f"""
experiment: {{name: {name}, version: "1", seed: 7}}
expert: {{kind: ffn, hidden_dim: {hidden}}}
grid: {{prefix: {name}.ffn, dims: {dims}}}
optimizer: {{name: adam, lr: 0.001}}
serving: {{max_batch_size: 256, max_bytes: 268435456}}
shards: {{replication: {replication}, chunk_bytes: {chunk_bytes}, rebalance_interval_s: {rebalance_s},
          snapshot_interval_s: {snapshot_s}}}
""")
    return path


def status(daemon: DaemonProc) -> dict[str, Any]:
    """The daemon's status snapshot straight from its control socket (no CLI start-up)."""
    return call(daemon.home, "status", wait_s=10.0)


def poll(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Call ``condition`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def hosted(snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """uid -> shard status of the experts a node serves."""
    return {u: h for u, h in (snap.get("shards") or {}).get("hosted", {}).items() if h["state"] == "serving"}


def shard_dir(home: Path, experiment: str) -> Path:
    return home / "cache" / "shards" / experiment


def load_shard_state(home: Path, experiment: str, root_prefix: str, uid: str) -> dict[str, Any]:
    """Decode (and verify) the complete shard of ``uid`` whose root starts with ``root_prefix``."""
    matches = [d for d in shard_dir(home, experiment).iterdir() if d.name.startswith(root_prefix)]
    assert len(matches) == 1, (root_prefix, [d.name for d in shard_dir(home, experiment).iterdir()])
    raw = (matches[0] / "header").read_bytes()
    header = parse_header(raw, root=bytes.fromhex(matches[0].name), uid=uid)
    return decode_shard(header, (matches[0] / "body").read_bytes())


def load_checkpoint_state(home: Path, experiment: str, uid: str, fingerprint: str) -> dict[str, Any]:
    return load_checkpoint(home / "checkpoints" / experiment / f"{uid}.pt", uid, fingerprint)


def assert_states_equal(a: Any, b: Any, where: str = "state") -> None:
    """Bitwise equality of two state dicts (tensors compared with ``torch.equal``)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), where
        by_str = {str(k): v for k, v in b.items()}
        for k, v in a.items():
            assert_states_equal(v, by_str[str(k)], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_states_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
