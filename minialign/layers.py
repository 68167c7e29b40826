"""Small torch layers shared by the toy models and the methods (one place, so a method never imports a model)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConditionalLinear(nn.Module):
    """Linear layer whose output is scaled by a learned per-index vector: y = (W x + b) * e[t].

    t: LongTensor [B] (a timestep, or a step index). SFT-PG's toy denoiser and its step baseline use it.
    """

    def __init__(self, n_in: int, n_out: int, T: int):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)
        self.embed = nn.Embedding(T, n_out)
        nn.init.uniform_(self.embed.weight)

    def forward(self, x, t):
        return self.lin(x) * self.embed(t)


class MLPCritic(nn.Module):
    """f(x) [B, ...] -> [B]: ReLU MLP on the flattened sample (authors' toy critic: dim -> 256 -> 256 -> 1)."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


class StepBaseline(nn.Module):
    """B(x_i, i) -> [B]: x_i [B, ...] the state before step i (i = 0 is x_T), i a LongTensor [B];
    each layer scaled by a learned per-step vector (the authors' value network)."""

    def __init__(self, dim: int, n_steps: int, hidden: int = 256):
        super().__init__()
        self.l1 = ConditionalLinear(dim, hidden, n_steps)
        self.l2 = ConditionalLinear(hidden, hidden, n_steps)
        self.out = ConditionalLinear(hidden, 1, n_steps)

    def forward(self, x, i):
        h = F.relu(self.l1(x.flatten(1), i))
        h = F.relu(self.l2(h, i))
        return self.out(h, i).squeeze(1)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator):
    """WGAN-GP: mean (||grad_x f(x_hat)|| - 1)^2 at random interpolates x_hat of real and fake samples."""
    u = torch.rand((len(real),) + (1,) * (real.dim() - 1), generator=generator).to(real)
    x_hat = (u * real + (1 - u) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
