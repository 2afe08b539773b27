"""Shard transfer benchmark: how fast an expert's weights move between two volunteers.

Everything runs as a user meets it: ``volunteer join`` daemons at their default settings on
loopback, driven from the outside (CLI and the control socket), against the best a user
could get otherwise on the same machine in the same run: a plain libp2p stream (Noise +
yamux, the same host stack) pushing the same number of bytes between two processes.

Measured, for an ``ffn`` expert whose fresh shard is ``--mib`` MiB (hidden size chosen):

- ``libp2p_stream_mb_s``: the baseline, one stream, 1 MiB writes, process to process;
- ``download``: a newcomer joins a swarm where one volunteer holds the uid (replication 2,
  so it must download): MB/s of the shard download over the libp2p shard protocol, and
  ``join_to_serving_s`` from spawning ``volunteer join`` to its status serving the uid;
- ``handoff``: two volunteers each host one uid (replication 1); one leaves: seconds from
  ``volunteer leave`` to the other serving the adopted uid (``catch_up_s``), and whether the
  adopted root equals the leaver's final shard;
- ratios: ``download / stream`` (target >= 0.5) and the adoption time (target <= 10 s for
  64 MiB on loopback).

With ``--netlab`` the same download is also measured through real NATs (``shard_lab.py``).

Usage: ``python scripts/bench_shards.py --preset smoke|default|full [--json] [--netlab]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PRESETS = {
    "smoke": {"mib": 2, "trials": 1, "netlab_mib": 2},
    "default": {"mib": 64, "trials": 1, "netlab_mib": 16},
    "full": {"mib": 64, "trials": 3, "netlab_mib": 16},
}
BULK_PROTOCOL = "/volunteer/bench-bulk/1.0.0"


def hidden_for(mib: float) -> int:
    """ffn hidden size whose fresh state (weights, no optimizer state yet) is ~``mib`` MiB."""
    return max(8, int(math.sqrt(mib * 2**20 / 32)))


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")}
    out.update({"VOLUNTEER_LISTEN_HOST": "127.0.0.1", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"})
    return out


def write_manifest(path: Path, name: str, dims: list[int], hidden: int, replication: int,
                   public: str = "auto") -> Path:
    path.write_text(f"""
experiment: {{name: {name}, version: "1"}}
expert: {{kind: ffn, hidden_dim: {hidden}}}
grid: {{prefix: {name}.ffn, dims: {dims}}}
serving: {{max_bytes: 1073741824, max_elements: 268435456}}
shards: {{replication: {replication}}}
network: {{public: "{public}"}}
""")
    return path


def daemon_status(home: Path) -> dict[str, Any] | None:
    """The status snapshot of the daemon in ``home``, or None (not up yet, or not answering)."""
    from volunteer.daemon.control_client import call

    if not (home / "control.json").exists():
        return None
    try:
        return call(home, "status", wait_s=10.0)
    except Exception:
        return None


class Daemon:
    """One ``volunteer join`` process with its own home."""

    def __init__(self, home: Path, manifest: Path, *args: str) -> None:
        self.home = home
        self.log = open(home.with_suffix(".log"), "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "volunteer", "join", str(manifest), "--home", str(home),
                                      *args], stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env())

    def status(self) -> dict[str, Any] | None:
        return daemon_status(self.home)

    def wait(self, cond: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}): see {self.log.name}")
            snap = self.status()
            if snap is not None and cond(snap):
                return snap
            time.sleep(0.02)
        raise TimeoutError(f"timed out waiting for {what} (log: {self.log.name})")

    def leave(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "volunteer", "leave", "--json", "--home", str(self.home)],
                             capture_output=True, text=True, timeout=300, env=env())
        self.proc.wait(60)
        return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def serving(snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {u: h for u, h in (snap.get("shards") or {}).get("hosted", {}).items() if h["state"] == "serving"}


def bench_download(tmp: Path, mib: float, public: str = "auto") -> dict[str, Any]:
    """A newcomer downloads the holder's shard. ``public: auto``: the first node of a new swarm
    cannot learn its reachability, so its shard travels over libp2p; ``public: yes``: the
    holder says it is publicly reachable, so chunks come from its ZeroMQ endpoint (plain TCP)."""
    tmp = tmp / f"dl-{public}"
    tmp.mkdir()
    manifest = write_manifest(tmp / "dl.yaml", "benchdl", [1], hidden_for(mib), replication=2, public=public)
    holder = Daemon(tmp / "holder", manifest, "--new-swarm", "--num-experts", "1", "--set", "selfbench=false")
    newcomer = None
    try:
        snap = holder.wait(lambda s: len(serving(s)) == 1, 300, "the holder to serve")
        boot, root = snap["network"]["addrs"][0], next(iter(serving(snap).values()))["root"]
        newcomer = Daemon(tmp / "newcomer", manifest, "--bootstrap", boot, "--num-experts", "1",
                          "--set", "selfbench=false")
        got = newcomer.wait(lambda s: len(serving(s)) == 1, 600, "the newcomer to serve")
        uid, h = next(iter(serving(got).items()))
        d = got["shards"]["downloads"][uid]
        return {"shard_mib": round(d["total_bytes"] / 2**20, 2), "download_mb_s": d["mb_per_s"],
                "download_s": d["elapsed_s"], "join_to_serving_s": round(time.monotonic() - newcomer.started, 2),
                "chunks": d["chunks_total"], "same_root": h["root"] == root, "via": sorted(set(d["via"].values()))}
    finally:
        for daemon in (newcomer, holder):
            if daemon is not None:
                daemon.stop()


def bench_handoff(tmp: Path, mib: float) -> dict[str, Any]:
    manifest = write_manifest(tmp / "ho.yaml", "benchho", [2], hidden_for(mib), replication=1)
    a = Daemon(tmp / "a", manifest, "--new-swarm", "--num-experts", "1", "--set", "selfbench=false")
    b = None
    try:
        snap = a.wait(lambda s: len(serving(s)) == 1, 300, "volunteer a to serve")
        b = Daemon(tmp / "b", manifest, "--bootstrap", snap["network"]["addrs"][0], "--num-experts", "1",
                   "--set", "selfbench=false")
        bsnap = b.wait(lambda s: len(serving(s)) == 1, 300, "volunteer b to serve")
        (uid, _h), = serving(bsnap).items()
        t0 = time.monotonic()
        report = b.leave()
        adopted = a.wait(lambda s: uid in serving(s), 120, "the adopter to serve the uid")
        catch_up = time.monotonic() - t0
        (h,) = [x for x in report.get("handoffs", []) if x["uid"] == uid] or [{}]
        return {"catch_up_s": round(catch_up, 2), "leave_s": report.get("duration_s"),
                "outcome": h.get("outcome"), "adopted_root_equal": serving(adopted)[uid]["root"] == h.get("root")}
    finally:
        for daemon in (b, a):
            if daemon is not None:
                daemon.stop()


def bulk_serve() -> None:
    """Child process: a libp2p host that writes N requested bytes on a stream (baseline)."""
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.custom_types import TProtocol

    from volunteer.net.host import build_host, full_multiaddrs, quiet_libp2p_logging, run_host

    quiet_libp2p_logging()

    async def handler(stream: Any) -> None:
        want = int.from_bytes(await stream.read(8), "little")
        block = b"\x5a" * (1 << 20)
        while want > 0:
            n = min(want, len(block))
            await stream.write(block[:n])
            want -= n
        await stream.close()

    async def main() -> None:
        host = build_host(create_new_key_pair())
        async with run_host(host, ["/ip4/127.0.0.1/tcp/0"]):
            host.set_stream_handler(TProtocol(BULK_PROTOCOL), handler)
            print(json.dumps({"addr": full_multiaddrs(host)[0]}), flush=True)
            await trio.sleep_forever()

    trio.run(main)


def bench_stream(nbytes: int, trials: int = 2) -> float:
    """Best MB/s of one libp2p stream moving ``nbytes`` from a child process to this one."""
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.custom_types import TProtocol

    from volunteer.net.host import build_host, parse_peer_addr, quiet_libp2p_logging, run_host

    quiet_libp2p_logging()
    child = subprocess.Popen([sys.executable, __file__, "--bulk-serve"], stdout=subprocess.PIPE, text=True, env=env())
    try:
        addr = json.loads(child.stdout.readline())["addr"]  # type: ignore[union-attr]

        async def main() -> float:
            host = build_host(create_new_key_pair())
            best = 0.0
            async with run_host(host, ["/ip4/127.0.0.1/tcp/0"]):
                info = parse_peer_addr(addr)
                await host.connect(info)
                for _ in range(trials):
                    stream = await host.new_stream(info.peer_id, [TProtocol(BULK_PROTOCOL)])
                    t0 = time.perf_counter()
                    await stream.write(nbytes.to_bytes(8, "little"))
                    got = 0
                    while got < nbytes:
                        chunk = await stream.read(1 << 20)
                        if not chunk:
                            break
                        got += len(chunk)
                    best = max(best, got / (time.perf_counter() - t0) / 1e6)
                    await stream.close()
            return best

        return trio.run(main)
    finally:
        child.kill()
        child.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--json", action="store_true", help="print only the JSON figures")
    ap.add_argument("--netlab", action="store_true",
                    help="also measure the relayed and hole-punched paths in the NAT lab (root, ip, iptables)")
    ap.add_argument("--bulk-serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bulk_serve:
        bulk_serve()
        return 0
    cfg = PRESETS[args.preset]
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        rows = []
        for t in range(cfg["trials"]):
            trial = Path(tmp) / f"t{t}"
            trial.mkdir()
            dl = bench_download(trial, cfg["mib"])
            zmq = bench_download(trial, cfg["mib"], public="yes")
            stream = bench_stream(int(dl["shard_mib"] * 2**20))
            rows.append({"libp2p_stream_mb_s": round(stream, 1), "download": dl, "download_zmq": zmq,
                         "handoff": bench_handoff(trial, cfg["mib"]),
                         "download_over_stream": round(dl["download_mb_s"] / stream, 3) if stream else None,
                         "zmq_over_stream": round(zmq["download_mb_s"] / stream, 3) if stream else None})
        netlab = None
        if args.netlab:
            from shard_lab import run_netlab

            netlab = run_netlab(Path(tmp), cfg["netlab_mib"], quiet=args.json)
    out: dict[str, Any] = {"preset": args.preset, "mib": cfg["mib"], "trials": rows}
    if netlab is not None:
        out["netlab"] = netlab
    rc = 1 if netlab is not None and "error" in netlab else 0
    if args.json:
        print(json.dumps(out))
        return rc
    for i, r in enumerate(rows):
        dl, ho = r["download"], r["handoff"]
        print(f"trial {i}: shard {dl['shard_mib']} MiB in {dl['chunks']} chunks")
        print(f"  libp2p stream (baseline)    {r['libp2p_stream_mb_s']:8.1f} MB/s")
        print(f"  shard download (libp2p)     {dl['download_mb_s']:8.1f} MB/s  = {r['download_over_stream']:.2f}x "
              f"the stream; {dl['download_s']:.2f}s; same root: {dl['same_root']}; via {dl['via']}")
        zq = r["download_zmq"]
        print(f"  shard download (ZeroMQ)     {zq['download_mb_s']:8.1f} MB/s  = {r['zmq_over_stream']:.2f}x "
              f"the stream; {zq['download_s']:.2f}s; same root: {zq['same_root']}; via {zq['via']}")
        print(f"  join -> serving the uid     {dl['join_to_serving_s']:8.2f} s")
        print(f"  leave -> adopter serving    {ho['catch_up_s']:8.2f} s  ({ho['outcome']}, root equal: "
              f"{ho['adopted_root_equal']})")
    if netlab is not None:
        from shard_lab import print_netlab

        print_netlab(netlab)
    print(json.dumps(out))
    return rc


if __name__ == "__main__":
    sys.exit(main())
