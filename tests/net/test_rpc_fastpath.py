"""``RpcClient.call_from_thread``: one hand-off per call from a trainer's thread, on real
libp2p hosts (loopback), each host in its own ``TrioThread`` as in the daemon and trainer.

What must hold: replies reach the right caller when many threads share one stream; a
caller whose wait runs out gets ``RemoteTimeoutError`` while the stream stays usable (the
late reply is dropped unread); a stopped loop is ``UnreachableError`` at once, never a hang;
calling it from the loop thread is refused (it would block the loop that must answer); and
the first call to a peer (no stream yet) takes the async path and opens the stream.
No timing asserts: the timeouts below are either far longer than needed or about replies
that are held on purpose.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from volunteer.net.host import build_host, full_multiaddrs, run_host
from volunteer.net.rpc_client import Libp2pTransport, RpcClient
from volunteer.net.rpc_server import RpcServer
from volunteer.net.trio_thread import TrioThread
from volunteer.wire.errors import RemoteTimeoutError, UnreachableError

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
LONG = 60.0  # far longer than any reply here needs
pytestmark = pytest.mark.timeout(90)


class Echo:
    """A ``submit`` that answers with the request's frames reversed, or holds requests
    whose first frame is ``b"hold"`` until the test lets them go."""

    def __init__(self) -> None:
        self.held: list = []
        self.got_held = threading.Event()

    def __call__(self, frames: list, reply) -> None:
        if bytes(frames[0]) == b"hold":
            self.held.append((reply, [b"late"]))
            self.got_held.set()
        else:
            reply([bytes(f) for f in reversed(frames)])


class Pair:
    """A server host (``RpcServer`` + ``Echo``) and a client host (``RpcClient``), each in
    its own trio thread."""

    def __init__(self) -> None:
        self.echo = Echo()
        self.server_thread, self.client_thread = TrioThread("srv"), TrioThread("cli")

    async def _server(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        host = build_host(create_new_key_pair())
        async with run_host(host, LOOPBACK):
            RpcServer(host, self.echo).install()
            task_status.started((host.get_id(), full_multiaddrs(host)))
            await trio.sleep_forever()

    async def _client(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        host = build_host(create_new_key_pair())
        async with run_host(host, LOOPBACK), trio.open_nursery() as nursery:
            task_status.started(RpcClient(host, nursery, max_streams=1))
            await trio.sleep_forever()

    def __enter__(self) -> Pair:
        self.peer, self.addrs = self.server_thread.start(self._server)
        self.rpc: RpcClient = self.client_thread.start(self._client)
        self.transport = Libp2pTransport(self.client_thread, self.rpc, self.peer, self.addrs)
        return self

    def __exit__(self, *exc: object) -> None:
        for reply, out in self.echo.held:  # nobody waits for them any more
            reply(out)
        self.client_thread.stop()
        self.server_thread.stop()

    def stats(self):
        return self.client_thread.run_sync(lambda: self.rpc.stats)


def test_many_threads_on_one_stream_each_get_their_own_reply() -> None:
    with Pair() as p:
        assert p.transport.request([b"first", b"call"], LONG) == [b"call", b"first"]

        def one(i: int) -> list:
            return p.transport.request([b"q", str(i).encode()], LONG)

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, range(200)))
        assert got == [[str(i).encode(), b"q"] for i in range(200)]
        stats = p.stats()
        assert stats.calls == 201 and stats.streams_opened == 1
        assert stats.timeouts == stats.unreachable == 0


def test_a_timed_out_caller_leaves_the_stream_usable_and_its_late_reply_is_dropped() -> None:
    with Pair() as p:
        assert p.transport.request([b"warm", b"up"], LONG) == [b"up", b"warm"]
        # held by the server: this caller's wait runs out (the reply is not coming)
        with pytest.raises(RemoteTimeoutError):
            p.transport.request([b"hold"], 0.2)
        assert p.echo.got_held.wait(LONG)
        assert p.stats().timeouts == 1
        reply, out = p.echo.held.pop()
        reply(out)  # the late reply: read and dropped, the stream goes on
        assert p.transport.request([b"still", b"here"], LONG) == [b"here", b"still"]
        stats = p.stats()
        assert stats.replies_dropped == 1 and stats.streams_opened == 1
        assert stats.unreachable == 0


def test_a_stopped_loop_is_unreachable_and_the_loop_thread_is_refused() -> None:
    with Pair() as p:
        assert p.transport.request([b"a", b"b"], LONG) == [b"b", b"a"]

        def from_the_loop() -> str:
            try:
                p.rpc.call_from_thread(p.client_thread, p.transport.peer_id, p.addrs, [b"x"], 1.0)
            except RuntimeError as e:
                return str(e)
            return "no error"

        assert "await call()" in p.client_thread.run_sync(from_the_loop)
        # a caller waiting on a held request when the loop stops: told at once, no hang
        errors: list[BaseException] = []

        def waiting_caller() -> None:
            try:
                p.transport.request([b"hold"], LONG)
            except BaseException as e:  # the test looks at it
                errors.append(e)

        caller = threading.Thread(target=waiting_caller)
        caller.start()
        assert p.echo.got_held.wait(LONG)
        p.client_thread.stop()
        caller.join(LONG)
        assert not caller.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], UnreachableError)
        with pytest.raises(UnreachableError, match="not running"):
            p.transport.request([b"a"], LONG)
