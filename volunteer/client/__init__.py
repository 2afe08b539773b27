"""Trainer-side client library: RemoteExpert, RemoteMixtureOfExperts and beam search over
the expert grid. Needs only ``volunteer.net`` and ``volunteer.wire``; never imports server code.

Files:

- ``remote_expert.py``: ``RemoteExpert``, one remote expert as a torch module (autograd),
  with adaptive per-call deadlines.
- ``inflight.py``: ``InFlight``, up to ``max_in_flight`` calls (forward, backward or whole
  training steps) to one expert outstanding at once, so a long round trip does not idle
  the volunteer; bounded (submitting blocks when full).
- ``latency.py``: ``LatencyTracker``, a moving percentile of each server's latency and the
  deadline it implies (the configured timeout until a server has a history).
- ``zmq_transport.py``: ``ZmqTransport``, the direct TCP ``Transport`` (a pool of ZMTP
  connections to a ZeroMQ ROUTER frontend).
- ``directory.py``: the ``ExpertDirectory`` protocol (children/resolve) and
  ``StaticDirectory`` (fixed mapping, or built from endpoints with the ``info`` op).
- ``beam_search.py``: ``beam_search``, the best alive experts per sample over the grid.
- ``gating.py``: ``GridGate`` (per-dimension scores), ``expert_logits``, ``masked_softmax``.
- ``dispatch.py``: the parallel forward/backward of all expert calls as one autograd node,
  with deadlines, ``k_min`` and ``timeout_after_k_min``.
- ``moe.py``: ``RemoteMixtureOfExperts``, the layer; ``NotEnoughExpertsError``.
- ``node.py``: ``ClientNode``: the trainer's peer (DHT client, no experts) that reaches
  NATed volunteers by itself (relay circuits + DCUtR via ``NatTraversal``).
- ``dht_directory.py``: ``DhtDirectory``: the ``ExpertDirectory`` over the DHT.
- ``node_channel.py``: ``ClientNode``'s averaging side (channel, exchange server, groups,
  relay reservations so that NATed trainers can be reached).
- ``averaging/``: decentralized averaging (methods, ``Averager``, ``CollaborativeOptimizer``,
  groups in one process or over the swarm); see its ``__init__``.
- ``server_choice.py``: choosing among a uid's servers by client-side measurements, not
  by the load a server reports about itself.

The main names are importable from here; submodules load on first access (no import-time work).

A trainer in a few lines (the values come from the experiment's manifest: ``volunteer manifest
check FILE`` prints them)::

    from volunteer.client import ClientNode, RemoteMixtureOfExperts

    with ClientNode("example-lm", bootstrap=[...]) as node:       # experiment.name, bootstrap
        moe = RemoteMixtureOfExperts(1024, (32, 32), "lm.layer12.ffn", node.directory(),
                                     k_best=4, k_min=1, timeout_after_k_min=0.2,
                                     forward_timeout=10, backward_timeout=15,
                                     compression="fp16")           # wire.compression
        y = moe(x)  # x: (..., 1024); trains like any layer

Each class's docstring explains every argument and when to change it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from volunteer.client.dht_directory import DhtDirectory
    from volunteer.client.directory import ExpertDirectory, StaticDirectory
    from volunteer.client.inflight import InFlight
    from volunteer.client.latency import LatencyTracker
    from volunteer.client.moe import NotEnoughExpertsError, RemoteMixtureOfExperts
    from volunteer.client.node import ClientNode
    from volunteer.client.remote_expert import RemoteExpert

__all__ = [
    "ClientNode",
    "DhtDirectory",
    "ExpertDirectory",
    "InFlight",
    "LatencyTracker",
    "NotEnoughExpertsError",
    "RemoteExpert",
    "RemoteMixtureOfExperts",
    "StaticDirectory",
]

_LAZY = {
    "ClientNode": "volunteer.client.node",
    "DhtDirectory": "volunteer.client.dht_directory",
    "ExpertDirectory": "volunteer.client.directory",
    "StaticDirectory": "volunteer.client.directory",
    "InFlight": "volunteer.client.inflight",
    "LatencyTracker": "volunteer.client.latency",
    "NotEnoughExpertsError": "volunteer.client.moe",
    "RemoteMixtureOfExperts": "volunteer.client.moe",
    "RemoteExpert": "volunteer.client.remote_expert",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'volunteer.client' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
