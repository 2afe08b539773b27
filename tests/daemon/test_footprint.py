"""A daemon's memory footprint: optimizers never import torch._dynamo, and a serving daemon
holds little beyond what its imports (torch, libp2p) hold by themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import DaemonFactory, cli_env
from volunteer.client.remote_expert import RemoteExpert
from volunteer.daemon.control_client import call
from volunteer.daemon.footprint import measure

# Steps every optimizer a backend can build, then prints whether dynamo got imported and the
# resulting weights (compared bitwise with a run where torch is left as it is).
OPTIMIZER_RUN = """
import json, sys, torch
from torch import nn
if sys.argv[1] == "patched":
    from volunteer.daemon.footprint import keep_dynamo_unloaded
    assert keep_dynamo_unloaded() > 0
torch.manual_seed(0)
out = []
for name in ("adam", "adam_fused", "sgd"):
    m = nn.Linear(8, 4)
    opt = {"adam": lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.01),
           "adam_fused": lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
           "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)}[name](m.parameters())
    for _ in range(3):
        m(torch.randn(5, 8)).pow(2).mean().backward()
        nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        assert torch.is_grad_enabled()
        opt.zero_grad(set_to_none=True)
    opt.load_state_dict(opt.state_dict())
    out.append([p.detach().flatten().tolist() for p in m.parameters()])
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "weights": out}))
"""


def run_optimizers(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", OPTIMIZER_RUN, mode], capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.timeout(300)
def test_optimizers_step_the_same_without_importing_dynamo() -> None:
    patched, plain = run_optimizers("patched"), run_optimizers("plain")
    assert patched["dynamo"] is False
    assert plain["dynamo"] is True  # else this test no longer shows anything: torch changed
    assert patched["weights"] == plain["weights"]


@pytest.mark.timeout(120)
def test_selfbench_does_not_import_sympy() -> None:
    code = ("import sys\nfrom volunteer.experts.selfbench import measure\n"
            "measure('ffn', 16, {}, 'cpu', 8, budget_s=0.02)\nprint('sympy' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "False"


def private_dirty_mib(pid: int) -> float:
    """Memory only this process wrote (heap, anonymous maps): what another copy would add."""
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no Private_Dirty in smaps_rollup")


REFERENCE = "import sys, torch, libp2p, zmq, trio; print('ready', flush=True); sys.stdin.read()"


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux smaps_rollup")
def test_serving_daemon_holds_little_beyond_its_imports(tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    # self-benchmark on, as a user runs it: its backward used to import sympy (~40 MiB)
    daemon = volunteer_daemon.start(tmp_path / "home", "--num-experts", "2",
                                    env=cli_env(network=True, VOLUNTEER_SELFBENCH="true"))
    uid = sorted(call(daemon.home, "status", wait_s=10.0)["experts"])[0]
    expert = RemoteExpert(uid, daemon.endpoint, timeout=30)
    try:
        for _ in range(3):  # optimizer steps: what used to import torch._dynamo (~70 MiB)
            expert(torch.randn(4, 64, requires_grad=True)).pow(2).mean().backward()
    finally:
        expert.transport.close()
    assert call(daemon.home, "status", wait_s=10.0)["experts"][uid]["updates_applied"] == 3
    ref = subprocess.Popen([sys.executable, "-c", REFERENCE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    try:
        assert ref.stdout is not None and ref.stdout.readline().strip() == "ready"
        extra = private_dirty_mib(daemon.proc.pid) - private_dirty_mib(ref.pid)
        mem = measure(daemon.proc.pid)
    finally:
        ref.kill()
        ref.wait(30)
    # measured: ~15 MiB beyond the imports (the runtime, CLI libraries, network state); ~85
    # when the first optimizer step imported torch._dynamo and sympy, ~55 when only the
    # self-benchmark's backward imported sympy
    assert extra < 50, (extra, mem)
    assert mem["uss_mib"] > 0 and mem["rss_mib"] >= mem["uss_mib"] and mem["threads"] >= 2
