"""Gating for a grid of experts: per-dimension scores, expert logits, masked softmax.

The gate is one linear layer producing ``sum(grid_size)`` scores, split into one score
vector per grid dimension (the factorised gate of Learning@home): an expert at coordinates
``(i, j)`` has logit ``s0[i] + s1[j]``. After the remote calls, the softmax is taken only
over the experts that actually answered (``masked_softmax``), so dropping a late or failed
expert renormalises the mixture weights of the rest, and gradients reach the gate through
the logits of the answering experts only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["GridGate", "expert_logits", "masked_softmax"]


class GridGate(nn.Module):
    """``x (..., in_features) -> [scores for dim 0 (..., d0), scores for dim 1, ...]``: one
    linear layer with ``sum(grid_size)`` outputs, the trainable part of a
    ``RemoteMixtureOfExperts`` that lives on the trainer. ``in_features``: the hidden size;
    ``grid_size``: the expert grid's shape (the manifest's ``grid.dims``). Used by the layer
    itself; build one directly only to gate a custom mixture."""

    def __init__(self, in_features: int, grid_size: Sequence[int]):
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if not grid_size or any(int(d) < 1 for d in grid_size):
            raise ValueError(f"grid_size must be non-empty positive sizes, got {grid_size!r}")
        self.grid_size = tuple(int(d) for d in grid_size)
        self.proj = nn.Linear(in_features, sum(self.grid_size))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One score tensor ``(..., d_i)`` per grid dimension."""
        return list(torch.split(self.proj(x), self.grid_size, dim=-1))


def expert_logits(grid_scores: Sequence[torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
    """Logits of chosen experts: ``coords (batch, k, ndim)`` -> ``(batch, k)``.

    ``logit[b, e] = sum_i grid_scores[i][b, coords[b, e, i]]``; differentiable w.r.t. the
    scores. Padding slots may hold any valid coordinate (e.g. 0): mask them afterwards.
    """
    if coords.dim() != 3 or coords.shape[2] != len(grid_scores):
        raise ValueError(f"coords must be (batch, k, {len(grid_scores)}), got {tuple(coords.shape)}")
    total = None
    for i, scores in enumerate(grid_scores):
        picked = torch.gather(scores, 1, coords[:, :, i])
        total = picked if total is None else total + picked
    assert total is not None
    return total


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of ``logits`` along ``dim`` over the entries where ``mask`` (same shape) is
    True; masked entries get exactly 0.

    A row with no True entry gets all zeros (no NaN), so a caller may check ``k_min`` and
    still backpropagate safely.
    """
    if logits.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ")
    mask = mask.to(torch.bool)
    filled = logits.masked_fill(~mask, float("-inf"))
    row_max = filled.amax(dim=dim, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(filled - row_max) * mask
    denom = exp.sum(dim=dim, keepdim=True)
    return exp / denom.clamp_min(torch.finfo(exp.dtype).tiny)
