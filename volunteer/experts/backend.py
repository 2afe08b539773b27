"""``ExpertBackend``: one hosted expert = module + optimizer + count of updates applied.

The runtime calls three primitives, all on the backend's device:

- ``forward(inputs)``: inference under ``no_grad`` (answers a forward nobody will backward).
- ``forward_graph(inputs)``: forward that records an autograd graph which can be kept in the
  activation cache and differentiated later (``ForwardGraph``).
- ``gradients(graph, grad_outputs)`` then ``apply_gradients(param_grads)``: input gradients
  for the caller and one optimizer step per backward batch.

Cached graphs and optimizer steps: the optimizer updates *aliases* of the parameters
(``p.data``: same storage, separate autograd version counter), so an optimizer step taken
between a forward and its backward does not invalidate the cached graph (autograd would
otherwise refuse: "modified by an inplace operation"), and the forward runs the plain
module (no re-parametrisation cost). The backward then mixes activations computed with the
weights at forward time with the current weights (the staleness of the steps taken in
between); asynchronous DMoE training tolerates this, just as it tolerates the gradient of a
recomputed forward arriving after other updates.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from volunteer.experts.registry import build_expert
from volunteer.wire.tensors import dtype_name

OPTIMIZERS = ("adam", "sgd")

# torch.autograd.grad's engine entry point (private; absent in some torch version: fall back).
# Calling it directly saves ~20-60 us of Python argument handling per backward batch, which
# is most of the server's cost for small batches; shapes/dtypes are checked by the caller.
_run_backward = getattr(getattr(torch.autograd, "graph", None), "_engine_run_backward", None)


def expert_seed(experiment_seed: int, uid: str) -> int:
    """The init seed of ``uid``: two nodes that start the same fresh expert start it bitwise equal."""
    digest = hashlib.sha256(f"{int(experiment_seed)}\x00{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class OptimizerSpec:
    """Which optimizer each hosted expert uses, and how."""

    name: str = "adam"
    lr: float = 1e-3
    clip_grad_norm: float | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; use one of {', '.join(OPTIMIZERS)}")
        if not self.lr >= 0:
            raise ValueError(f"optimizer lr must be >= 0, got {self.lr}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError("clip_grad_norm must be positive or None")

    def build(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        """The torch optimizer over ``params`` (None when there is nothing to train)."""
        if not params:
            return None
        if self.name == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        try:  # fused Adam: ~10x faster than the default foreach one on CPU (8M params: 11 vs 127 ms)
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass(slots=True)
class ForwardGraph:
    """A recorded forward: leaf inputs, parameter aliases and the outputs built from them."""

    inputs: list[torch.Tensor]
    params: list[torch.Tensor]
    output: torch.Tensor
    nbytes: int = 0


class ExpertBackend:
    """Module + optimizer + ``updates_applied`` for one expert uid."""

    def __init__(
        self,
        uid: str,
        kind: str,
        hidden_dim: int,
        optimizer: OptimizerSpec | None = None,
        device: str = "cpu",
        seed: int | None = None,
        **expert_options: object,
    ) -> None:
        self.uid = uid
        self.kind = kind
        self.hidden_dim = hidden_dim
        self.device = torch.device(device)
        self.on_cpu = self.device.type == "cpu"  # read per batch on the hot path
        self.optimizer_spec = optimizer or OptimizerSpec()
        if seed is None:
            module = build_expert(kind, hidden_dim, **expert_options)
        else:  # deterministic init: the same bits on every node (built on the CPU's generator)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = build_expert(kind, hidden_dim, **expert_options)
        self.module = module.to(self.device)
        self.module.eval()  # no dropout / batch statistics: forward is deterministic
        self.input_shapes: list[tuple[int, ...]] = [tuple(s) for s in self.module.input_shapes]
        self.dtype = torch.float32
        self._params = [p for p in self.module.parameters() if p.requires_grad]
        # the optimizer steps aliases (see module docstring); same storage as the module's weights
        self._opt_params = [p.data for p in self._params]
        self.optimizer = self.optimizer_spec.build(self._opt_params)
        self._updates = 0  # steps taken, less the skips already read back from the device
        self._skipped = 0  # optimizer steps refused for non-finite gradients (read back)
        # CUDA: skips are counted on the device (no host sync per step) and read on demand
        self._skips_dev: torch.Tensor | None = None
        self._skips_seen = 0
        self._skips_lock = threading.Lock()
        self.output_shape, self.activation_bytes_per_sample = self._calibrate()

    def _calibrate(self) -> tuple[tuple[int, ...], int]:
        """Per-sample output shape and bytes of saved activations (tiny dry run, batch 2)."""
        sample = [
            torch.zeros((2, *s), dtype=self.dtype, device=self.device) for s in self.input_shapes
        ]
        saved: dict[int, int] = {}
        param_ptrs = {p.data_ptr() for p in self._params}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in param_ptrs:
                saved[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            graph = self.forward_graph(sample)
        out_shape = tuple(graph.output.shape[1:])
        per_sample = (sum(saved.values()) + sum(x.numel() * x.element_size() for x in sample)) // 2
        self.gradients(
            graph, torch.zeros_like(graph.output)
        )  # also warms autograd's lazy imports (~0.6 s)
        return out_shape, max(per_sample, 1)

    # -- compute primitives (called by the runtime's executor thread only) --

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inference forward without an autograd graph."""
        with torch.no_grad():
            return self.module(*inputs)

    def forward_graph(self, inputs: Sequence[torch.Tensor]) -> ForwardGraph:
        """Forward that records an autograd graph, to be differentiated by :meth:`gradients`."""
        leaves = [x.detach().requires_grad_(True) for x in inputs]
        if torch.is_grad_enabled():  # the usual case in the runtime's thread
            out = self.module(*leaves)
        else:
            with torch.enable_grad():
                out = self.module(*leaves)
        return ForwardGraph(inputs=leaves, params=self._params, output=out)

    def gradients(
        self, graph: ForwardGraph, grad_output: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """(input grads, parameter grads) of ``graph`` for ``grad_output``; frees the graph."""
        wrt = [*graph.inputs, *graph.params]
        if not graph.output.requires_grad:  # e.g. nothing differentiable: zero grads
            return [torch.zeros_like(x) for x in graph.inputs], [None] * len(graph.params)
        if (
            _run_backward is not None
            and grad_output.shape == graph.output.shape
            and grad_output.dtype == graph.output.dtype
            and grad_output.device == graph.output.device
        ):  # what torch.autograd.grad runs, minus its per-call argument normalisation
            grads = _run_backward(
                (graph.output,),
                (grad_output,),
                False,
                False,
                tuple(wrt),
                True,
                accumulate_grad=False,
            )
        else:  # the public path (also raises the proper error on mismatched gradients)
            grads = torch.autograd.grad(graph.output, wrt, grad_output, allow_unused=True)
        n = len(graph.inputs)
        in_grads = [
            g if g is not None else torch.zeros_like(x)
            for g, x in zip(grads[:n], graph.inputs, strict=True)
        ]
        return in_grads, list(grads[n:])

    def apply_gradients(self, param_grads: Sequence[Sequence[torch.Tensor | None]]) -> None:
        """Sum the parameter gradients of one backward batch and take one optimizer step.

        A batch whose gradients are not finite (finite requests can still overflow) is
        skipped and counted in ``steps_skipped``: one step must not make a weight NaN. On a
        CUDA device with a fused optimizer the check costs no host synchronisation: the
        optimizer gets the verdict as a device tensor (``found_inf``, the hook AMP's grad
        scaler uses) and skips the step on the device; the skip count is read back when
        ``updates_applied`` / ``steps_skipped`` are read.
        """
        if self.optimizer is not None:
            for i, p in enumerate(self._opt_params):
                total = None
                for grads in param_grads:
                    g = grads[i]
                    if g is not None:
                        total = g if total is None else total + g
                p.grad = total
            present = [p.grad for p in self._opt_params if p.grad is not None]
            # one reduction per parameter: NaN or inf in any gradient makes the total non-finite
            total = torch.stack([g.sum() for g in present]).sum() if present else None
            if total is not None and self._step_on_device(total):
                self._updates += 1
                return
            # the host's verdict: one sync (~3 ms per 8M parameters on a CPU core)
            if total is not None and not math.isfinite(total.item()):
                self.optimizer.zero_grad(set_to_none=True)
                self._skipped += 1
                return
            if self.optimizer_spec.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(self._opt_params, self.optimizer_spec.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._updates += 1

    def _step_on_device(self, total: torch.Tensor) -> bool:
        """The sync-free step (CUDA + an optimizer that takes ``found_inf``), skipped on the
        device when ``total`` (the gradients' sum) is not finite; False if n/a."""
        opt = self.optimizer
        if self.on_cpu or not getattr(opt, "_step_supports_amp_scaling", False):
            return False
        found_inf = (~torch.isfinite(total)).float()
        if self.optimizer_spec.clip_grad_norm is not None:  # NaN norms only on skipped steps
            nn.utils.clip_grad_norm_(self._opt_params, self.optimizer_spec.clip_grad_norm)
        opt.grad_scale, opt.found_inf = None, found_inf
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        opt.zero_grad(set_to_none=True)
        if self._skips_dev is None:
            self._skips_dev = torch.zeros((), device=self.device)
        self._skips_dev.add_(found_inf)
        return True

    def _read_skips(self) -> None:
        """Fold the device's skip count into the host counters (one sync; any thread)."""
        if self._skips_dev is None:
            return
        with self._skips_lock:
            seen = int(self._skips_dev.item())
            new, self._skips_seen = seen - self._skips_seen, seen
            self._updates -= new
            self._skipped += new

    @property
    def updates_applied(self) -> int:
        """Optimizer steps taken (skipped non-finite ones excluded)."""
        self._read_skips()
        return self._updates

    @updates_applied.setter
    def updates_applied(self, value: int) -> None:
        self._read_skips()
        self._updates = int(value)

    @property
    def steps_skipped(self) -> int:
        """Optimizer steps refused because the batch's gradients were not finite."""
        self._read_skips()
        return self._skipped

    # -- description and persistence --

    def info(self, state: str) -> dict:
        """The entry of this expert in an ``info`` reply."""
        return {
            "kind": self.kind,
            "input_shapes": [list(s) for s in self.input_shapes],
            "dtype": dtype_name(self.dtype),
            "state": state,
        }

    def state_dict(self) -> dict:
        """Module weights, optimizer state and update count (torch tensors, for torch.save)."""
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "updates_applied": self.updates_applied,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` produced."""
        self.module.load_state_dict(state["module"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.updates_applied = int(state.get("updates_applied", 0))
