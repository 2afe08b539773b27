"""What an averager needs from its peers: ``AveragingGroup``, ``Exchange`` and the handler.

Every averaging method (``methods.py``) is built from one primitive: *exchange* a list of
tensors with one peer. The caller sends an ``Exchange`` (what kind, which round, its
tensors); the peer's ``ExchangeHandler`` runs on the peer's side, may change the peer's own
state (elastic pull, gossip push, a round's gradient buffer), and answers with a list of
tensors (maybe empty). Groups differ only in how they find peers and carry the bytes:

- ``LocalGroup`` (``local_group.py``): peers in one process (threads); the thesis-table
  experiment and the arithmetic tests use it, so the methods are measured without sockets.
- ``SwarmGroup`` (``swarm_group.py``): peers found through the DHT under an
  experiment-scoped key (``experiment``, ``run_id``), bytes on libp2p streams (relayed and
  hole-punched connections included), the wire format's limits and typed errors.

Contract every group keeps (the averager relies on it, the tests check it):

- ``exchange`` returns within ``timeout`` seconds or raises a ``volunteer.wire.errors``
  ``RemoteError`` (``RemoteTimeoutError``, ``UnreachableError``, or the typed error the
  peer's handler raised: ``BadRequestError`` for tensors that do not match its parameters,
  ``NonFiniteError`` for NaN/inf). It never hangs and never raises anything else for a
  peer's fault.
- ``members()`` is this node's current view of the other live peers (peer ids, never
  itself); it may be stale by a few seconds: a member that vanished only makes its
  exchange fail.
- The handler is called in a worker thread, never in the network loop, possibly while the
  owner is training: it takes the owner's lock itself. Whatever it raises is answered as a
  typed error; a member whose handler is not installed yet answers ``overloaded`` (try later).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

KINDS = ("elastic", "gossip_push", "gossip_pull", "grads", "consensus")
MAX_ROUND = 2**62


@dataclass(frozen=True)
class Exchange:
    """One request from an averager to one peer.

    ``kind``: ``elastic`` (symmetric elastic pull: the peer answers with its parameters as
    they were, then moves towards the sender's by ``alpha``), ``gossip_push`` (the peer
    averages the sender's parameters into its own; empty answer), ``gossip_pull`` (the peer
    answers with its parameters; the sender averages them in), ``grads`` (the sender's
    gradients for round ``round``; the peer files them for its own all-reduce of that
    round; empty answer), ``consensus`` (the end-of-run agreement, ``consensus.py``: like
    ``elastic`` with alpha at most 1/2, taken by every method). ``round`` is the sender's
    step counter. ``tensors``: the parameters or gradients carried (checked against the
    receiver's own before use).
    """

    kind: str
    round: int
    tensors: list[torch.Tensor] = field(default_factory=list)
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"exchange kind must be one of {KINDS}, not {self.kind!r}")
        if not 0 <= self.round <= MAX_ROUND:
            raise ValueError(f"round must be in [0, {MAX_ROUND}]")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")


# handler(sender_peer_id, exchange) -> reply tensors; raises a RemoteError to refuse
ExchangeHandler = Callable[[str, Exchange], list[torch.Tensor]]


class AveragingGroup(Protocol):
    """The peers one averager talks to (see the module docstring for the contract)."""

    @property
    def me(self) -> str:
        """This member's peer id."""
        ...

    def members(self) -> list[str]:
        """The other live members, as currently known (never ``me``)."""
        ...

    def serve(self, handler: ExchangeHandler) -> None:
        """Answer other members' exchanges with ``handler`` from now on."""
        ...

    def exchange(self, peer: str, request: Exchange, timeout: float) -> list[torch.Tensor]:
        """Send ``request`` to ``peer`` and return its answer (see the contract)."""
        ...

    def close(self) -> None:
        """Leave the group: stop answering and stop being listed."""
        ...


# submit(sender_peer_id, request_frames, reply): answer by calling reply(frames) once, from any
# thread; must not block (hand the work to a worker thread).
ChannelSubmit = Callable[[str, list, Callable[[list], None]], None]


class PeerChannel(Protocol):
    """Carries averaging frames between two hosts: a trainer's ``ClientNode`` or a volunteer
    daemon's ``NetworkService`` implement it over libp2p streams (protocol
    ``/volunteer/averaging/1.0.0``). ``SwarmGroup`` is built on one, so trainers and the
    daemon's replicas of one expert share every byte of the averaging path."""

    def request(self, peer: str, addrs: Sequence[str], frames: list[bytes],
                timeout: float) -> list[bytes]:
        """Send one message to ``peer`` (reached by ``addrs`` if not connected) and return its
        reply frames within ``timeout`` s; ``RemoteTimeoutError`` / ``UnreachableError``
        otherwise."""
        ...

    def serve(self, submit: ChannelSubmit) -> None:
        """Hand every inbound averaging message to ``submit`` (peer id authenticated by the
        connection, never taken from the message)."""
        ...
