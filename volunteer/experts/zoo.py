"""The expert zoo: the sub-networks a volunteer can host. Plain ``torch.nn.Module`` classes,
each with ``input_shapes`` (per-sample shapes of its inputs, batch dimension excluded).

- ``FeedForwardExpert`` ("ffn"): Linear(h, 4h) -> GELU(tanh) -> Linear(4h, h) -> LayerNorm(x + out),
  the block hivemind / Learning@home benchmark with. Input: (h,) per sample.
- ``TransformerExpert`` ("transformer"): one pre-built encoder block (d_model h, 16 heads by
  default, feed-forward 4h, no dropout so that a recomputed forward equals the original).
  Input: (seq_len, h) per sample with a fixed ``seq_len`` (default 64): one fixed schema keeps
  validation and batching simple; ``h`` must be divisible by ``num_heads``.
- ``NopExpert`` ("nop"): returns (a view of) its input; measures pure framework overhead.
  No parameters.

Other architectures come from plug-in packages (``registry.py``: the ``volunteer.experts``
entry point group), with the same contract as these classes: ``cls(hidden_dim, **options)``
returns an ``nn.Module`` with ``input_shapes``; forward must be deterministic (no dropout),
because the backward recomputes it; parameters are created in ``__init__`` from torch's
default generator, which the daemon seeds per uid so that every node builds the same init.
"""

from __future__ import annotations

import torch
from torch import nn


class FeedForwardExpert(nn.Module):
    """Residual feed-forward block with post-LayerNorm."""

    def __init__(self, hidden_dim: int, expansion: int = 4) -> None:
        super().__init__()
        self.input_shapes = [(hidden_dim,)]
        self.fc1 = nn.Linear(hidden_dim, expansion * hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(expansion * hidden_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


class TransformerExpert(nn.Module):
    """One transformer encoder block over a (seq_len, h) sample."""

    def __init__(
        self, hidden_dim: int, num_heads: int = 16, seq_len: int = 64, expansion: int = 4
    ) -> None:
        super().__init__()
        if num_heads <= 0 or hidden_dim % num_heads != 0:
            raise ValueError(
                f"transformer expert: hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}; "
                f"pick a hidden_dim that is a multiple of {num_heads} or set num_heads"
            )
        if seq_len <= 0:
            raise ValueError(f"transformer expert: seq_len must be positive, got {seq_len}")
        self.input_shapes = [(seq_len, hidden_dim)]
        self.block = nn.TransformerEncoderLayer(
            d_model=hidden_dim,
            nhead=num_heads,
            dim_feedforward=expansion * hidden_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class NopExpert(nn.Module):
    """Identity: the output is a view of the input (a new tensor object with its own autograd
    node, so gradients flow through, but no copy and no kernel in forward or backward: the
    nop expert measures framework overhead, not memory traffic)."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.input_shapes = [(hidden_dim,)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)
