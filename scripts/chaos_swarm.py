"""Real ``volunteer join`` daemons for the chaos bench: start, kill -9, stop, resume, inspect.

Each ``Volunteer`` is one daemon process with its own home, run in one lab host (its own
network namespace, or loopback). ``start()`` launches ``python -m volunteer join`` exactly as
a user would (CPU, no self-benchmark, short checkpoint interval and leave deadline);
``kill9()``, ``sigstop()`` and ``sigcont()`` are the faults; ``start()`` again after a kill
restarts it in the same home, so it resumes from its own checkpoints and shards with the
same identity and, in a namespace lab, the same addresses.

``status()`` reads the daemon's status over its control socket (a Unix socket in the home,
reachable from any namespace) and never waits long, so a stopped daemon costs at most
``wait_s``. ``scan_checkpoints()`` loads every checkpoint a home holds (``torch.load`` with
``weights_only``) and names any tensor holding NaN or infinity.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chaos_lab import Host

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "chaos"
LIBP2P_PORT = 4001
ZMQ_PORT = 5555


def write_manifest(path: Path, dims: list[int], hidden: int, replication: int, netns: bool,
                   public: str) -> Path:
    """A small ffn experiment; in a namespace lab every node uses the same fixed ports."""
    port = LIBP2P_PORT if netns else 0
    path.write_text(f"""
experiment: {{name: {EXPERIMENT}, version: "1", seed: 3}}
expert: {{kind: ffn, hidden_dim: {hidden}}}
grid: {{prefix: {EXPERIMENT}.ffn, dims: {dims}}}
optimizer: {{name: adam, lr: 0.001}}
serving: {{max_batch_size: 1024}}
network: {{listen_port: {port}, public: "{public}"}}
shards: {{replication: {replication}, rebalance_interval_s: 20, snapshot_interval_s: 5}}
""")
    return path


def daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")}
    env.update({"NO_COLOR": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def serving_uids(snap: dict[str, Any] | None) -> set[str]:
    """Uids the node serves (shard state ``serving``), or its experts without shards."""
    if not snap or snap.get("state") != "serving":
        return set()
    shards = snap.get("shards")
    if isinstance(shards, dict):
        return {u for u, h in (shards.get("hosted") or {}).items() if h.get("state") == "serving"}
    return set(snap.get("experts") or {})


class Volunteer:
    """One daemon (see module docstring)."""

    def __init__(self, name: str, host: Host, home: Path, manifest: Path,
                 argv_in_host: Callable[[Host, list[str]], list[str]], num_experts: int,
                 zmq_port: int) -> None:
        self.name, self.host, self.home, self.manifest = name, host, home, manifest
        self._argv_in_host = argv_in_host
        self.num_experts = num_experts
        self.zmq_port = zmq_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self.starts = 0
        self.addr: str | None = None  # libp2p multiaddr once known
        self.peer_id: str | None = None
        self.endpoint: str | None = None
        self.log_path = home.with_suffix(".log")
        self._term_sent_to: int | None = None

    def start(self, bootstrap: list[str], new_swarm: bool = False) -> None:
        """Launch (or relaunch in the same home) the daemon; does not wait."""
        argv = [sys.executable, "-m", "volunteer", "join", str(self.manifest), "--home", str(self.home),
                "--device", "cpu", "--num-experts", str(self.num_experts), "--listen-host", self.host.ip,
                "--host", self.host.ip, "--port", str(self.zmq_port), "--set", "selfbench=false",
                "--set", "checkpoint_interval_s=2", "--set", "leave_timeout_s=5",
                "--set", "torch_threads=1"]
        argv += ["--new-swarm"] if new_swarm else [a for b in bootstrap for a in ("--bootstrap", b)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(self._argv_in_host(self.host, argv), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=daemon_env(), cwd=str(ROOT))
        finally:
            log.close()
        self.stopped = False
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self, wait_s: float = 3.0) -> dict[str, Any] | None:
        """The status snapshot, or None (not up, stopped, or not answering in ``wait_s``)."""
        from volunteer.daemon.control_client import call

        if not self.alive() or self.stopped:
            return None
        try:
            info = json.loads((self.home / "control.json").read_text())
            if info.get("pid") != self.proc.pid:  # type: ignore[union-attr]
                return None  # the file of the killed predecessor
            snap = call(self.home, "status", wait_s=wait_s)
        except Exception:
            return None
        if isinstance(snap, dict):
            addrs = (snap.get("network") or {}).get("addrs") or []
            self.peer_id = (snap.get("network") or {}).get("peer_id") or self.peer_id
            self.endpoint = snap.get("endpoint") or self.endpoint
            self.addr = next((a for a in addrs if f"/ip4/{self.host.ip}/" in a), addrs[0] if addrs else None)
            return snap
        return None

    def wait_serving(self, timeout: float, want: int = 1) -> dict[str, Any]:
        """Poll until the daemon serves at least ``want`` uids; raise on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc and self.proc.returncode}); "
                                   f"log {self.log_path}: {tail(self.log_path)}")
            snap = self.status()
            if snap is not None and len(serving_uids(snap)) >= want:
                return snap
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not serving within {timeout:.0f}s: {tail(self.log_path)}")
            time.sleep(0.5)

    def _signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)  # type: ignore[union-attr]

    def kill9(self) -> None:
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)
        self.stopped = False

    def sigstop(self) -> None:
        self._signal(signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        self._signal(signal.SIGCONT)
        self.stopped = False

    def leave(self) -> None:
        """Send SIGTERM once (a graceful leave: it checkpoints and hands off; a second
        SIGTERM would force it, so it is never sent twice to one process)."""
        if self.alive() and self._term_sent_to != self.proc.pid:  # type: ignore[union-attr]
            self.sigcont()
            self._signal(signal.SIGTERM)
            self._term_sent_to = self.proc.pid  # type: ignore[union-attr]

    def terminate(self, timeout: float = 30.0) -> int | None:
        """Graceful leave, SIGKILL if still running after ``timeout``; the exit status."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.leave()
        try:
            return self.proc.wait(timeout)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.kill9()
            return None


def tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def scan_checkpoints(home: Path) -> dict[str, Any]:
    """Every checkpoint in ``home``: how many loaded, and which hold non-finite tensors."""
    import torch

    from volunteer.experts.checkpoint import non_finite_tensor

    out: dict[str, Any] = {"files": 0, "unreadable": {}, "non_finite": {}}
    for path in sorted((home / "checkpoints").glob("*/*.pt")):
        out["files"] += 1
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or foreign file is a finding, not a crash
            out["unreadable"][path.name] = f"{type(e).__name__}: {e}"[:200]
            continue
        where = non_finite_tensor(blob.get("state") if isinstance(blob, dict) else blob)
        if where is not None:
            out["non_finite"][path.name] = where
    return out
