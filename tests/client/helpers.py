"""Helpers for client tests: in-process stand-in experts for pure-logic tests, a reference
(local, non-remote) mixture to compare the remote one against, and a real expert server."""

from __future__ import annotations

import threading

import torch
from torch import nn

from volunteer.client.directory import make_uid
from volunteer.client.gating import GridGate


class Token:
    """A stand-in transport: logic tests route calls through ``expert_factory`` instead."""

    def __init__(self, name: str = "token"):
        self.name = name

    def request(self, frames, timeout):
        raise AssertionError("logic tests must not send requests")

    def close(self):
        pass


class _BarrierGrad(torch.autograd.Function):
    """Identity whose backward waits on a barrier (proves backward calls overlap)."""

    @staticmethod
    def forward(ctx, x, barrier):
        ctx.barrier = barrier
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.barrier.wait()
        return grad, None


class LocalExpert(nn.Module):
    """A local expert with knobs: fail with an error, block until released, count calls."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.fail_with: Exception | None = None
        self.release: threading.Event | None = None
        self.forward_barrier: threading.Barrier | None = None
        self.backward_barrier: threading.Barrier | None = None
        self.calls = 0
        self.rows_seen: list[int] = []
        self.grad_modes: list[bool] = []

    def forward(self, x):
        self.calls += 1
        self.rows_seen.append(x.shape[0])
        self.grad_modes.append(torch.is_grad_enabled())
        if self.forward_barrier is not None:
            self.forward_barrier.wait()
        if self.release is not None:
            self.release.wait(timeout=30)
        if self.fail_with is not None:
            raise self.fail_with
        out = self.module(x)
        if self.backward_barrier is not None:
            out = _BarrierGrad.apply(out, self.backward_barrier)
        return out


def make_experts(prefix: str, cells, hidden: int, seed: int = 0) -> dict[str, LocalExpert]:
    torch.manual_seed(seed)
    return {
        make_uid(prefix, c): LocalExpert(
            nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.Tanh(), nn.Linear(2 * hidden, hidden))
        )
        for c in cells
    }


def reference_moe(gate: GridGate, experts: dict, prefix: str, x: torch.Tensor, k: int,
                  drop: frozenset = frozenset()):
    """Brute force: top-k alive experts per sample by summed grid score, softmax over them
    (minus the dropped ones), weighted sum of local expert outputs."""
    scores = gate(x)
    rows = []
    for b in range(x.shape[0]):
        ranked = []
        for uid, expert in experts.items():
            coords = tuple(int(p) for p in uid[len(prefix) + 1:].split("."))
            logit = sum(scores[i][b, c] for i, c in enumerate(coords))
            ranked.append((-float(logit.detach()), coords, uid, logit, expert))
        ranked.sort(key=lambda t: (t[0], t[1]))
        chosen = [t for t in ranked[:k] if t[2] not in drop]
        logits = torch.stack([t[3] for t in chosen])
        weights = torch.softmax(logits, 0)
        outs = torch.stack([t[4].module(x[b:b + 1])[0] for t in chosen])
        rows.append((weights[:, None] * outs).sum(0))
    return torch.stack(rows)


class ExpertServer:
    """A real ``Runtime`` + ``ZmqFrontend`` on loopback hosting ffn experts."""

    def __init__(self, uids, hidden: int, lr: float = 1e-3, seed: int = 0):
        from volunteer.experts.backend import ExpertBackend, OptimizerSpec
        from volunteer.runtime.limits import ServingLimits
        from volunteer.runtime.runtime import Runtime
        from volunteer.runtime.zmq_frontend import ZmqFrontend

        torch.manual_seed(seed)
        self.backends = {u: ExpertBackend(u, "ffn", hidden, OptimizerSpec(lr=lr)) for u in uids}
        self.runtime = Runtime(self.backends, ServingLimits())
        self.frontend = ZmqFrontend(self.runtime)
        self.runtime.start()
        try:
            self.frontend.start()
        except BaseException:
            self.runtime.stop()
            raise
        self.endpoint = self.frontend.endpoint
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.frontend.stop()
            self.runtime.stop()
