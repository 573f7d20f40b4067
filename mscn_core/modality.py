"""The plugin contract (DESIGN §5): what a modality tells the modality-agnostic core."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from torch import Tensor

from .meta import Objective
from .signals import Signal

PredictFn = Callable[[Tensor], Tensor]  # coords (N, in_dim) -> predictions (N, out_dim)

REQUIRED_ATTRIBUTES = ("name", "description", "in_dim", "out_dim")
REQUIRED_METHODS = ("guess_can_open", "read", "fit_state", "load_state", "state", "to_signal",
                    "objective", "metrics", "reconstruct", "save", "view")


class Modality:
    """Base class for modalities; third-party plugins may subclass or just duck-type it.

    Items are whatever the plugin reads (a DataArray, a mesh…); the core only ever sees
    the ``Signal`` a plugin makes of an item, and hands back a ``PredictFn``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    in_dim: ClassVar[int] = 0
    out_dim: ClassVar[int] = 0
    file_extensions: ClassVar[tuple[str, ...]] = ()

    def guess_can_open(self, path: str | os.PathLike) -> bool:
        return str(path).lower().endswith(self.file_extensions)

    def read(self, path: str | os.PathLike, **options: Any) -> list[Any]:
        raise NotImplementedError

    def fit_state(self, items: Sequence[Any]) -> None:
        """Fit training-set statistics (e.g. scaling); kept in the checkpoint."""

    def load_state(self, state: dict) -> None:
        """Restore what ``state()`` returned from a checkpoint."""

    def state(self) -> dict:
        return {}

    def to_signal(self, item: Any, resolution: Any = None) -> Signal:
        raise NotImplementedError

    def item_template(self, item: Any, metadata: str = "full") -> dict:
        """JSON the decoder needs besides ``Signal.meta`` to rebuild the artifact.

        ``metadata="cf"`` asks for the essentials only (the plugin decides what they are).
        """
        return {}

    def objective(self) -> Objective:
        return Objective()

    def metrics(self, signal: Signal, pred: Tensor) -> dict[str, float]:
        raise NotImplementedError

    def reconstruct(self, meta: dict, predict: PredictFn, resolution: Any = None) -> Any:
        raise NotImplementedError

    def save(self, artifact: Any, path: str | os.PathLike, overwrite: bool = False) -> None:
        raise NotImplementedError

    def view(self, truth: Any, recon: Any, path: str | os.PathLike, stats: dict) -> Any:
        raise NotImplementedError


def contract_problems(obj: Any) -> list[str]:
    """What an entry point's object lacks to be a modality (empty list: fine)."""
    problems = []
    for attr in REQUIRED_ATTRIBUTES:
        if not hasattr(obj, attr):
            problems.append(f"missing attribute {attr!r}")
    for meth in REQUIRED_METHODS:
        if not callable(getattr(obj, meth, None)):
            problems.append(f"missing method {meth}()")
    for dim in ("in_dim", "out_dim"):
        v = getattr(obj, dim, None)
        if v is not None and (not isinstance(v, int) or v < 1):
            problems.append(f"{dim} must be a positive int, got {v!r}")
    return problems
