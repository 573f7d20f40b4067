"""Signals and batches as the core sees them: sample inputs, targets, weights, nothing more.

torch is imported where it is used, not at the top: the registry imports this module (via
the ``Modality`` base class) to *list* plugins, which must not cost torch's ~1 s import.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch
    from torch import Tensor


@dataclass
class Signal:
    """One item: ``coords (N, k)``, ``targets (N, c)``, optional boolean ``mask (N,)``.

    ``coords`` are whatever the modality's ``render`` consumes per sample: network input
    points for pointwise modalities (``k = in_dim``), rays for NeRF. ``meta`` is
    JSON-serialisable and is what the plugin needs to rebuild the artifact.
    """

    coords: Tensor
    targets: Tensor
    mask: Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.coords.dim() != 2 or self.targets.dim() != 2:
            raise ValueError("Signal needs coords (N, k) and targets (N, c)")
        if self.coords.shape[0] != self.targets.shape[0]:
            raise ValueError(f"coords has {self.coords.shape[0]} points, "
                             f"targets {self.targets.shape[0]}")
        if self.mask is not None and int(self.mask.sum()) == 0:
            raise ValueError("signal has no valid (unmasked) points")

    @property
    def n_points(self) -> int:
        return self.coords.shape[0]


class Batch(NamedTuple):
    """B items' samples stacked: ``coords (B, n, k)``, ``targets (B, n, c)``, ``weights (B, n)``."""

    coords: Tensor
    targets: Tensor
    weights: Tensor

    def to(self, device: Any) -> Batch:
        return Batch(*(t.to(device) for t in self))


def sample_batch(modality: Any, signals: Sequence[Signal], n: int,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None
                 ) -> Batch:
    """``n`` samples of every signal by the modality's own sampler, stacked.

    ``generator``: one shared by all signals, or one per signal (then a signal's samples
    do not depend on which others are in the batch).
    """
    import torch

    gens = (generator if isinstance(generator, Sequence) else [generator] * len(signals))
    parts = [modality.sample(s, n, g) for s, g in zip(signals, gens, strict=True)]
    c, t, w = (torch.stack(x) for x in zip(*parts, strict=True))
    return Batch(c, t, w.to(c.dtype))


def whole_signal(signal: Signal) -> Batch:
    """Every sample of one signal as a batch of one (mask → weights)."""
    import torch

    w = (signal.mask.to(signal.coords.dtype) if signal.mask is not None
         else torch.ones(signal.n_points, dtype=signal.coords.dtype))
    return Batch(signal.coords[None], signal.targets[None], w[None])


def full_batches(signals: Sequence[Signal], max_batch: int = 16
                 ) -> Iterator[tuple[list[int], Batch]]:
    """All samples of every item, in batches of items with the same number of samples."""
    import torch

    groups: dict[int, list[int]] = {}
    for i, s in enumerate(signals):
        groups.setdefault(s.n_points, []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), max_batch):
            chunk = idx[start:start + max_batch]
            parts = [whole_signal(signals[i]) for i in chunk]
            yield chunk, Batch(*(torch.cat(x) for x in zip(*parts, strict=True)))
