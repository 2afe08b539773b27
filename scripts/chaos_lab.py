"""Where the chaos bench runs its processes: one network namespace per host on a bridge.

``SwitchLab`` builds a hub namespace holding a bridge and, per host, a namespace with one
veth (``eth0``, ``10.79.0.<10+i>/24``) plugged into that bridge. Every process of the
bench (volunteers and trainers) runs in its own host namespace, so all their traffic
crosses a real link whose loss can be changed while they run:

- ``set_loss(host, pct)`` drops ``pct`` % of the packets in both directions of the host's
  link: ``tc netem loss`` on both ends of its veth when the kernel has ``sch_netem``, else
  ``iptables -m statistic --mode random`` DROP rules on arrival: in the host's INPUT for
  what it receives, and in every other host's INPUT for what it sent (the same random loss
  in flight, done by netfilter instead of the qdisc; dropping in the sender's OUTPUT would
  not do: the sender's kernel would see the drop as a local send error); ``loss_method``
  says which;
- ``clear_loss(host)`` restores the clean link.

``LoopbackLab`` is the fallback where namespaces cannot be built (not root, no ``ip``):
every host is ``127.0.0.1`` in this namespace and ``set_loss`` is unavailable
(``loss_unavailable`` says why; the bench prints it).

Names are ``vc<pid>x<n>-...``; ``close()`` kills what runs inside and deletes the
namespaces (their veths and rules go with them); a lab whose owner died is reaped by the
next one (``reap_stale``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NET = "10.79.0"
HOST_BASE = 10
_TAG = re.compile(r"^vc(\d+)x\d+-")


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Host:
    """One place to run processes: a namespace (``ns``) with address ``ip``, or loopback."""

    name: str
    ip: str
    ns: str | None = None
    veth_peer: str | None = None  # the hub-side end of the host's veth


def netns_unavailable() -> str | None:
    """Why namespaces cannot be built here (None: they can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip) for network namespaces"
    return None


def reap_stale() -> None:
    """Delete namespaces of chaos labs whose owning process is gone."""
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _TAG.match(name)
        if not m or Path(f"/proc/{m.group(1)}").exists():
            continue
        for pid in _run(["ip", "netns", "pids", name], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "del", name], check=False)


class LoopbackLab:
    """Every host is 127.0.0.1 here; no link to put loss on."""

    kind = "loopback"

    def __init__(self, n_hosts: int, why: str) -> None:
        self.hosts = [Host(name=f"h{i}", ip="127.0.0.1") for i in range(n_hosts)]
        self.loss_method: str | None = None
        self.loss_unavailable: str | None = why

    def __enter__(self) -> LoopbackLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def set_loss(self, host: Host, pct: float) -> None:
        raise RuntimeError(f"no packet loss in a loopback lab: {self.loss_unavailable}")

    def clear_loss(self, host: Host) -> None:
        return None

    def close(self) -> None:
        return None


class SwitchLab:
    """Hosts in their own namespaces on one bridge (see module docstring)."""

    kind = "netns"

    def __init__(self, n_hosts: int) -> None:
        if not 1 <= n_hosts <= 200:
            raise ValueError("1..200 hosts")
        self.tag = f"vc{os.getpid()}x{int(time.time() * 1000) % 100000}"
        self.hub = f"{self.tag}-hub"
        self.hosts = [Host(name=f"h{i}", ip=f"{NET}.{HOST_BASE + i}", ns=f"{self.tag}-h{i}",
                           veth_peer=f"p{i}") for i in range(n_hosts)]
        self._made: list[str] = []
        self.loss_method: str | None = None
        self.loss_unavailable: str | None = None
        self._iptables: str | None = None
        self._lossy: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def __enter__(self) -> SwitchLab:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._made.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def build(self) -> None:
        reap_stale()
        self._add_ns(self.hub)
        _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for h in self.hosts:
            assert h.ns is not None and h.veth_peer is not None
            self._add_ns(h.ns)
            _run(["ip", "-n", h.ns, "link", "add", "name", "eth0", "type", "veth", "peer", "name",
                  h.veth_peer, "netns", self.hub])
            _run(["ip", "-n", self.hub, "link", "set", h.veth_peer, "master", "br0"])
            _run(["ip", "-n", self.hub, "link", "set", h.veth_peer, "up"])
            _run(["ip", "-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0"])
            _run(["ip", "-n", h.ns, "link", "set", "eth0", "up"])
        self.loss_method, self.loss_unavailable = self._probe_loss(self.hosts[0])

    def _probe_loss(self, host: Host) -> tuple[str | None, str | None]:
        """netem if the kernel has it, else iptables' random-drop match, else neither."""
        assert host.ns is not None
        tc = _run(["ip", "netns", "exec", host.ns, "tc", "qdisc", "add", "dev", "eth0", "root",
                   "netem", "loss", "1%"], check=False)
        if tc.returncode == 0:
            _run(["ip", "netns", "exec", host.ns, "tc", "qdisc", "del", "dev", "eth0", "root"])
            return "netem", None
        why = f"tc netem: {tc.stderr.strip() or 'failed'}"
        for cand in ("iptables", "iptables-legacy", "iptables-nft"):
            if shutil.which(cand) is None:
                continue
            rule = ["-A", "INPUT", "-i", "eth0", "-m", "comment", "--comment", "probe", "-m", "statistic",
                    "--mode", "random", "--probability", "0.01", "-j", "DROP"]
            probe = _run(["ip", "netns", "exec", host.ns, cand, *rule], check=False)
            if probe.returncode == 0:
                _run(["ip", "netns", "exec", host.ns, cand, "-D", *rule[1:]])
                self._iptables = cand
                return f"iptables statistic random drop ({why})", None
        return None, f"{why}; no iptables with the statistic match"

    def argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the host's namespace (``ip netns exec`` execs it: same pid)."""
        assert host.ns is not None
        return ["ip", "netns", "exec", host.ns, *argv]

    def _loss_rules(self, host: Host, pct: float) -> list[tuple[str, list[str]]]:
        """(namespace, INPUT rule) pairs that drop ``pct`` % of the host's packets on arrival."""
        p = f"{pct / 100:.4f}"
        tail = ["-m", "comment", "--comment", f"loss-{host.name}", "-m", "statistic", "--mode", "random",
                "--probability", p, "-j", "DROP"]
        rules = [(host.ns, ["INPUT", "-i", "eth0", *tail])]
        rules += [(h.ns, ["INPUT", "-i", "eth0", "-s", host.ip, *tail]) for h in self.hosts if h is not host]
        return [(ns, rule) for ns, rule in rules if ns is not None]

    def set_loss(self, host: Host, pct: float) -> None:
        """Drop ``pct`` % of the packets each way on the host's link."""
        if self.loss_method is None:
            raise RuntimeError(f"no packet loss here: {self.loss_unavailable}")
        assert host.ns is not None and host.veth_peer is not None
        self.clear_loss(host)
        if self.loss_method == "netem":
            for ns, dev in ((host.ns, "eth0"), (self.hub, host.veth_peer)):
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                      "netem", "loss", f"{pct}%"])
        else:
            assert self._iptables is not None
            for ns, rule in self._loss_rules(host, pct):
                _run(["ip", "netns", "exec", ns, self._iptables, "-A", *rule])
        self._lossy[host.name] = pct

    def clear_loss(self, host: Host) -> None:
        pct = self._lossy.get(host.name)
        if pct is None:
            return
        assert host.ns is not None and host.veth_peer is not None
        if self.loss_method == "netem":
            for ns, dev in ((host.ns, "eth0"), (self.hub, host.veth_peer)):
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
        elif self._iptables is not None:
            self._dropped[host.name] = self.dropped_packets(host) or 0
            for ns, rule in self._loss_rules(host, pct):
                _run(["ip", "netns", "exec", ns, self._iptables, "-D", *rule], check=False)
        del self._lossy[host.name]

    def dropped_packets(self, host: Host) -> int | None:
        """Packets the loss rules dropped on this host's link so far, both ways, over every
        period of loss (iptables method only: netem keeps no count per rule)."""
        if self._iptables is None or host.ns is None:
            return None
        live = 0
        if host.name in self._lossy:
            tag = f"/* loss-{host.name} */"
            for h in self.hosts:
                out = _run(["ip", "netns", "exec", str(h.ns), self._iptables, "-L", "INPUT", "-v", "-x", "-n"],
                           check=False).stdout
                live += sum(int(line.split()[0]) for line in out.splitlines()
                            if tag in line and line.split()[0].isdigit())
        return self._dropped.get(host.name, 0) + live

    def close(self) -> None:
        for ns in reversed(self._made):
            for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run(["ip", "netns", "del", ns], check=False)
        self._made.clear()


def make_lab(n_hosts: int, want_netns: bool = True) -> SwitchLab | LoopbackLab:
    """A SwitchLab where namespaces work, else a LoopbackLab saying why not."""
    why = netns_unavailable() if want_netns else "namespaces not asked for (--loopback)"
    if why is None:
        return SwitchLab(n_hosts)
    return LoopbackLab(n_hosts, why)
