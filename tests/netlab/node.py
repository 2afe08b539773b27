"""A NAT-lab node: a real libp2p host running ``NatTraversal``, driven by JSON lines.

Run inside a lab namespace as ``python -m tests.netlab.node [--allow-hop] [--relay ADDR]``.
It prints one JSON object per line on stdout (``{"event": ...}``) and reads commands, one
JSON object per line, on stdin:

- ``{"cmd": "connect", "addrs": [...]}`` -> ``connected`` (peer, kind of connection)
- ``{"cmd": "upgrade", "peer": ID, "timeout": s}`` -> ``upgraded`` (kind or null, seconds)
- ``{"cmd": "echo", "peer": ID, "size": n, "count": k}`` -> ``echo`` (round trips over a
  fresh stream on the best connection: kind used, rtt ms, MB/s)
- ``{"cmd": "dial_circuit", "addr": A}`` -> ``dialed`` (always a new relayed connection);
  ``{"cmd": "close_relayed", "peer": ID}`` -> ``closed`` (count)
- ``{"cmd": "conns"}`` -> ``conns``; ``{"cmd": "snapshot"}`` -> ``snapshot``;
  ``{"cmd": "quit"}`` exits.

Failures of a command are reported as ``{"event": "failed", "cmd": ..., "error": ...}``;
a crash of the node as ``{"event": "error", ...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from tests.netlab.events import emit, run_program
from volunteer.net.host import build_host, full_multiaddrs, quiet_libp2p_logging, run_host
from volunteer.net.nat.connections import ConnectionLedger, is_relayed
from volunteer.net.nat.reachability import PUBLIC
from volunteer.net.nat.traversal import NatTraversal

ECHO_PROTOCOL = TProtocol("/volunteer/lab-echo/1.0.0")
MAX_ECHO = 16 << 20


async def read_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("stream closed")
        buf += chunk
    return bytes(buf)


async def echo_handler(stream) -> None:
    try:
        while True:
            try:
                (n,) = struct.unpack(">I", await read_exactly(stream, 4))
            except EOFError:
                return
            if n > MAX_ECHO:
                return
            await stream.write(struct.pack(">I", n) + await read_exactly(stream, n))
    except Exception:
        return
    finally:
        try:
            await stream.close()
        except Exception:
            pass


def stream_kind(host, nat: NatTraversal, stream) -> str:
    muxed = stream.muxed_conn
    for conn in host.get_network().get_connections(muxed.peer_id):
        if conn.muxed_conn is muxed:
            return nat.connection_kind(conn)
    return "unknown"


async def do_echo(host, nat: NatTraversal, cmd: dict) -> dict:
    peer = ID.from_base58(cmd["peer"])
    size, count = int(cmd.get("size", 64)), int(cmd.get("count", 10))
    stream = await host.new_stream(peer, [ECHO_PROTOCOL])
    kind = stream_kind(host, nat, stream)
    payload = b"x" * size
    rtts = []
    t_all = time.perf_counter()
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            await stream.write(struct.pack(">I", size) + payload)
            (n,) = struct.unpack(">I", await read_exactly(stream, 4))
            got = await read_exactly(stream, n)
            rtts.append((time.perf_counter() - t0) * 1000)
            if got != payload:
                raise RuntimeError("echo mismatch")
    finally:
        await stream.close()
    total = time.perf_counter() - t_all
    return {"kind": kind, "count": count, "size": size,
            "rtt_ms_p50": round(statistics.median(rtts), 3),
            "rtt_ms_max": round(max(rtts), 3),
            "mb_per_s": round(2 * size * count / total / 1e6, 3)}


async def serve_commands(host, nat: NatTraversal, cancel: trio.CancelScope) -> None:
    stdin = trio.wrap_file(sys.stdin)
    while True:
        line = await stdin.readline()
        if not line:
            cancel.cancel()
            return
        try:
            cmd = json.loads(line)
            name = cmd.get("cmd")
        except Exception:
            emit("failed", cmd=None, error="bad json")
            continue
        t0 = time.monotonic()
        try:
            if name == "quit":
                cancel.cancel()
                return
            if name == "connect":
                conn = await nat.connect(list(cmd["addrs"]), timeout=float(cmd.get("timeout", 20)))
                if conn is None:
                    emit("failed", cmd=name, error="could not connect")
                else:
                    emit("connected", peer=conn.muxed_conn.peer_id.to_base58(),
                         kind=nat.connection_kind(conn), seconds=round(time.monotonic() - t0, 3))
            elif name == "upgrade":
                assert nat.puncher is not None
                kind = await nat.puncher.upgrade(ID.from_base58(cmd["peer"]),
                                                 timeout=float(cmd.get("timeout", 30)))
                emit("upgraded", peer=cmd["peer"], kind=kind, seconds=round(time.monotonic() - t0, 3))
            elif name == "dial_circuit":  # always a new relayed connection
                assert nat.relay_node is not None
                conn = await nat.relay_node.dial_circuit(cmd["addr"])
                emit("dialed", kind=nat.connection_kind(conn))
            elif name == "close_relayed":
                closed = 0
                for conn in list(host.get_network().get_connections(ID.from_base58(cmd["peer"]))):
                    if is_relayed(conn):
                        await conn.close()
                        closed += 1
                emit("closed", count=closed)
            elif name == "echo":
                emit("echo", **(await do_echo(host, nat, cmd)))
            elif name == "conns":
                ledger = nat.ledger or ConnectionLedger(punching=lambda _p: False)
                emit("conns", conns=ledger.describe(host))
            elif name == "snapshot":
                emit("snapshot", **nat.snapshot())
            else:
                emit("failed", cmd=name, error="unknown command")
        except Exception as e:
            emit("failed", cmd=name, error=f"{type(e).__name__}: {e}")


async def main(args: argparse.Namespace) -> None:
    quiet_libp2p_logging()
    host = build_host(create_new_key_pair())
    async with run_host(host, [f"/ip4/{args.ip}/tcp/{args.port}"]):
        host.set_stream_handler(ECHO_PROTOCOL, echo_handler)
        nat = NatTraversal(host, relays=args.relay, allow_hop=args.allow_hop,
                           bootstrap=args.bootstrap, enable_holepunch=not args.no_holepunch,
                           assume_public=args.assume_public)
        async with trio.open_nursery() as nursery:
            t0 = time.monotonic()
            await nursery.start(nat.run)
            emit("ready", peer_id=host.get_id().to_base58(), addrs=full_multiaddrs(host),
                 reachability=nat.reachability, public=nat.reachability == PUBLIC,
                 relay_addrs=nat.relay_addrs, seconds=round(time.monotonic() - t0, 3),
                 advice=nat.advice())
            await serve_commands(host, nat, nursery.cancel_scope)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ip", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=4001)
    parser.add_argument("--relay", action="append", default=[])
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--allow-hop", action="store_true")
    parser.add_argument("--no-holepunch", action="store_true")
    parser.add_argument("--assume-public", action="store_true")
    run_program(lambda: trio.run(main, parser.parse_args()))
