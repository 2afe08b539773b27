"""A small trainer for the integration tests: a 4-class toy task through a DMoE layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from volunteer.client.moe import NotEnoughExpertsError, RemoteMixtureOfExperts


class ToyTrainer:
    """``Linear -> ReLU -> moe -> Linear`` on 256 fixed random points; ``step()`` trains one batch."""

    def __init__(self, moe: RemoteMixtureOfExperts, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), moe, nn.Linear(64, 4))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=3e-3)
        self.x = torch.randn(256, 16)
        self.y = (self.x[:, :2].sum(1) > 0).long() + 2 * (self.x[:, 2] > 0).long()

    def step(self) -> float | None:
        """One optimizer step: its loss, or None when fewer than ``k_min`` experts answered."""
        idx = torch.randint(0, len(self.x), (64,))
        try:
            loss = F.cross_entropy(self.model(self.x[idx]), self.y[idx])
            self.opt.zero_grad()
            loss.backward()
        except NotEnoughExpertsError:
            return None
        self.opt.step()
        return loss.item()
