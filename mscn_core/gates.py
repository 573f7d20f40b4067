"""Hard-concrete L0 gates (Louizos et al. 2017) that decide which modulations exist."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
_L0_SHIFT = BETA * math.log(-GAMMA / ZETA)


def sample_gates(log_alpha: Tensor, u: Tensor | None = None) -> Tensor:
    """Reparameterised sample z ∈ [0, 1] with exact 0/1 mass (training-time gates)."""
    if u is None:
        u = torch.rand_like(log_alpha)
    u = u.clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_l0(log_alpha: Tensor) -> Tensor:
    """Expected number of non-zero gates, Σ P(z ≠ 0)."""
    return torch.sigmoid(log_alpha - _L0_SHIFT).sum()


def deterministic_gates(log_alpha: Tensor) -> Tensor:
    """Test-time gates ẑ = clip(sigmoid(log α)(ζ−γ)+γ, 0, 1): exact zeros and ones."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def budget_mask(log_alpha: Tensor, k: int, batch_dims: int = 0) -> Tensor:
    """Binary mask of exactly the k most probable gates (per item if ``batch_dims``)."""
    flat = log_alpha.detach().reshape(*log_alpha.shape[:batch_dims], -1)
    if not 0 < k <= flat.shape[-1]:
        raise ValueError(f"gate budget k={k} must be in 1..{flat.shape[-1]}")
    mask = torch.zeros_like(flat)
    mask.scatter_(-1, torch.topk(flat, k, dim=-1, sorted=False).indices, 1.0)
    return mask.reshape(log_alpha.shape)


class HardConcreteGates(nn.Module):
    """One gate per modulation; ``budget`` (k) fixes the number of survivors exactly."""

    def __init__(self, shape: tuple[int, ...], keep_prob: float = 0.9,
                 budget: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        init = math.log(keep_prob) - math.log1p(-keep_prob)
        noise = torch.randn(shape, generator=generator) * 1e-2
        self.log_alpha = nn.Parameter(init + noise)
        self.budget = budget

    def train_gates(self, batch: int, log_alpha: Tensor | None = None) -> Tensor:
        """Gates for a training batch ``(B, *shape)``: sampled, or top-k straight-through."""
        la = self.log_alpha if log_alpha is None else log_alpha
        la_b = la.expand(batch, *self.log_alpha.shape) if la.dim() == self.log_alpha.dim() else la
        z = sample_gates(la_b)
        if self.budget is None:
            return z
        # Forward value is the exact budget mask; gradients reach log α as if sampled.
        mask = budget_mask(la_b, self.budget, batch_dims=la_b.dim() - self.log_alpha.dim())
        return mask + (z - z.detach()) * mask

    def test_gates(self, log_alpha: Tensor | None = None) -> Tensor:
        la = self.log_alpha if log_alpha is None else log_alpha
        if self.budget is None:
            return deterministic_gates(la)
        return budget_mask(la, self.budget, batch_dims=la.dim() - self.log_alpha.dim())

    def expected_l0(self) -> Tensor:
        return expected_l0(self.log_alpha)
