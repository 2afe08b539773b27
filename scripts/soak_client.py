"""Soak client process: ``--threads`` clients hammer one volunteer for ``--seconds``.

Run by ``bench_soak.py``::

    python scripts/soak_client.py --endpoint tcp://127.0.0.1:PORT --uid soak.ffn.0 --hidden 64 \\
        --threads 16 --seconds 60 [--libp2p PEER_ID --addr MULTIADDR] [--max-bytes N] [--seed 0]

Each client thread loops over a weighted mix of requests, most of them honest training
(forward with "will backward", then the backward by forward id, as ``RemoteExpert`` does),
the rest hostile or broken: an unknown uid, NaN inputs, a wrong shape, a garbage header, a
header whose tensor spec lies about its frame, a batch over ``max_batch_size``, a tensor over
``max_bytes``, a backward for a forward the server never saw. Over ZeroMQ (default) or, with
``--libp2p``, over libp2p streams from one ``ClientNode`` (the messages over the size limit
from a second one: the server resets a stream that carried one, failing whatever else was
multiplexed on it, which is that client's own doing, not the server's).

Every request ends in exactly one outcome: ``ok``, a typed error code from the server
(``too_large``, ``non_finite``, ...), ``closed`` (the server dropped the connection, the
wire's answer to a message over its size limit), ``timeout`` (no answer within
``--timeout``: an unanswered request) or ``untyped:<Exception>``. Prints one JSON line at
the end: counts per request kind and outcome, and latency percentiles of honest requests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from typing import Any

MIX = {"train": 80, "unknown_uid": 3, "nan": 3, "bad_shape": 3, "garbage": 3, "lying_spec": 2,
       "big_batch": 3, "big_bytes": 1, "stale_backward": 2}
#: outcomes a kind may end in without breaking a property (others are findings)
EXPECTED = {
    "train": {"ok", "overloaded", "cache_miss", "deadline_expired"},
    "unknown_uid": {"unknown_expert"}, "nan": {"non_finite"}, "bad_shape": {"bad_request"},
    "garbage": {"bad_request"}, "lying_spec": {"bad_request", "too_large"},
    "big_batch": {"too_large"}, "big_bytes": {"too_large", "closed"},
    "stale_backward": {"cache_miss", "bad_request"},
}


class Client:
    """One client thread's requests and their outcomes."""

    def __init__(self, transport: Any, uid: str, hidden: int, timeout: float, max_batch: int,
                 max_bytes: int, rng: random.Random, big_transport: Any = None) -> None:
        self.transport, self.uid, self.hidden = transport, uid, hidden
        self.big_transport = big_transport or transport
        self.timeout, self.max_batch, self.max_bytes, self.rng = timeout, max_batch, max_bytes, rng
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[float] = []

    def _send(self, kind: str, frames: list[Any], honest: bool = False, transport: Any = None) -> Any:
        """One request; records ``kind:outcome``; returns the decoded reply or None."""
        from volunteer.client.remote_expert import CLIENT_LIMITS
        from volunteer.wire.errors import RemoteError, RemoteTimeoutError, UnreachableError
        from volunteer.wire.messages import decode_reply

        t0 = time.monotonic()
        reply, outcome = None, "ok"
        try:
            reply = decode_reply((transport or self.transport).request(frames, self.timeout), CLIENT_LIMITS)
        except RemoteTimeoutError:
            outcome = "timeout"
        except UnreachableError:
            outcome = "closed"
        except RemoteError as e:
            outcome = e.code
        except Exception as e:  # a finding: everything a server says must be typed
            outcome = f"untyped:{type(e).__name__}"
        if honest and outcome == "ok":
            self.latencies.append(time.monotonic() - t0)
        self.outcomes[f"{kind}:{outcome}"] += 1
        return reply

    def _request(self, op: str, tensors: list[Any], uid: str | None = None, **fields: Any) -> list[Any]:
        from volunteer.client.remote_expert import new_request_id
        from volunteer.wire.messages import encode_request

        fields.setdefault("request_id", new_request_id())
        return encode_request(op, uid or self.uid, tensors, timeout=self.timeout, **fields)

    def one(self, kind: str) -> None:
        import msgpack
        import torch

        h, rows = self.hidden, self.rng.randint(8, 64)
        if kind == "train":
            from volunteer.client.remote_expert import new_request_id

            fid = new_request_id()
            x = torch.randn(rows, h)
            reply = self._send("train", self._request("forward", [x], request_id=fid, will_backward=True),
                               honest=True)
            if reply is not None:
                g = torch.randn(rows, h)
                tensors, xi = ([g], False) if reply.cached else ([x, g], True)
                self._send("train", self._request("backward", tensors, forward_id=fid, inputs_included=xi),
                           honest=True)
        elif kind == "unknown_uid":
            self._send(kind, self._request("forward", [torch.randn(rows, h)], uid=self.uid + "9"))
        elif kind == "nan":
            x = torch.randn(rows, h)
            x[self.rng.randrange(rows), self.rng.randrange(h)] = float("nan")
            self._send(kind, self._request("forward", [x]))
        elif kind == "bad_shape":
            self._send(kind, self._request("forward", [torch.randn(rows, h + 3)]))
        elif kind == "garbage":
            self._send(kind, [os.urandom(self.rng.randint(1, 300))])
        elif kind == "lying_spec":
            header = {"v": 1, "op": "forward", "uid": self.uid, "id": self.rng.getrandbits(63),
                      "t": [["float32", [4096, h], None]], "ttl": self.timeout}
            self._send(kind, [msgpack.packb(header), os.urandom(64)])
        elif kind == "big_batch":
            self._send(kind, self._request("forward", [torch.randn(self.max_batch + 1 + rows, h)]))
        elif kind == "big_bytes":
            n = (self.max_bytes + 2**20) // (4 * h) + 1
            self._send(kind, self._request("forward", [torch.zeros(n, h)]), transport=self.big_transport)
        elif kind == "stale_backward":
            fid = self.rng.getrandbits(63)
            self._send(kind, self._request("backward", [torch.randn(rows, h)], forward_id=fid,
                                           inputs_included=False))

    def run(self, until: float) -> None:
        kinds, weights = list(MIX), list(MIX.values())
        while time.monotonic() < until:
            self.one(self.rng.choices(kinds, weights)[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--uid", required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="no answer within this is 'unanswered'")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--max-bytes", type=int, default=8 * 2**20)
    ap.add_argument("--libp2p", metavar="PEER_ID", help="call over libp2p to this peer instead of ZeroMQ")
    ap.add_argument("--addr", action="append", default=[], help="the peer's multiaddr (with --libp2p)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    node = big_node = big = None
    if args.libp2p:
        from volunteer.client.node import ClientNode

        # a second peer sends the messages over the size limit: the server resets the stream of
        # such a message, which would also fail the honest calls multiplexed on it
        node = ClientNode("soak", args.addr, listen_addrs=["/ip4/127.0.0.1/tcp/0"]).start()
        big_node = ClientNode("soak", args.addr, listen_addrs=["/ip4/127.0.0.1/tcp/0"]).start()
        transports = [node.transport(args.libp2p, args.addr)] * args.threads
        big = big_node.transport(args.libp2p, args.addr)
    else:
        from volunteer.client.zmq_transport import ZmqTransport

        transports = [ZmqTransport(args.endpoint) for _ in range(args.threads)]
    clients = [Client(t, args.uid, args.hidden, args.timeout, args.max_batch, args.max_bytes,
                      random.Random(args.seed * 1000 + i), big) for i, t in enumerate(transports)]
    print(json.dumps({"event": "ready"}), flush=True)
    until = time.monotonic() + args.seconds
    threads = [threading.Thread(target=c.run, args=(until,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + args.timeout + 30)
    outcomes: Counter[str] = Counter()
    lat: list[float] = []
    for c in clients:
        outcomes.update(c.outcomes)
        lat.extend(c.latencies)
    lat.sort()
    pct = {f"p{q}": round(lat[min(len(lat) - 1, int(len(lat) * q / 100))] * 1e3, 2) for q in (50, 99)} if lat else {}
    print(json.dumps({"event": "summary", "outcomes": dict(outcomes), "latency_ms": pct,
                      "stuck_threads": sum(t.is_alive() for t in threads)}), flush=True)
    for n in (node, big_node):
        if n is not None:
            n.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
