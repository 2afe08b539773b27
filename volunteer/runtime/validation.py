"""Check a decoded request against the expert it names and turn it into a ``Task``.

Arity, per-sample shapes, batch size (1..max_batch_size), the backward's gradient shape and
finiteness (no NaN or infinity in any tensor: one request must not poison an expert for
everybody) are validated here, before the request is queued, so a bad request is answered at
once (``BadRequestError`` / ``NonFiniteError`` / ``TooLargeError``) and never reaches the
compute thread.
"""

from __future__ import annotations

import math

from volunteer.experts.backend import ExpertBackend
from volunteer.runtime.limits import ServingLimits
from volunteer.runtime.task_pool import ReplyFn, Task
from volunteer.wire.errors import BadRequestError, NonFiniteError, TooLargeError
from volunteer.wire.messages import Request


def validate_request(
    request: Request, backend: ExpertBackend, limits: ServingLimits, reply: ReplyFn, now: float
) -> Task:
    """A queued-ready Task, or a typed error describing what is wrong."""
    n_in = len(backend.input_shapes) if request.inputs_included else 0
    expected = n_in if request.op == "forward" else n_in + 1
    if len(request.tensors) != expected:
        what = "inputs" if request.op == "forward" else "inputs + output gradient"
        if not request.inputs_included:
            what = "output gradient only: inputs omitted"
        raise BadRequestError(
            f"{request.op} of {request.uid} takes {expected} tensors ({what}), "
            f"got {len(request.tensors)}"
        )
    inputs = request.tensors[:n_in]
    first = request.tensors[0]
    rows = first.shape[0] if first.dim() > 0 else 0
    for i, (x, sample) in enumerate(zip(inputs, backend.input_shapes, strict=False)):
        if tuple(x.shape[1:]) != tuple(sample) or x.dim() != len(sample) + 1:
            raise BadRequestError(
                f"input {i} of {request.uid} must have shape "
                f"[batch, {', '.join(map(str, sample))}], got {list(x.shape)}"
            )
        if x.shape[0] != rows:
            raise BadRequestError("all inputs must have the same batch size")
    if rows < 1:
        raise BadRequestError("batch must hold at least one sample")
    if rows > limits.max_batch_size:
        raise TooLargeError(
            f"batch of {rows} samples > max_batch_size {limits.max_batch_size}; split it"
        )
    grads = request.tensors[n_in:]
    if grads and tuple(grads[0].shape) != (rows, *backend.output_shape):
        raise BadRequestError(
            f"output gradient of {request.uid} must have shape {[rows, *backend.output_shape]}, got {list(grads[0].shape)}"
        )
    if request.op == "forward" and request.forward_id is not None:
        raise BadRequestError("fid is only valid on backward requests")
    for i, t in enumerate(request.tensors):
        # one reduction per tensor (~4 us for 32x1024): NaN or inf anywhere makes the sum non-finite
        # (so does a sum beyond float range: values that large would wreck the expert as well)
        if t.is_floating_point() and not math.isfinite(t.sum().item()):
            what = f"input {i}" if i < n_in else "the output gradient"
            raise NonFiniteError(f"{what} of {request.op} to {request.uid} holds NaN or infinite values; refused")
    ttl = request.ttl if request.ttl is not None else limits.default_ttl_s
    return Task(
        uid=request.uid,
        op=request.op,
        request_id=request.request_id,
        inputs=list(inputs),
        reply=reply,
        deadline=now + ttl,
        enqueued=now,
        rows=rows,
        grad_outputs=list(grads),
        will_backward=request.will_backward and request.op == "forward",
        forward_id=request.forward_id,
        compression=request.compression,
        nbytes=sum(t.numel() * t.element_size() for t in request.tensors),
    )
