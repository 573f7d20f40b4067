"""Signals as the core sees them: coordinates, targets and a validity mask, nothing more."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Signal:
    """One item: ``coords (N, in_dim)``, ``targets (N, out_dim)``, optional ``mask (N,)``.

    ``meta`` is JSON-serialisable and is what the plugin needs to rebuild the artifact.
    """

    coords: Tensor
    targets: Tensor
    mask: Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.coords.dim() != 2 or self.targets.dim() != 2:
            raise ValueError("Signal needs coords (N, in_dim) and targets (N, out_dim)")
        if self.coords.shape[0] != self.targets.shape[0]:
            raise ValueError(f"coords has {self.coords.shape[0]} points, "
                             f"targets {self.targets.shape[0]}")
        if self.mask is not None and int(self.mask.sum()) == 0:
            raise ValueError("signal has no valid (unmasked) points")

    @property
    def n_points(self) -> int:
        return self.coords.shape[0]

    @property
    def n_values(self) -> int:
        """Number of values of the signal, the denominator of bits per value."""
        return self.coords.shape[0] * self.targets.shape[1]


def sample_points(signals: Sequence[Signal], n_points: int,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Random valid points per item, stacked ``(B, n, ·)``; unmasked points only."""
    coords, targets = [], []
    for s in signals:
        valid = s.mask.nonzero().squeeze(1) if s.mask is not None else None
        n_valid = valid.numel() if valid is not None else s.n_points
        pick = torch.randint(n_valid, (n_points,), generator=generator)
        if valid is not None:
            pick = valid[pick]
        coords.append(s.coords[pick])
        targets.append(s.targets[pick])
    c, t = torch.stack(coords), torch.stack(targets)
    return c, t, torch.ones(c.shape[:2], dtype=c.dtype)


def full_batches(signals: Sequence[Signal], max_batch: int = 16
                 ) -> Iterator[tuple[list[int], Tensor, Tensor, Tensor]]:
    """All points of every item, in batches of items with the same number of points."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(signals):
        groups.setdefault(s.n_points, []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), max_batch):
            chunk = idx[start:start + max_batch]
            c = torch.stack([signals[i].coords for i in chunk])
            t = torch.stack([signals[i].targets for i in chunk])
            w = torch.stack([
                signals[i].mask.to(c.dtype) if signals[i].mask is not None
                else torch.ones(signals[i].n_points, dtype=c.dtype) for i in chunk])
            yield chunk, c, t, w
