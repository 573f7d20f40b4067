"""mscn_core: the modality-agnostic engine of Meta-Learning Sparse Compression Networks."""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .meta import Objective, TrainConfig, adapt, meta_train
from .methods import METHODS, MethodConfig, build_representation
from .modality import Modality
from .pipeline import decode, encode
from .signals import Signal
from .siren import GatedSiren, SirenConfig

__version__ = "0.1.0"
__all__ = ["Checkpoint", "GatedSiren", "METHODS", "MethodConfig", "Modality", "Objective",
           "Signal", "SirenConfig", "TrainConfig", "adapt", "build_representation", "decode",
           "encode", "load_checkpoint", "meta_train", "save_checkpoint"]
