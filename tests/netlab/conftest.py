"""Fixtures for the NAT lab: a lab with a relay, a public peer and three NATed peers.

The ``swarm`` fixture (module scope) builds one lab and starts the nodes in parallel;
its finalizer tears the lab down (processes, namespaces) even when a test fails. A run
ended by SIGTERM (a CI timeout, a script's ``kill``) tears its labs down too: the signal
is turned into KeyboardInterrupt, so the finalizers and ``with NatLab()`` exits still run.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

import pytest

from tests.netlab.lab import LabHost, LabProcess, NatLab, unavailable_reason

NODE = "tests.netlab.node"
READY_TIMEOUT = 60.0


@dataclass
class Node:
    proc: LabProcess
    host: LabHost
    ready: dict

    @property
    def peer_id(self) -> str:
        return self.ready["peer_id"]

    def command(self, cmd: dict, reply: str, timeout: float = 60.0) -> dict:
        self.proc.send(cmd)
        return self.proc.wait_for(reply, timeout)


@dataclass
class Swarm:
    lab: NatLab
    relay: Node
    public: Node
    a: Node  # behind NAT 0
    b: Node  # behind NAT 1
    c: Node  # behind NAT 2 (the "trainer")

    @property
    def relay_addr(self) -> str:
        return self.relay.ready["addrs"][0]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _interrupt)


def skip_unless_lab() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


def start_node(lab: NatLab, host: LabHost, *args: str, name: str) -> LabProcess:
    return lab.spawn_python(host, NODE, "--ip", host.ip, *args, name=name)


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    skip_unless_lab()
    lab = NatLab(n_lans=3, n_public=2)
    with lab:
        relay_proc = start_node(lab, lab.public[0], "--allow-hop", "--assume-public", name="relay")
        relay = Node(relay_proc, lab.public[0], relay_proc.wait_for("ready", READY_TIMEOUT))
        raddr = relay.ready["addrs"][0]
        procs = {
            "public": start_node(lab, lab.public[1], "--relay", raddr, name="public"),
            "a": start_node(lab, lab.private(0), "--relay", raddr, name="a"),
            "b": start_node(lab, lab.private(1), "--relay", raddr, name="b"),
            "c": start_node(lab, lab.private(2), "--relay", raddr, name="c"),
        }
        hosts = {"public": lab.public[1], "a": lab.private(0), "b": lab.private(1),
                 "c": lab.private(2)}
        nodes = {k: Node(p, hosts[k], p.wait_for("ready", READY_TIMEOUT)) for k, p in procs.items()}
        yield Swarm(lab=lab, relay=relay, **nodes)
