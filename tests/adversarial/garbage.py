"""A garbage peer: speaks nonsense on every protocol a volunteer node serves.

Each attack is a plain function over a seeded ``random.Random`` (a failure names its seed)
and returns how many payloads it delivered, so a test can check that the attack really ran:

- ``attack_zmq``: raw TCP garbage on the ZeroMQ endpoint (random bytes, a greeting then
  junk, frames claiming 2**62 bytes), then a valid ZMTP handshake followed by garbage
  messages -- each of those must be answered with a typed error reply -- messages that
  break a ZMTP-level bound (300 frames, a frame claiming 2**62 bytes: a typed refusal or a
  closed connection), and bulk garbage messages (``bulk_mib`` MiB in all) that a node
  retaining what peers send would keep.
- ``attack_control``: random bytes, oversized lengths, broken JSON and unknown ops on the
  daemon's control socket.
- ``attack_libp2p`` (async, trio): a fresh libp2p identity connects to the node, learns the
  protocols it serves (identify) and, for each of them plus the ones the code defines
  (expert RPC, shard, dial-back, Kademlia, circuit relay hop/stop, DCUtR, identify, ping),
  opens streams and writes random bytes, varint or u32 lengths claiming gigabytes,
  malformed-but-plausible frames, and -- on Kademlia -- well-formed PUT_VALUE/GET_VALUE/
  FIND_NODE messages carrying garbage records under the experiment's real keys.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable

import msgpack
import multiaddr
import trio
import varint
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.peerinfo import info_from_p2p_addr

from volunteer.net import records
from volunteer.net.host import build_host, run_host
from volunteer.wire.errors import RemoteError
from volunteer.wire.framing import pack_frames
from volunteer.wire.messages import PROTOCOL_VERSION, decode_reply
from volunteer.wire.zmtp import COMMAND, GREETING, LONG, ZmtpConnection, ZmtpError

KNOWN_PROTOCOLS = (
    "/volunteer/expert-rpc/1.0.0",
    "/volunteer/shard/1.0.0",
    "/volunteer/dialback/1.0.0",
    "/ipfs/kad/1.0.0",
    "/libp2p/circuit/relay/0.2.0/hop",
    "/libp2p/circuit/relay/0.2.0/stop",
    "/libp2p/dcutr",
    "/ipfs/id/1.0.0",
    "/ipfs/id/push/1.0.0",
    "/ipfs/ping/1.0.0",
)


def _junk(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


# -- ZeroMQ ------------------------------------------------------------------------------


_SOCKET_TYPE = b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
_READY_DEALER = bytes([COMMAND, 6 + len(_SOCKET_TYPE)]) + b"\x05READY" + _SOCKET_TYPE


def _raw_tcp(host: str, port: int, payload: bytes) -> None:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.settimeout(2.0)
        with contextlib.suppress(OSError):
            sock.sendall(payload)
            sock.recv(4096)  # whatever the node says (its greeting), or EOF, or timeout


def attack_zmq(endpoint: str, rng: random.Random, bulk_mib: int = 256) -> Counter:
    """Garbage on a ZeroMQ ROUTER endpoint ``tcp://host:port``; see module docstring."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    sent: Counter = Counter()
    for payload in (
        _junk(rng, 4096),
        GREETING + _junk(rng, 512),
        GREETING[:10] + b"\x01\x00" + _junk(rng, 200),  # ZMTP 1.0
        GREETING + bytes([COMMAND | LONG]) + struct.pack(">Q", 2**62) + _junk(rng, 64),
        # a valid handshake, then a data frame claiming 2**62 bytes
        GREETING + _READY_DEALER + bytes([LONG]) + struct.pack(">Q", 2**62) + _junk(rng, 64),
    ):
        _raw_tcp(host, int(port), payload)
        sent["raw"] += 1

    deadline = time.monotonic() + 30.0
    conn = ZmtpConnection(host, int(port), deadline)
    try:
        for frames in (
            [b"\xc1"],  # never valid msgpack
            [_junk(rng, 64), _junk(rng, 10)],
            [msgpack.packb({"v": PROTOCOL_VERSION, "op": "forward", "uid": "demo.ffn.0.0", "id": 5,
                            "t": [["float32", [2**20, 2**20], None]]}), b"\x00" * 16],
            [msgpack.packb({"v": PROTOCOL_VERSION, "op": "forward", "uid": "x" * 10_000, "id": 6})],
            [msgpack.packb({"v": PROTOCOL_VERSION, "op": "backward", "uid": "demo.ffn.0.0",
                            "id": 7, "fid": -1, "xi": False})],
        ):
            conn.send(frames, deadline)
            _expect_typed_error(conn.recv(deadline))
            sent["answered"] += 1
    finally:
        conn.close()
    # messages that break a ZMTP-level bound: a typed refusal or a closed connection
    # (the last: libzmq kept reading the parts of an unfinished multipart message, 300 MiB)
    for frames in ([b"\x00"] * 300, [b"\x00"] * 3000, [_junk(rng, 1 << 20)] * 300):
        conn = ZmtpConnection(host, int(port), deadline)
        try:
            try:
                conn.send(frames, deadline)
                _expect_typed_error(conn.recv(deadline))
            except ZmtpError:
                pass  # the node hung up on us (maybe while we were still sending): fine
            sent["cut_off"] += 1
        finally:
            conn.close()
    deadline = time.monotonic() + 120.0
    conn = ZmtpConnection(host, int(port), deadline)
    try:
        chunk = _junk(rng, 4 << 20)
        for _ in range(bulk_mib // 4):  # bulk: 4 MiB garbage messages, each answered
            conn.send([b"\xc1" + chunk[:16], chunk], deadline)
            try:
                _expect_typed_error(conn.recv(deadline))
            except ZmtpError as exc:
                raise AssertionError(f"bulk garbage after {sent['bulk_mib']} MiB: {exc}") from exc
            sent["bulk_mib"] += 4
    finally:
        conn.close()
    return sent


def _expect_typed_error(reply: list) -> None:
    """``reply`` must be an error reply with one of the wire's typed errors."""
    try:
        decode_reply(reply)
    except RemoteError:
        return
    raise AssertionError("the node accepted a garbage request")


# -- control socket --------------------------------------------------------------------


def attack_control(path: str, rng: random.Random) -> Counter:
    """Garbage on the daemon's control socket (owner-only Unix socket)."""
    sent: Counter = Counter()
    body = b'{"op": "status", "x": [1, 2'
    payloads = [
        _junk(rng, 256),
        struct.pack(">I", 2**32 - 1) + _junk(rng, 64),
        struct.pack(">I", len(body)) + body,
        struct.pack(">I", 6) + b"[1, 2]",
        struct.pack(">I", 20) + b'{"op": "rm -rf /"}  ',
        struct.pack(">I", 2000) + b"[" * 1000 + b"]" * 1000,
        b"",
    ]
    for payload in payloads:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10.0)
            sock.connect(path)
            with contextlib.suppress(OSError):
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
        sent["control"] += 1
    return sent


# -- libp2p ----------------------------------------------------------------------------


def _kad(msg_type: int, key: bytes, value: bytes | None = None) -> bytes:
    msg = Message()
    msg.type = msg_type
    msg.key = key
    if value is not None:
        msg.record.key = key
        msg.record.value = value
    data = msg.SerializeToString()
    return varint.encode(len(data)) + data


def _payloads(protocol: str, rng: random.Random, keys: Iterable[str]) -> list[bytes]:
    """What to write on one stream each: generic garbage plus protocol-shaped junk."""
    out = [
        _junk(rng, rng.randint(1, 4096)),
        varint.encode(2**31) + _junk(rng, 1024),  # varint length claiming 2 GiB
        struct.pack("<I", 2**32 - 1) + _junk(rng, 64),  # u32 frame count claiming 4e9
        pack_frames([msgpack.packb({"v": PROTOCOL_VERSION, "op": "forward", "id": 1,
                                    "uid": "demo.ffn.0.0", "t": [["float32", [4], None]]}),
                     b"\x00" * 15]),  # a frame one byte short of its spec
        struct.pack("<II", 1, 2**31) + _junk(rng, 512),  # one frame claiming 2 GiB
        varint.encode(300) + _junk(rng, 300),  # varint-framed protobuf junk
    ]
    if protocol == "/ipfs/kad/1.0.0":
        for key in keys:
            k = key.encode()
            out += [
                _kad(Message.MessageType.PUT_VALUE, k, _junk(rng, 200)),
                _kad(Message.MessageType.PUT_VALUE, k, records.encode_value([_junk(rng, 100)])),
                _kad(Message.MessageType.PUT_VALUE, k,
                     msgpack.packb({"v": 1, "e": [msgpack.packb([b"x", b"y"])] * 300})),
                _kad(Message.MessageType.GET_VALUE, k),
                _kad(Message.MessageType.FIND_NODE, _junk(rng, 40)),
            ]
        out.append(_kad(Message.MessageType.GET_VALUE, b"/volunteer/" + b"z" * 4000))
    return out


async def _one_stream(host, peer, protocol: str, payload: bytes) -> bool:
    """Open a stream, write ``payload``, read a little of the answer, reset. False when
    the node does not serve ``protocol`` (or refused the stream)."""
    try:
        with trio.fail_after(10):
            stream = await host.new_stream(peer, [TProtocol(protocol)])
    except Exception:
        return False
    try:
        with trio.move_on_after(2.0):
            await stream.write(payload)
            await stream.read(65536)
    except Exception:
        pass  # the node reset the stream: what a garbage peer deserves
    finally:
        with trio.move_on_after(2.0), contextlib.suppress(Exception):
            await stream.reset()
    return True


async def attack_libp2p(addr: str, rng: random.Random, keys: Iterable[str],
                        idle_streams: int = 32) -> tuple[Counter, set[str]]:
    """Connect to the node at ``addr`` (``/ip4/../p2p/<id>``) and speak garbage on every
    protocol; returns payloads delivered per protocol and the protocols identify listed."""
    keys = list(keys)
    host = build_host(create_new_key_pair())
    sent: Counter = Counter()
    async with run_host(host, ["/ip4/127.0.0.1/tcp/0"]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        host.get_peerstore().add_addrs(info.peer_id, info.addrs, 600)
        with trio.fail_after(20):
            await host.connect(info)
        listed: set[str] = set()
        with trio.move_on_after(10):
            while not listed:
                with contextlib.suppress(Exception):
                    listed = {str(p) for p in host.get_peerstore().get_protocols(info.peer_id)}
                await trio.sleep(0.05)
        for protocol in sorted(listed | set(KNOWN_PROTOCOLS)):
            for payload in _payloads(protocol, rng, keys):
                if not await _one_stream(host, info.peer_id, protocol, payload):
                    break
                sent[protocol] += 1
        # streams opened and left hanging mid-message: the node must not wait on them forever
        hanging = []
        for _ in range(idle_streams):
            with contextlib.suppress(Exception), trio.fail_after(10):
                stream = await host.new_stream(info.peer_id, [TProtocol(KNOWN_PROTOCOLS[0])])
                await stream.write(struct.pack("<II", 1, 60_000) + _junk(rng, 1000))
                hanging.append(stream)
        sent["hanging"] = len(hanging)
    return sent, listed
