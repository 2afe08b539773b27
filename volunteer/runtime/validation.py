"""Check a decoded request against the expert it names and turn it into a ``Task``.

Arity, per-sample shapes, batch size (1..max_batch_size), the backward's gradient shape and
finiteness (no NaN or infinity in any tensor: one request must not poison an expert for
everybody) are validated here, before the request is queued, so a bad request is answered at
once (``BadRequestError`` / ``NonFiniteError`` / ``TooLargeError`` / ``GradientNormError``)
and never reaches the compute thread.

Gradient-norm bound (``ServingLimits.max_grad_norm``, the manifest's
``serving.max_grad_norm``; off when None): a backward is refused when the L2 norm of the
output gradient of *any one sample* exceeds the bound. Per sample rather than per request
because the verdict must not depend on how a trainer batches: a request's total norm grows
with the square root of its batch size, so one per-request number would either refuse honest
large batches or let a small batch carry outsized per-sample gradients, while a sample's norm
means the same in a batch of 1 or of 1024. The norms are computed in float64 (an fp16 or fp32
gradient cannot overflow the check itself); the cost is one reduction over the gradient.
"""

from __future__ import annotations

import math

import torch

from volunteer.experts.backend import ExpertBackend
from volunteer.runtime.limits import ServingLimits
from volunteer.runtime.task_pool import ReplyFn, Task
from volunteer.wire.errors import BadRequestError, GradientNormError, NonFiniteError, TooLargeError
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
        if t.is_floating_point() and t.numel() and not _finite(t):
            what = f"input {i}" if i < n_in else "the output gradient"
            raise NonFiniteError(f"{what} of {request.op} to {request.uid} holds NaN or infinite values; refused")
    if grads and limits.max_grad_norm is not None:
        check_grad_norm(grads[0], rows, limits.max_grad_norm, request.uid)
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
        restores=list(request.restores) if any(request.restores) else [],
    )


def _finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``: its min and max are finite (``aminmax`` propagates NaN).
    One pass in the tensor's own dtype with no temporary (a 32 MB float32 tensor in ~3.6 ms
    and a 16 MB float16 one in ~2.5 ms on one core, where a float32 sum of the float16
    tensor took 37 ms), and unlike a sum it never refuses large finite values."""
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def check_grad_norm(grad: torch.Tensor, rows: int, bound: float, uid: str) -> None:
    """Raise ``GradientNormError`` when any sample's output-gradient L2 norm exceeds ``bound``
    (see module docstring for why per sample)."""
    norms = torch.linalg.vector_norm(grad.reshape(rows, -1).to(torch.float64), dim=1)
    worst, at = torch.max(norms, dim=0)
    value = float(worst.item())
    if not value <= bound:  # also catches NaN
        raise GradientNormError(
            f"output gradient of sample {int(at.item())} of backward to {uid} has L2 norm {value:.4g} "
            f"> serving.max_grad_norm {bound:g}; refused (scale or clip the gradient)"
        )
