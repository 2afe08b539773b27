"""A NAT lab built from Linux network namespaces: real NATs on one machine.

Topology (all addresses exist only inside namespaces this lab creates)::

    "internet" namespace: bridge br0, 10.77.0.0/24 (no NAT, no host traffic leaves it)
      |-- public hosts          10.77.0.10, .11, ...       (relay / bootstrap nodes)
      |-- router i  (WAN side)  10.77.0.(20+i)             MASQUERADE on WAN, ip_forward=1
            |-- LAN i 192.168.(70+i).0/24, router at .1, private hosts .2, .3, ...

Every private host reaches the internet only through its own router, which rewrites the
source address (``iptables -t nat -A POSTROUTING -o wan -j MASQUERADE``). A connection
from outside reaches a private host only when the router's conntrack table already holds
a matching flow: a real NAT with endpoint-dependent filtering, as in home routers.

Names are unique per process (``vl<pid>x...``) so parallel runs do not collide. Teardown
(``close()``) kills every process started here and deletes every namespace (which deletes
their veths and iptables rules with them); it runs from ``__exit__``, from an ``atexit``
hook and from the pytest fixture finalizer, and is idempotent. A lab killed before it
could tear down (SIGKILL) is reaped by the next lab built (``reap_stale_labs``).

With ``$NATLAB_LOGS`` set to a directory, every program's stdout and stderr lines are kept
there, one file per program (``<lab tag>-<name>.log``), to read after a failure.

``NatLab.unavailable_reason()`` says why the lab cannot run here (not root, ``ip`` or
``iptables`` missing or not working in a namespace); tests skip with that reason.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PUBLIC_NET = "10.77.0"
ROUTER_WAN_BASE = 20
PUBLIC_HOST_BASE = 10
REPO_ROOT = Path(__file__).resolve().parents[2]

_IPTABLES_CANDIDATES = ("iptables", "iptables-legacy", "iptables-nft")


def _run(argv: Sequence[str], check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def detect_iptables() -> str | None:
    """The first iptables binary whose nat table works inside a fresh namespace, or None."""
    if shutil.which("ip") is None:
        return None
    ns = f"vl{os.getpid()}probe"
    try:
        if _run(["ip", "netns", "add", ns], check=False).returncode != 0:
            return None
        for cand in _IPTABLES_CANDIDATES:
            if shutil.which(cand) is None:
                continue
            probe = _run(["ip", "netns", "exec", ns, cand, "-t", "nat", "-L", "-n"], check=False)
            if probe.returncode == 0:
                return cand
        return None
    finally:
        _run(["ip", "netns", "del", ns], check=False)


def unavailable_reason() -> str | None:
    """Why the lab cannot be built on this machine, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces, iptables)"
    if shutil.which("ip") is None:
        return "the NAT lab needs iproute2 (`ip`): apt-get install iproute2"
    if not any(shutil.which(c) for c in _IPTABLES_CANDIDATES):
        return "the NAT lab needs iptables: apt-get install iptables"
    if detect_iptables() is None:
        return "no iptables binary can use the nat table inside a network namespace here"
    return None


_TAG = re.compile(r"^vl(\d+)x\d+-")
_LAB_NUMBERS = itertools.count(int(time.time()) % 100000)


def reap_stale_labs() -> list[str]:
    """Delete namespaces left by labs whose owning process died without teardown (e.g. a
    test run killed with SIGKILL). Only names of this harness's pattern whose pid is gone."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    reaped = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _TAG.match(name)
        if not m or Path(f"/proc/{m.group(1)}").exists():
            continue
        for pid in _run(["ip", "netns", "pids", name], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        if _run(["ip", "netns", "del", name], check=False).returncode == 0:
            reaped.append(name)
    return reaped


@dataclass
class LabHost:
    """A namespace with one address: a public host or a private host behind a router."""

    name: str
    ns: str
    ip: str
    lan: int | None = None  # index of the router it sits behind (None: public)


@dataclass
class LabRouter:
    """A NAT router namespace: WAN address on the internet bridge, LAN gateway address."""

    index: int
    ns: str
    wan_ip: str
    lan_ip: str
    hosts: list[LabHost] = field(default_factory=list)


class LabProcess:
    """A process running inside a namespace whose stdout lines are parsed as JSON events."""

    def __init__(self, name: str, popen: subprocess.Popen, log_path: Path | None = None) -> None:
        self.name = name
        self.popen = popen
        self._log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115
        self.events: queue.Queue[dict] = queue.Queue()
        self.history: list[dict] = []
        self.stderr_tail: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump_stdout(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._keep("out", line)
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.events.put(event)

    def _pump_stderr(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self._keep("err", line)
            self.stderr_tail.append(line.rstrip())
            del self.stderr_tail[:-400]

    def _keep(self, stream: str, line: str) -> None:
        """Append one output line to the process's log file ($NATLAB_LOGS), if any."""
        log = self._log
        if log is not None:
            with contextlib.suppress(Exception):
                log.write(f"{time.strftime('%H:%M:%S')} {stream} {line.rstrip()}\n")

    def wait_for(
        self, event: str, timeout: float, where: Callable[[dict], bool] | None = None
    ) -> dict:
        """Block until the process prints ``{"event": event, ...}`` (matching ``where``).

        Raises TimeoutError (with the process's stderr tail) after ``timeout`` seconds or
        when the process exits first. Errors the process reports (``"event": "error"`` or
        ``"failed"``) are raised at once as RuntimeError.
        """
        deadline = time.monotonic() + timeout
        while True:
            for seen in self.history:
                if seen.get("event") == event and (where is None or where(seen)):
                    self.history.remove(seen)
                    return seen
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(self._why(f"no {event!r} event within {timeout:.0f}s"))
            try:
                got = self.events.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if self.popen.poll() is not None:
                    # Exited: its last lines may still be in the pipe; read them all first.
                    self._threads[0].join(timeout=5.0)
                    if self.events.empty():
                        raise TimeoutError(self._why(
                            f"exited ({self.popen.returncode}) before {event!r}")) from None
                continue
            if got.get("event") in ("error", "failed") and event != got.get("event"):
                raise RuntimeError(self._why(f"reported error: {got}"))
            self.history.append(got)

    def send(self, command: dict) -> None:
        """Write one JSON command line to the process's stdin."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(command) + "\n")
        self.popen.stdin.flush()

    def _why(self, what: str) -> str:
        tail = "\n".join(self.stderr_tail[-25:])
        return f"{self.name}: {what}\n--- stderr tail ---\n{tail}"

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=timeout)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr, self._log):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()


class NatLab:
    """Builds the topology in the module docstring; use as a context manager.

    ``netem`` (e.g. ``"delay 20ms"``) is applied to every router's WAN interface.
    """

    def __init__(self, n_lans: int = 3, hosts_per_lan: int = 1, n_public: int = 1,
                 netem: str | None = None) -> None:
        if not 1 <= n_lans <= 20 or not 1 <= hosts_per_lan <= 50 or not 0 <= n_public <= 9:
            raise ValueError("lab size out of range")
        self.tag = f"vl{os.getpid()}x{next(_LAB_NUMBERS)}"  # unique among this process's labs
        self.n_lans, self.hosts_per_lan, self.n_public = n_lans, hosts_per_lan, n_public
        self.netem = netem
        self.iptables = ""
        self.inet_ns = f"{self.tag}-inet"
        self.public: list[LabHost] = []
        self.routers: list[LabRouter] = []
        self._namespaces: list[str] = []
        self._processes: list[LabProcess] = []
        self._closed = False
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- building
    def __enter__(self) -> NatLab:
        atexit.register(self.close)
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ns(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def _sh(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", ns, *argv], check=check)

    def build(self) -> None:
        iptables = detect_iptables()
        if iptables is None:
            raise RuntimeError(unavailable_reason() or "iptables does not work here")
        self.iptables = iptables
        reap_stale_labs()
        inet = self._ns("inet")
        _run(["ip", "-n", inet, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", inet, "link", "set", "br0", "up"])
        port = 0

        def uplink(ns: str, ifname: str, cidr: str) -> None:
            nonlocal port
            port += 1
            peer = f"p{port}"
            _run(["ip", "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", peer,
                  "netns", inet])
            _run(["ip", "-n", inet, "link", "set", peer, "master", "br0"])
            _run(["ip", "-n", inet, "link", "set", peer, "up"])
            _run(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname])
            _run(["ip", "-n", ns, "link", "set", ifname, "up"])

        for k in range(self.n_public):
            ip = f"{PUBLIC_NET}.{PUBLIC_HOST_BASE + k}"
            ns = self._ns(f"pub{k}")
            uplink(ns, "eth0", f"{ip}/24")
            self.public.append(LabHost(name=f"pub{k}", ns=ns, ip=ip))

        for i in range(self.n_lans):
            wan_ip = f"{PUBLIC_NET}.{ROUTER_WAN_BASE + i}"
            lan_net = f"192.168.{70 + i}"
            rns = self._ns(f"r{i}")
            uplink(rns, "wan", f"{wan_ip}/24")
            router = LabRouter(index=i, ns=rns, wan_ip=wan_ip, lan_ip=f"{lan_net}.1")
            _run(["ip", "-n", rns, "link", "add", "lan", "type", "bridge"])
            _run(["ip", "-n", rns, "addr", "add", f"{router.lan_ip}/24", "dev", "lan"])
            _run(["ip", "-n", rns, "link", "set", "lan", "up"])
            self._sh(rns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self._sh(rns, iptables, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
            # The router itself runs no service: unsolicited inbound TCP to its WAN
            # address is dropped silently (no RST), like most home routers.
            self._sh(rns, iptables, "-A", "INPUT", "-i", "wan", "-p", "tcp", "-m", "conntrack",
                     "--ctstate", "NEW", "-j", "DROP")
            if self.netem:
                tc = self._sh(rns, "tc", "qdisc", "add", "dev", "wan", "root", "netem",
                              *self.netem.split(), check=False)
                if tc.returncode != 0:
                    raise RuntimeError(f"tc netem {self.netem!r} failed: {tc.stderr.strip()} "
                                       "(is the sch_netem kernel module available?)")
            for h in range(self.hosts_per_lan):
                hns = self._ns(f"h{i}x{h}")
                hip = f"{lan_net}.{2 + h}"
                _run(["ip", "-n", hns, "link", "add", "eth0", "type", "veth", "peer", "name",
                      f"l{h}", "netns", rns])
                _run(["ip", "-n", rns, "link", "set", f"l{h}", "master", "lan"])
                _run(["ip", "-n", rns, "link", "set", f"l{h}", "up"])
                _run(["ip", "-n", hns, "addr", "add", f"{hip}/24", "dev", "eth0"])
                _run(["ip", "-n", hns, "link", "set", "eth0", "up"])
                _run(["ip", "-n", hns, "route", "add", "default", "via", router.lan_ip])
                router.hosts.append(LabHost(name=f"h{i}x{h}", ns=hns, ip=hip, lan=i))
            self.routers.append(router)

    # ---------------------------------------------------------------- using
    def private(self, lan: int, index: int = 0) -> LabHost:
        return self.routers[lan].hosts[index]

    def block_between(self, lan: int, other_lan: int) -> None:
        """Make hole punching impossible between two LANs: router ``lan`` drops all TCP
        from/to the other router's public address (relayed traffic is unaffected)."""
        router, other = self.routers[lan], self.routers[other_lan]
        for chain, flag in (("FORWARD", "-s"), ("FORWARD", "-d"), ("INPUT", "-s")):
            self._sh(router.ns, self.iptables, "-I", chain, flag, other.wan_ip, "-p", "tcp",
                     "-j", "DROP")

    def conntrack(self, lan: int) -> str:
        """The router's conntrack table (``/proc/net/nf_conntrack`` inside its namespace)."""
        proc = self._sh(self.routers[lan].ns, "cat", "/proc/net/nf_conntrack", check=False)
        return proc.stdout

    def spawn(self, host: LabHost, argv: Sequence[str], name: str | None = None,
              env: dict[str, str] | None = None) -> LabProcess:
        """Start ``argv`` inside ``host``'s namespace (own process group, JSON stdout)."""
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p)
        if env:
            full_env.update(env)
        popen = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=str(REPO_ROOT), env=full_env, start_new_session=True,
        )
        logs = os.environ.get("NATLAB_LOGS")
        log_path = Path(logs) / f"{self.tag}-{name or host.name}.log" if logs else None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = LabProcess(name or host.name, popen, log_path)
        with self._lock:
            self._processes.append(proc)
        return proc

    def spawn_python(self, host: LabHost, module: str, *args: str, name: str | None = None) -> LabProcess:
        return self.spawn(host, [sys.executable, "-m", module, *args], name=name)

    # ---------------------------------------------------------------- teardown
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs, self._processes = self._processes, []
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop()
        for ns in reversed(self._namespaces):
            # Kill anything still running inside (e.g. a grandchild that left the group).
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run(["ip", "netns", "del", ns], check=False)
        self._namespaces.clear()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    def leftover_namespaces(self) -> list[str]:
        """Namespaces of this lab still present (for tests of the teardown itself)."""
        out = _run(["ip", "netns", "list"], check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(self.tag)]
