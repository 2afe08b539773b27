"""``RemoteExpert``: a ``torch.nn.Module`` whose forward and backward run on a server.

``forward(*inputs)`` sends a forward request (flagged "will backward" when autograd is
recording, so the server may keep the activations) and returns the output; autograd's
backward sends the output gradient and the forward's request id and returns the input
gradients; the server applies its optimizer step. When the forward's reply said the server
cached the activations, the backward omits the inputs (half the upload); if the server
lost them meanwhile ("cache_miss"), it is sent again with the inputs. A zero-size dummy parameter
makes sure backward reaches the server even when no input requires grad (the expert
still learns). Server errors are raised as the typed ``volunteer.wire.errors`` exceptions.

Deadlines adapt (``latency.py``): each call waits ``tracker.deadline((server, op),
timeout)``, the configured ``timeout`` until the server has a history, then a multiple of
the latency it showed (a moving percentile), never more than ``timeout``; the same value
travels in the request header (``ttl``) so the server drops work nobody waits for. Every
answered call and every timeout is observed. ``adaptive=False`` keeps one fixed timeout.
Several calls may be in flight at once from several threads (``inflight.py`` keeps a
bounded number outstanding for a trainer).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import torch
from torch import nn

from volunteer.client.latency import LatencyTracker, default_tracker, endpoint_key
from volunteer.client.zmq_transport import ZmqTransport
from volunteer.wire.errors import CacheMissError, RemoteTimeoutError
from volunteer.wire.limits import WireLimits
from volunteer.wire.messages import Reply, decode_reply, encode_request
from volunteer.wire.tensors import COMPRESSIONS
from volunteer.wire.transport import Transport

CLIENT_LIMITS = WireLimits(
    max_header_bytes=1 << 20, max_tensors=64, max_elements=2**31, max_bytes=2**33
)


_ids = random.Random(int.from_bytes(os.urandom(16), "little"))
# a forked child must not repeat its parent's ids
os.register_at_fork(after_in_child=lambda: _ids.seed(int.from_bytes(os.urandom(16), "little")))


def new_request_id() -> int:
    """A random 64-bit request id (collisions across clients are negligible)."""
    return _ids.getrandbits(64)


class RemoteExpert(nn.Module):
    """Proxy of expert ``uid`` served at ``endpoint`` (``tcp://host:port`` or a Transport):
    call it like a local module; its backward trains the remote expert. Use it directly to
    talk to one known expert (tests, benchmarks, a fixed pipeline); ``RemoteMixtureOfExperts``
    builds these itself for the experts beam search picks.

    Args:
        uid: the expert's uid (``<grid prefix>.<i>.<j>``), as the volunteer hosts it.
        endpoint: ``tcp://host:port`` of a volunteer's ZeroMQ frontend (a transport is then
            created and owned: ``close()`` closes it), or a ``Transport`` you own, e.g.
            ``ClientNode.transport(peer_id, addrs)`` for a volunteer behind a NAT.
        timeout: the longest any call waits, in seconds (default 30). Raise it for large
            batches on slow links; lower it to give up on slow volunteers sooner.
        compression: how tensors travel: None (as computed), ``"fp16"`` / ``"bf16"`` (half
            the bytes of float32), ``"int8"`` (a quarter, blockwise quantised). Use fp16 when
            the link, not the volunteer, is the bottleneck; replies come back the same way.
        adaptive: True (default): each call waits a multiple of the latency this server showed
            lately, never more than ``timeout``, so a vanished server costs less than a full
            timeout. False: always wait ``timeout`` (reproducible benchmarks).
        latency: the ``LatencyTracker`` learning each server's latency (default: the
            process-wide one, shared by every proxy of the same server); pass your own to
            isolate experiments in one process.
    """

    def __init__(
        self,
        uid: str,
        endpoint: str | Transport,
        timeout: float = 30.0,
        compression: str | None = None,
        *,
        adaptive: bool = True,
        latency: LatencyTracker | None = None,
    ) -> None:
        super().__init__()
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; use one of {COMPRESSIONS}")
        self.uid = uid
        self._owns_transport = isinstance(endpoint, str)
        self.transport: Transport = (
            ZmqTransport(endpoint) if isinstance(endpoint, str) else endpoint
        )
        self.timeout = timeout
        self.compression = compression
        self.latency: LatencyTracker | None = (
            (latency if latency is not None else default_tracker()) if adaptive else None
        )
        self._dummy = nn.Parameter(torch.empty(0), requires_grad=True)

    def close(self) -> None:
        """Close the transport if this expert created it (a passed-in one is the caller's)."""
        if self._owns_transport:
            self.transport.close()

    def extra_repr(self) -> str:
        """The uid and transport, shown by ``print(model)``."""
        return f"uid={self.uid!r}, transport={self.transport!r}"

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Run the expert remotely on ``inputs`` (batch first, per-sample shapes as the
        expert's ``input_shapes``); raises the typed ``volunteer.wire.errors`` exception of
        a failed call. Under autograd the server keeps the activations for the backward."""
        will_backward = torch.is_grad_enabled()
        return _RemoteCall.apply(self._dummy, self, will_backward, *inputs)

    def deadline(self, op: str = "forward") -> float:
        """Seconds the next ``op`` call will wait for its reply (see the module docstring)."""
        if self.latency is None:
            return self.timeout
        return self.latency.deadline(endpoint_key(self.transport, op), self.timeout)

    def call(self, op: str, tensors: list[torch.Tensor], **fields: Any) -> list[torch.Tensor]:
        """One request/reply round trip; returns the reply tensors or raises a typed error."""
        return self.call_reply(op, tensors, **fields).tensors

    def call_reply(self, op: str, tensors: list[torch.Tensor], **fields: Any) -> Reply:
        """Like :meth:`call`, returning the whole decoded reply."""
        request_id = fields.pop("request_id", None) or new_request_id()
        timeout = self.deadline(op)
        frames = encode_request(
            op,
            self.uid,
            tensors,
            request_id=request_id,
            timeout=timeout,
            compression=self.compression,
            **fields,
        )
        tracker = self.latency
        start = time.monotonic()
        try:
            reply = self.transport.request(frames, timeout)
        except RemoteTimeoutError:
            if tracker is not None:
                tracker.observe_timeout(endpoint_key(self.transport, op), time.monotonic() - start)
            raise
        if tracker is not None:
            tracker.observe(endpoint_key(self.transport, op), time.monotonic() - start)
        return decode_reply(reply, CLIENT_LIMITS)


class _RemoteCall(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        dummy: torch.Tensor,
        expert: RemoteExpert,
        will_backward: bool,
        *inputs: torch.Tensor,
    ) -> torch.Tensor:
        fid = new_request_id()
        cpu_inputs = [x.detach() if x.device.type == "cpu" else x.detach().cpu() for x in inputs]
        reply = expert.call_reply(
            "forward", cpu_inputs, request_id=fid, will_backward=will_backward
        )
        if len(reply.tensors) != 1:
            raise RuntimeError(f"server returned {len(reply.tensors)} outputs, expected 1")
        out = reply.tensors[0]
        ctx.expert, ctx.fid, ctx.cached = expert, fid, reply.cached
        ctx.devices = [(x.device, x.dtype) for x in inputs]
        ctx.save_for_backward(*cpu_inputs)
        if inputs and inputs[0].device != out.device:
            out = out.to(inputs[0].device)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        grad = grad_output.detach()
        if grad.device.type != "cpu":
            grad = grad.cpu()
        grads = None
        if ctx.cached:
            try:
                grads = ctx.expert.call(
                    "backward", [grad], forward_id=ctx.fid, inputs_included=False
                )
            except CacheMissError:
                grads = None
        if grads is None:  # not cached on the server (or lost since): send the inputs again
            grads = ctx.expert.call("backward", [*ctx.saved_tensors, grad], forward_id=ctx.fid)
        if len(grads) != len(ctx.devices):
            raise RuntimeError(
                f"server returned {len(grads)} gradients for {len(ctx.devices)} inputs"
            )
        return (
            None,
            None,
            None,
            *(
                g if g.device == d and g.dtype == t else g.to(device=d, dtype=t)
                for g, (d, t) in zip(grads, ctx.devices, strict=True)
            ),
        )
