"""Where trainers look experts up: the ``ExpertDirectory`` protocol and a static directory.

Expert uids form a grid, ``"<prefix>.<i>.<j>..."`` (the prefix may contain dots). Beam search
asks a directory two things, both batched so that one network round trip serves a whole
batch of samples:

- ``children(prefix_queries)``: for each prefix query (a string ending with ``"."``, e.g.
  ``"demo.ffn.3."``), the next grid coordinates under it that have at least one alive expert;
- ``resolve(uids)``: a ``Transport`` for each alive uid (uids not alive are simply absent).

A directory that caches lookups may also offer ``invalidate(uids)`` (optional, not part of
the protocol): RemoteMixtureOfExperts calls it, when present, with experts that answered
"draining"/"unknown_expert" or were unreachable, so it stops offering them from its cache.

``StaticDirectory`` answers from a fixed mapping uid -> endpoint/Transport (tests, local runs,
the demo trainer). ``StaticDirectory.from_endpoints`` builds that mapping by asking each
server which experts it hosts with the wire ``info`` op. The DHT-backed implementation lives
in ``volunteer.client.dht_directory``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from volunteer.wire.transport import Transport

__all__ = [
    "ExpertDirectory",
    "StaticDirectory",
    "grid_coords",
    "make_uid",
]


@runtime_checkable
class ExpertDirectory(Protocol):
    """What beam search needs from an expert registry (static, DHT, ...)."""

    def children(self, prefixes: Sequence[str]) -> dict[str, list[int]]:
        """For each prefix query ("p." or "p.3."), the next coordinates with an alive expert."""
        ...

    def resolve(self, uids: Sequence[str]) -> dict[str, Transport]:
        """A transport for each alive uid among ``uids`` (dead/unknown uids are left out)."""
        ...


def make_uid(prefix: str, coords: Sequence[int]) -> str:
    """``make_uid("demo.ffn", (3, 7)) == "demo.ffn.3.7"``."""
    return ".".join([prefix, *(str(int(c)) for c in coords)])


def grid_coords(uid: str, prefix: str, ndim: int | None = None) -> tuple[int, ...] | None:
    """The grid coordinates of ``uid`` under ``prefix``, or None if it is not a grid uid there.

    ``grid_coords("demo.ffn.3.7", "demo.ffn") == (3, 7)``. Coordinates must be plain
    non-negative decimal integers; with ``ndim`` given, exactly that many are required.
    """
    head = prefix + "."
    if not uid.startswith(head):
        return None
    parts = uid[len(head):].split(".")
    if ndim is not None and len(parts) != ndim:
        return None
    coords = []
    for part in parts:
        if not part.isdecimal() or not part.isascii() or len(part) > 9:
            return None
        coords.append(int(part))
    return tuple(coords)


def _zmq_transport(endpoint: str) -> Transport:
    """A direct ZeroMQ transport to ``endpoint`` (imported lazily: pyzmq loads on first use)."""
    from volunteer.client.zmq_transport import ZmqTransport

    return ZmqTransport(endpoint)


def _next_coordinate(uid: str, query: str) -> int | None:
    """The coordinate right after prefix query ``query`` in ``uid`` (None if not under it)."""
    if not uid.startswith(query):
        return None
    head = uid[len(query):].split(".", 1)[0]
    if not head.isdecimal() or not head.isascii() or len(head) > 9:
        return None
    return int(head)


class StaticDirectory:
    """An ``ExpertDirectory`` over a fixed mapping ``uid -> endpoint | Transport``.

    String endpoints (``"tcp://host:port"``) get one ``ZmqTransport`` each, created on first
    use and shared by every uid served there; ``close()`` closes the transports it created.
    """

    def __init__(self, mapping: Mapping[str, str | Transport]):
        for uid in mapping:
            if not isinstance(uid, str) or not uid or uid.endswith("."):
                raise ValueError(f"invalid expert uid {uid!r}")
        self._mapping: dict[str, str | Transport] = dict(mapping)
        self._owned: dict[str, Transport] = {}
        self._index: dict[str, list[int]] | None = None
        self._lock = threading.Lock()
        #: endpoints that ``from_endpoints`` could not query, with the reason
        self.failed_endpoints: dict[str, str] = {}
        #: what ``from_endpoints`` learned per uid (the ``info`` entry: kind, input_shapes, ...)
        self.expert_info: dict[str, dict] = {}

    @classmethod
    def from_endpoints(
        cls, endpoints: Sequence[str], timeout: float = 10.0, include_draining: bool = False
    ) -> StaticDirectory:
        """Ask each endpoint which experts it hosts (wire ``info`` op) and map them.

        Endpoints that cannot be reached or answer garbage are skipped and listed in
        ``failed_endpoints`` (endpoint -> reason); the caller decides whether an empty
        directory is an error. Draining experts are left out unless ``include_draining``.
        """
        from volunteer.wire.errors import RemoteError
        from volunteer.wire.ops import decode_info_reply, encode_info_request

        directory = cls({})
        for endpoint in dict.fromkeys(endpoints):
            transport = _zmq_transport(endpoint)
            try:
                reply = transport.request(encode_info_request(), timeout=timeout)
                info = decode_info_reply(reply)
            except (RemoteError, ValueError, TypeError, KeyError) as exc:
                transport.close()
                reason = str(exc) if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {exc}"
                directory.failed_endpoints[endpoint] = reason
                continue
            serving = [
                uid
                for uid, meta in info.items()
                if include_draining or meta.get("state", "serving") == "serving"
            ]
            if not serving:
                transport.close()
                directory.failed_endpoints[endpoint] = "no serving experts"
                continue
            directory._owned[endpoint] = transport
            for uid in serving:
                if not uid or uid.endswith("."):
                    continue
                directory._mapping[uid] = endpoint
                directory.expert_info[uid] = dict(info[uid], endpoint=endpoint)
        directory._index = None
        return directory

    @property
    def uids(self) -> list[str]:
        """Every uid this directory knows, sorted."""
        return sorted(self._mapping)

    def _children_index(self) -> dict[str, list[int]]:
        """prefix query -> sorted next coordinates, built once from the fixed mapping."""
        with self._lock:
            if self._index is None:
                index: dict[str, set[int]] = {}
                for uid in self._mapping:
                    parts = uid.split(".")
                    for i in range(1, len(parts)):
                        query = ".".join(parts[:i]) + "."
                        coord = _next_coordinate(uid, query)
                        if coord is not None:
                            index.setdefault(query, set()).add(coord)
                self._index = {q: sorted(cs) for q, cs in index.items()}
            return self._index

    def children(self, prefixes: Sequence[str]) -> dict[str, list[int]]:
        """For each prefix query, the next coordinates of the fixed mapping's uids."""
        index = self._children_index()
        return {query: list(index.get(query, ())) for query in prefixes}

    def resolve(self, uids: Sequence[str]) -> dict[str, Transport]:
        """A transport for each mapped uid among ``uids`` (unmapped ones left out)."""
        result: dict[str, Transport] = {}
        for uid in uids:
            target = self._mapping.get(uid)
            if target is None:
                continue
            result[uid] = self._transport(target) if isinstance(target, str) else target
        return result

    def _transport(self, endpoint: str) -> Transport:
        with self._lock:
            transport = self._owned.get(endpoint)
            if transport is None:
                transport = self._owned[endpoint] = _zmq_transport(endpoint)
            return transport

    def close(self) -> None:
        """Close the transports this directory created (not those it was given)."""
        with self._lock:
            owned, self._owned = self._owned, {}
        for transport in owned.values():
            transport.close()

    def __enter__(self) -> StaticDirectory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
