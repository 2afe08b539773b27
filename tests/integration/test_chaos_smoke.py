"""The chaos bench's instruments, checked against real faults before they are trusted.

``scripts/bench_chaos.py --preset smoke`` runs in CI (scripts/test.sh) and passes only when
no call outlives its deadline; these tests make sure that verdict can fail and that the
faults it claims to inject are real:

- the hang detector (``chaos_trainer.CallLog`` through ``TimedRemoteExpert``) flags a
  transport that ignores its timeout, and does not flag a real ZeroMQ call to a silent
  server that gives up at its deadline;
- ``chaos_lab.SwitchLab.set_loss`` really drops packets on a host's link, both ways, and
  ``clear_loss`` restores it (root only: network namespaces);
- the fault schedule never kills a second volunteer while one is still coming back, and
  leaves every volunteer running (SIGCONT) when it ends.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from chaos_faults import FaultScheduler  # noqa: E402
from chaos_lab import Host, LoopbackLab, SwitchLab, netns_unavailable  # noqa: E402
from chaos_trainer import CallLog, timed_expert_factory  # noqa: E402

from volunteer.client.zmq_transport import ZmqTransport  # noqa: E402
from volunteer.wire.errors import RemoteTimeoutError  # noqa: E402
from volunteer.wire.messages import decode_request, encode_result  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class IgnoresItsTimeout:
    """A transport that answers correctly, but ``overrun`` seconds after the caller's timeout."""

    def __init__(self, overrun: float) -> None:
        self.overrun = overrun
        self.done = threading.Event()

    def request(self, frames: list[Any], timeout: float) -> list[Any]:
        request = decode_request(frames)
        self.done.wait(timeout + self.overrun)  # nothing sets it: waits like a hung socket read
        return encode_result(request.request_id, [request.tensors[0] * 2])

    def close(self) -> None:
        return None


def test_a_call_past_its_deadline_is_flagged_and_a_timed_out_one_is_not() -> None:
    log = CallLog(slack=0.2)
    make = timed_expert_factory(log, timeout=0.3)
    late = make("chaos.ffn.0", IgnoresItsTimeout(overrun=0.6))
    out = late.call("forward", [torch.ones(2, 4)])
    assert torch.equal(out[0], torch.full((2, 4), 2.0))  # the answer came, but too late
    assert log.late == 1 and log.late_raw == 1 and log.outcomes["forward:ok"] == 1

    with socket.socket() as silent:  # accepts TCP, never speaks ZMTP: a frozen server
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        expert = make("chaos.ffn.1", ZmqTransport(f"tcp://127.0.0.1:{silent.getsockname()[1]}"))
        with pytest.raises(RemoteTimeoutError):
            expert.call("forward", [torch.ones(2, 4)])
        expert.close()
    assert log.outcomes["forward:timeout"] == 1
    assert log.late == 1 and log.late_raw == 1  # the real transport gave up at its deadline


UDP_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9999)); s.settimeout(2.0)
print("ready", flush=True); n = 0
try:
    while True:
        s.recv(64); n += 1
except OSError:
    print(n, flush=True)
"""
UDP_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[2])):
    s.sendto(b"x", (sys.argv[1], 9999)); time.sleep(0.001)
"""


def _udp_delivered(lab: SwitchLab, src: Host, dst: Host, count: int) -> int:
    server = subprocess.Popen(lab.argv(dst, [sys.executable, "-c", UDP_SERVER]), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        subprocess.run(lab.argv(src, [sys.executable, "-c", UDP_CLIENT, dst.ip, str(count)]), check=True, timeout=60)
        return int(server.stdout.readline())
    finally:
        server.kill()
        server.wait(10)


@pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))
def test_loss_on_a_link_drops_packets_both_ways_and_clears() -> None:
    with SwitchLab(2) as lab:
        if lab.loss_method is None:
            pytest.skip(f"no packet loss on this kernel: {lab.loss_unavailable}")
        a, b = lab.hosts
        assert _udp_delivered(lab, a, b, 300) == 300
        lab.set_loss(b, 50)
        into_b, out_of_b = _udp_delivered(lab, a, b, 300), _udp_delivered(lab, b, a, 300)
        assert 0 < into_b < 300 and 0 < out_of_b < 300
        dropped = lab.dropped_packets(b)
        assert dropped is None or dropped == 600 - into_b - out_of_b
        lab.clear_loss(b)
        assert _udp_delivered(lab, a, b, 300) == 300
    assert lab.tag not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


class FakeVolunteer:
    """Stands in for chaos_swarm.Volunteer: records signals; a restarted one never serves
    again until ``gone`` is set (then its watcher sees it exit)."""

    def __init__(self, name: str) -> None:
        self.name, self.host, self.addr = name, Host(name=name, ip="127.0.0.1"), f"/ip4/127.0.0.1/tcp/1/p2p/{name}"
        self.events: list[str] = []
        self.stopped = False
        self.gone = threading.Event()
        self.proc = None

    def status(self, wait_s: float = 3.0) -> dict[str, Any] | None:
        return None if (self.events and self.events[-1] == "start") or self.stopped else {"experts": {}}

    def alive(self) -> bool:
        return not self.gone.is_set()

    def kill9(self) -> None:
        self.events.append("kill9")

    def start(self, bootstrap: list[str], new_swarm: bool = False) -> None:
        assert self.addr not in bootstrap  # restarted from the others, not from itself
        self.events.append("start")

    def sigstop(self) -> None:
        self.stopped = True
        self.events.append("stop")

    def sigcont(self) -> None:
        self.stopped = False
        self.events.append("cont")


def test_the_schedule_never_has_two_volunteers_coming_back_at_once() -> None:
    vols = [FakeVolunteer(f"v{i}") for i in range(4)]
    sched = FaultScheduler(LoopbackLab(4, "test"), vols, round_s=0.05, stop_s=0.01, loss_pct=20,  # type: ignore[arg-type]
                           restart_timeout=60)
    sched.run(0.15)  # three rounds; the first kill never comes back
    for v in vols:
        v.gone.set()
    sched.wait_restarts()
    assert sched.rounds == 3 and len(sched.restarts) == 1 and sched.kills_skipped == 2
    killed = vols[0]
    assert killed.events[:2] == ["kill9", "start"] and "stop" not in killed.events
    # one SIGSTOP per round, never on the one coming back: with the kill skipped, the
    # volunteer that would have been killed is frozen instead
    assert [s["volunteer"] for s in sched.stops] == ["v1", "v1", "v2"]
    assert all(not v.stopped for v in vols)  # every volunteer runs again at the end
    report = sched.report()
    assert report["kills"] == 1 and report["came_back"] == 0 and report["loss_periods"] == 0
