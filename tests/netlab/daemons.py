"""Real ``volunteer join`` daemons in the NAT lab: manifest, start, status, readiness.

``write_manifest(dir, bootstrap)`` writes a small experiment (``natlab``: ffn experts of a
2x2 grid under ``lab.ffn``, the lab's bootstrap/relay node as bootstrap and relay, libp2p
port 4001); ``spawn_daemon`` starts ``python -m volunteer join <manifest> --home <dir>``
inside a lab host's namespace (libp2p listening on the host's LAN address, CPU, no
self-benchmark, a short leave deadline so teardown is quick). ``status(home)`` runs
``volunteer status --json`` (the control socket lives in the home on the shared
filesystem, so it works from outside the namespace); ``wait_joined`` polls it until the
daemon's network knows its reachability and has announced its experts.
Used by test_daemons_through_nat.py and scripts/bench_netlab.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.netlab.lab import LabHost, LabProcess, NatLab

GRID_UIDS = ["lab.ffn.0.0", "lab.ffn.0.1", "lab.ffn.1.0", "lab.ffn.1.1"]
POLL_S = 0.3
MANIFEST = """\
experiment: {{name: natlab, version: "1", description: NAT lab daemons}}
expert: {{kind: ffn, hidden_dim: 16}}
grid: {{prefix: lab.ffn, dims: [2, 2]}}
optimizer: {{name: adam, lr: 0.001}}
network:
  bootstrap: ["{addr}"]
  relays: ["{addr}"]
  listen_port: 4001
  public: auto
"""


def write_manifest(directory: str | Path, bootstrap: str) -> Path:
    path = Path(directory) / "natlab.yaml"
    path.write_text(MANIFEST.format(addr=bootstrap))
    return path


def spawn_daemon(lab: NatLab, host: LabHost, manifest: Path, home: str, name: str,
                 num_experts: int = len(GRID_UIDS)) -> LabProcess:
    return lab.spawn_python(
        host, "volunteer", "join", str(manifest), "--home", home,
        "--num-experts", str(num_experts), "--listen-host", host.ip, "--device", "cpu",
        "--set", "selfbench=false", "--set", "leave_timeout_s=5", name=name)


def status(home: str) -> dict:
    """``volunteer status --json`` of the daemon in ``home`` ({} while it is not up)."""
    proc = subprocess.run([sys.executable, "-m", "volunteer", "status", "--json", "--home", home],
                          capture_output=True, text=True, timeout=30)
    try:
        out = json.loads(proc.stdout) if proc.returncode == 0 else {}
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def joined(snap: dict) -> bool:
    net = snap.get("network") or {}
    return net.get("reachability") in ("public", "private") and bool(net.get("records_announced"))


def wait_joined(procs: dict[str, LabProcess], homes: dict[str, str], timeout: float
                ) -> dict[str, tuple[float, dict]]:
    """Poll every daemon's status until each has joined: name -> (seconds waited, status).

    Raises AssertionError (with the daemon's stderr tail) when one exits or times out.
    """
    start = time.monotonic()
    deadline = start + timeout
    out: dict[str, tuple[float, dict]] = {}
    last: dict[str, dict] = {}
    while len(out) < len(procs):
        for name, proc in procs.items():
            if name in out:
                continue
            if proc.popen.poll() is not None:
                tail = "\n".join(proc.stderr_tail[-25:])
                raise AssertionError(f"{name} exited ({proc.popen.returncode}):\n{tail}")
            last[name] = status(homes[name])
            if joined(last[name]):
                out[name] = (round(time.monotonic() - start, 3), last[name])
        if len(out) < len(procs):
            if time.monotonic() > deadline:
                waiting = [n for n in procs if n not in out]
                tails = {n: "\n".join(procs[n].stderr_tail[-25:]) for n in waiting}
                raise AssertionError(f"not joined within {timeout}s: "
                                     f"{ {n: last[n].get('network') for n in waiting} }\n{tails}")
            time.sleep(POLL_S)  # poll interval of a condition with a deadline
    return out
