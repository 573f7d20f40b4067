"""The shared SIREN whose per-item shift modulations carry each signal.

Weights may be shared (``(out, in)``) or per item (``(B, out, in)``): the same forward
serves the structured methods (shared weights, per-item shifts) and the methods that
adapt weights per item (MSCN-grad, MetaSparseINR, COIN), with no loop over items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class SirenConfig:
    """Architecture; defaults are the paper's 15×512, w0=30 network (DESIGN §3)."""

    in_dim: int = 3  # coordinate dimension (set by the modality)
    out_dim: int = 1  # output channels (set by the modality)
    width: int = 512  # units per hidden layer
    depth: int = 15  # layers including the linear output layer: depth-1 sine layers
    w0: float = 30.0  # SIREN frequency of the hidden layers
    w0_first: float = 30.0  # SIREN frequency of the first layer
    output_offset: float = 0.5  # Functa / COIN++ offset on the linear output

    @property
    def n_sine_layers(self) -> int:
        return self.depth - 1

    @property
    def n_shifts(self) -> int:
        return self.width * (self.depth - 1)

    def validate(self) -> None:
        if self.depth < 2:
            raise ValueError(f"depth must be >= 2 (one sine layer + output), got {self.depth}")
        if self.width < 1 or self.in_dim < 1 or self.out_dim < 1:
            raise ValueError("width, in_dim and out_dim must be positive")


def layer_shapes(cfg: SirenConfig) -> list[tuple[int, int]]:
    dims = [cfg.in_dim] + [cfg.width] * (cfg.depth - 1) + [cfg.out_dim]
    return [(dims[i + 1], dims[i]) for i in range(cfg.depth)]


def siren_init(cfg: SirenConfig, generator: torch.Generator | None = None) -> list[Tensor]:
    """SIREN init: first layer U(±1/fan_in), others U(±√(6/fan_in)/w0), output bias 0.

    Returns a flat list ``[W0, b0, W1, b1, …]``; biases use the same bound as weights.
    """
    params: list[Tensor] = []
    for i, (fan_out, fan_in) in enumerate(layer_shapes(cfg)):
        bound = 1.0 / fan_in if i == 0 else math.sqrt(6.0 / fan_in) / cfg.w0
        w = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
        if i == cfg.depth - 1:
            b = torch.zeros(fan_out)
        else:
            b = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
        params += [w, b]
    return params


def _linear(h: Tensor, w: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """``scale·(h Wᵀ + b)`` with w0 folded into the small W and b, never the activations.

    Multiplying the (out, in) weights instead of the (B, N, out) activations removes a
    full elementwise pass from the forward and from every backward pass through it.
    """
    if scale != 1.0:
        w, b = w * scale, b * scale
    if w.dim() == 2:
        out = torch.addmm(b, h.reshape(-1, h.shape[-1]), w.t())
        return out.reshape(*h.shape[:-1], -1)
    # per-item weights (B, out, in), biases (B, out); h (B, N, in)
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def siren_forward(
    cfg: SirenConfig, params: list[Tensor], coords: Tensor, shifts: Tensor | None = None
) -> Tensor:
    """Raw network output ``(B, N, out_dim)`` for coordinates ``(B, N, in_dim)``.

    ``shifts`` is ``(B, depth-1, width)`` (already multiplied by the gates) or None.
    """
    h = coords
    n_sine = cfg.depth - 1
    for i in range(n_sine):
        w0 = cfg.w0_first if i == 0 else cfg.w0
        pre = _linear(h, params[2 * i], params[2 * i + 1], w0)
        if shifts is not None:
            pre = pre + (w0 * shifts[:, i, :]).unsqueeze(1)
        h = torch.sin(pre)
    return _linear(h, params[-2], params[-1]) + cfg.output_offset


class GatedSiren(nn.Module):
    """SIREN with per-unit shift modulations batched over items ``(B, depth-1, width)``."""

    def __init__(self, cfg: SirenConfig, generator: torch.Generator | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.params = nn.ParameterList([nn.Parameter(p) for p in siren_init(cfg, generator)])

    def forward(self, coords: Tensor, shifts: Tensor | None = None,
                params: list[Tensor] | None = None) -> Tensor:
        return siren_forward(self.cfg, list(self.params) if params is None else params,
                             coords, shifts)
