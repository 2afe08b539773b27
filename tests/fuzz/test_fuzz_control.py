"""Fuzzing the control API: its framing (``control_protocol``), a real ``ControlServer`` fed
random requests over its Unix socket, and ``control_client.call`` facing a fake daemon
that answers garbage.

Properties:

- ``recv_message`` raises only ``ProtocolError`` (or ``TimeoutError``/``OSError`` from the
  socket), and what it returns is a dict;
- the server answers every connection with one well-formed reply (``ok`` true with a
  result, or ``ok`` false with a string ``code`` among the documented ones and a string
  ``message``), and keeps answering ``ping`` afterwards;
- ``call`` returns a result or raises ``ControlError`` (the CLI turns it into a message),
  never ``OSError``, ``KeyError`` or ``AttributeError``.
"""

from __future__ import annotations

import json
import queue
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.profile import fuzz_settings
from tests.fuzz.strategies import mutated
from volunteer.daemon.control_client import ControlError, call
from volunteer.daemon.control_protocol import (
    MAX_REQUEST_BYTES,
    ProtocolError,
    recv_message,
)
from volunteer.daemon.control_server import ControlRequestError, ControlServer

pytestmark = pytest.mark.timeout(180)

SERVER_CODES = {"bad_request", "unknown_op", "internal", "busy", "refused"}

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
              st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=10,
)
requests = st.one_of(
    st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    st.fixed_dictionaries({"op": st.one_of(st.sampled_from(["ping", "echo", "boom", "refuse",
                                                            "not_json", "status", ""]),
                                           json_values)},
                          optional={"x": json_values}),
    json_values,
)


def frame(obj: Any, lie: int = 0) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack(">I", max(0, len(data) + lie)) + data


framed = st.one_of(
    st.binary(max_size=120),
    st.builds(frame, requests, st.sampled_from([0, 0, 0, -1, 1, 2**20])),
    st.builds(lambda n, body: struct.pack(">I", n) + body, st.integers(0, 2**32 - 1),
              st.binary(max_size=40)),
    st.builds(lambda n: struct.pack(">I", 2 * n) + b"[" * n + b"]" * n, st.integers(1, 5000)),
    st.builds(lambda body: struct.pack(">I", len(body)) + body,
              st.binary(max_size=60)),
)


def parse_stream(data: bytes) -> dict[str, Any]:
    """``recv_message`` over a socket pair holding ``data`` then EOF."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        return recv_message(b, MAX_REQUEST_BYTES, time.monotonic() + 10.0)


@fuzz_settings()
@given(framed)
def test_recv_message_on_random_streams(data: bytes) -> None:
    try:
        obj = parse_stream(data)
    except ProtocolError:
        return
    assert isinstance(obj, dict)


def _handlers() -> dict[str, Any]:
    def boom(_: dict) -> Any:
        raise RuntimeError("handler bug")

    def refuse(_: dict) -> Any:
        raise ControlRequestError("refused", "not now")

    return {"ping": lambda _: {"pid": 1}, "echo": lambda r: r, "boom": boom, "refuse": refuse,
            "not_json": lambda _: {"set": {1, 2}}}


SERVER: ControlServer | None = None


@pytest.fixture(scope="module", autouse=True)
def control_server() -> Iterator[ControlServer]:
    global SERVER
    run_dir = Path(tempfile.mkdtemp(prefix="vfz-"))
    server = ControlServer(run_dir, _handlers())
    server.start()
    SERVER = server
    try:
        yield server
    finally:
        SERVER = None
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def exchange(data: bytes) -> bytes:
    """Send ``data`` to the control server, half-close, return everything it answers."""
    assert SERVER is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20.0)
        sock.connect(SERVER.path)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server may answer (and close) before reading it all
            pass
        out = bytearray()
        while chunk := sock.recv(65536):
            out += chunk
        return bytes(out)


def assert_well_formed(reply: dict[str, Any]) -> None:
    if reply.get("ok") is True:
        assert "result" in reply
        return
    assert reply.get("ok") is False
    err = reply["error"]
    assert isinstance(err["code"], str) and err["code"] in SERVER_CODES, err
    assert isinstance(err["message"], str)


@fuzz_settings(0.5)
@given(framed)
def test_control_server_answers_random_requests(data: bytes) -> None:
    assert_well_formed(parse_stream(exchange(data)))


@fuzz_settings(0.5)
@given(st.data())
def test_control_server_answers_mutated_requests(data: st.DataObject) -> None:
    valid = frame({"op": data.draw(st.sampled_from(["ping", "echo", "status"])), "x": [1, "a"]})
    assert_well_formed(parse_stream(exchange(data.draw(mutated(valid)))))


def test_control_server_survives_and_still_pings() -> None:
    for op in ("ping", "not_json", "boom", "ping"):
        reply = parse_stream(exchange(frame({"op": op})))
        assert_well_formed(reply)
    assert parse_stream(exchange(frame({"op": "not_json"})))["error"]["code"] == "internal"
    assert parse_stream(exchange(frame({"op": "ping"}))) == {"ok": True, "result": {"pid": 1}}


def test_a_trickling_client_is_cut_off_by_the_read_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client sending one byte every 0.2 s gets its "bad_request" answer (and the slot is
    freed) while it is still sending: the read deadline is per request, not per byte."""
    from volunteer.daemon import control_server

    monkeypatch.setattr(control_server, "READ_TIMEOUT_S", 0.5)
    assert SERVER is not None
    message = frame({"op": "ping", "pad": "x" * 200})
    reply = b""
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(SERVER.path)
        for byte in message[:-1]:  # never complete
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # the server closed: its answer is waiting to be read
                break
            sent += 1
            sock.settimeout(0.2)
            try:
                reply = sock.recv(65536)
            except TimeoutError:
                continue
            break
        sock.settimeout(20.0)
        while chunk := sock.recv(65536):
            reply += chunk
    assert sent < len(message) - 1, "the server waited for the whole trickled request"
    answer = parse_stream(reply)
    assert answer["ok"] is False and answer["error"]["code"] == "bad_request"


class FakeDaemon:
    """A Unix socket at a home's control address that answers each request with the next
    queued payload (read the request first, then write, then close)."""

    def __init__(self, home: Path) -> None:
        self.dir = tempfile.mkdtemp(prefix="vfd-")
        self.path = str(Path(self.dir) / "c.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        home.mkdir(parents=True, exist_ok=True)
        (home / "control.json").write_text(json.dumps({"socket": self.path, "pid": 1}))
        self.payloads: queue.Queue[tuple[bytes, bool] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (item := self.payloads.get()) is not None:
            payload, read_first = item
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10.0)
                try:
                    if read_first:
                        conn.recv(65536)
                    conn.sendall(payload)
                except OSError:
                    pass

    def close(self) -> None:
        self.payloads.put(None)
        self.thread.join(10)
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


FAKE: tuple[FakeDaemon, Path] | None = None


@pytest.fixture(scope="module", autouse=True)
def fake_daemon() -> Iterator[None]:
    global FAKE
    home = Path(tempfile.mkdtemp(prefix="vfh-"))
    daemon = FakeDaemon(home)
    FAKE = (daemon, home)
    try:
        yield
    finally:
        FAKE = None
        daemon.close()
        shutil.rmtree(home, ignore_errors=True)


replies = st.one_of(
    framed,
    st.builds(frame, st.one_of(
        st.fixed_dictionaries({"ok": json_values}, optional={"result": json_values,
                                                             "error": json_values}),
        st.fixed_dictionaries({"ok": st.just(False), "error": st.fixed_dictionaries(
            {}, optional={"code": json_values, "message": json_values})}),
    )),
)


@fuzz_settings(0.5)
@given(replies, st.booleans())
def test_control_client_on_garbage_replies(payload: bytes, read_first: bool) -> None:
    assert FAKE is not None
    daemon, home = FAKE
    daemon.payloads.put((payload, read_first))
    try:
        call(home, "status", wait_s=10.0)
    except ControlError as exc:
        assert isinstance(exc.code, str) and isinstance(exc.message, str)
