"""Control API wire format: one length-prefixed JSON object per message, both directions.

A message is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON (an
object). Requests are ``{"op": str, ...args}``; replies are ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": {"code": str, "message": str}}``. Lengths are checked before
anything is read, so a peer cannot make either side allocate more than the bound, and an
optional ``deadline`` bounds the whole read (a peer trickling one byte at a time cannot hold
the reader longer than that, whatever the socket's per-call timeout).
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A malformed, oversized or truncated control message."""


def send_message(sock: socket.socket, obj: dict[str, Any]) -> None:
    """Send one message; TypeError/ValueError (before any byte is sent) for non-JSON values."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_message(sock: socket.socket, max_bytes: int, deadline: float | None = None) -> dict[str, Any]:
    """Read one message; raises ``ProtocolError`` on bad length/JSON, EOF or non-object.

    ``deadline`` (``time.monotonic()`` clock): ``TimeoutError`` once it passes; without it
    the socket's own timeout applies to each receive. Other socket errors pass as OSError.
    """
    (length,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size, deadline))
    if length > max_bytes:
        raise ProtocolError(f"message of {length} bytes exceeds the limit of {max_bytes}")
    data = _recv_exactly(sock, length, deadline)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("message is not a JSON object")
    return obj


def _recv_exactly(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("control message not complete before its deadline")
            sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed mid-message" if buf or n == 0 else "connection closed")
        buf += chunk
    return bytes(buf)
