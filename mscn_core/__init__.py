"""mscn_core: the modality-agnostic engine of Meta-Learning Sparse Compression Networks.

Attributes load lazily (PEP 562), so ``import mscn_core`` and the ``mscn`` launcher stay
light until torch is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "TrainConfig": "meta", "adapt": "meta", "meta_train": "meta",
    "Batch": "signals", "CONTRACT_VERSION": "modality",
    "METHODS": "methods", "MethodConfig": "methods", "build_representation": "methods",
    "Modality": "modality", "decode": "pipeline", "encode": "pipeline", "Signal": "signals",
    "GatedSiren": "siren", "SirenConfig": "siren",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: F401
    from .meta import TrainConfig, adapt, meta_train  # noqa: F401
    from .methods import METHODS, MethodConfig, build_representation  # noqa: F401
    from .modality import CONTRACT_VERSION, Modality  # noqa: F401
    from .pipeline import decode, encode  # noqa: F401
    from .signals import Batch, Signal  # noqa: F401
    from .siren import GatedSiren, SirenConfig  # noqa: F401


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
