"""The plugin contract, version 2 (DESIGN §5): what a modality tells the modality-agnostic core.

Modelled on xarray's ``BackendEntrypoint``: few required members, the rest optional with
defaults that serve *pointwise* modalities (fields, shapes). A modality whose signal is
not a set of network-input points (NeRF: rays) overrides :meth:`Modality.render`, and
the same rendering then serves the inner loop, the outer loop, evaluation and decoding.

Required: ``name``, ``description``, ``in_dim``, ``out_dim``, :meth:`read`,
:meth:`to_signal`, :meth:`metrics`, :meth:`reconstruct`, :meth:`save`.
Optional: everything else, including ``view`` (absent = no viewer),
:meth:`Modality.check_meta` (validate a stream's item metadata before decoding), and
the capabilities in ``OPTIONAL_CAPABILITIES`` (absent = not offered): ``value_scale``
(error-bounded encoding), ``output_ulp`` (its margin for the artifact's number format),
``reference_group`` (climatology skill in ``mscn evaluate``), ``scan``/``load``
(lazy reading of large archives, :mod:`mscn_core.streaming`) and ``default_checkpoint``
(the shipped checkpoint commands use without ``--checkpoint``).

Vocabulary
----------
*item*       whatever ``read`` returns (any object of the plugin's): the core
             never looks inside.
*signal*     :class:`~mscn_core.signals.Signal`: ``coords (N, k)`` sample inputs (network
             points for pointwise modalities, rays for NeRF), ``targets (N, c)``, a mask.
*field*      a callable ``points (B, M, in_dim) -> raw network outputs (B, M, out_dim)``,
             one adapted network per item of the batch.
*batch*      :class:`~mscn_core.signals.Batch`: ``coords (B, n, k)``, ``targets (B, n, c)``,
             ``weights (B, n)``, stacked from :meth:`sample` of each signal.
*predict*    what ``reconstruct`` receives: an item's sample inputs ``(N, k)`` →
             rendered predictions ``(N, c)``, i.e. :meth:`render` of that item's field.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .signals import Batch, Signal

if TYPE_CHECKING:  # torch loads where it is used: listing plugins must not cost its ~1 s
    import torch
    from torch import Tensor

CONTRACT_VERSION = 2

Field = Callable[["Tensor"], "Tensor"]  # points (B, M, in_dim) -> raw outputs (B, M, out_dim)
PredictFn = Callable[["Tensor"], "Tensor"]  # one item's coords (N, k) -> predictions (N, c)

REQUIRED_ATTRIBUTES = ("name", "description", "in_dim", "out_dim")
REQUIRED_METHODS = ("read", "to_signal", "metrics", "reconstruct", "save")
OPTIONAL_METHODS = ("guess_can_open", "fit_state", "state", "load_state", "item_template",
                    "item_label", "sample", "render", "objective", "n_values", "check_meta")
# Optional members whose absence means "not offered": the default is None, not a method.
#   value_scale(meta) -> float: artifact units per unit of the signal's targets (e.g. the
#     width of a [0, 1] scaling); without it ``encode --max-abs-error`` is refused.
#   output_ulp(meta) -> float: spacing of the artifact's number format at the largest
#     magnitude an item with this meta can take (float32 near 300: 3e-5; 8-bit integers:
#     1); the error bound keeps half of it in reserve. Absent: 0 (float64 output).
#   reference_group(item) -> Hashable | None: items that share a reference (the same
#     quantity on the same points); ``mscn evaluate`` scores skill against its per-point
#     mean.
#   scan(path, options) -> list[ItemRef] and load(ref, options) -> item, together: the
#     items ``read`` would return, as light references (mscn_core.streaming.ItemRef:
#     the plugin's ``key`` and the item's ``label``) listed without reading values, and
#     one item loaded from its reference, equal to ``read``'s. Offered: ``meta-train``
#     reads only the items a step asks for (bounded memory at any archive size); a bad
#     selection must fail in ``scan``, before any training.
OPTIONAL_CAPABILITIES = ("value_scale", "output_ulp", "reference_group", "scan", "load",
                         "default_checkpoint")


def masked_mse(pred: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Per-item mean squared error over weighted points, shape ``(B,)``."""
    sq = ((pred - targets) ** 2).mean(dim=-1)
    return (sq * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)


class Modality:
    """Base class for modalities; third-party plugins subclass it (or duck-type it fully).

    Subclasses written for this contract inherit ``contract_version = 2``; a duck-typed
    object must declare it, and the registry refuses any other version with a message.
    """

    contract_version: ClassVar[int] = CONTRACT_VERSION
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    in_dim: ClassVar[int] = 0
    out_dim: ClassVar[int] = 0
    # Cheap file detection: leading bytes first (content), then the extension.
    magic: ClassVar[tuple[bytes, ...]] = ()
    file_extensions: ClassVar[tuple[str, ...]] = ()
    # Typed per-modality options: a dataclass whose fields (with ``# comments``) the CLI
    # exposes as flags once it knows the modality; ``None`` = no options.
    options: ClassVar[type | None] = None
    # Encode-time budget: samples per inner step when an item has more (bounded memory).
    points_per_step: ClassVar[int] = 16384
    # Items adapted at once when the codec is fitted after meta-training; memory grows
    # with it times what one item's inner step costs (samples × work per sample).
    # ``None``: the core's default (16, :data:`mscn_core.pipeline.CODEC_BATCH`).
    codec_batch_size: ClassVar[int | None] = None
    # Strings this modality's item metadata repeats in every stream, the most frequent
    # last: its streams' headers are deflated with them as a preset dictionary
    # (mscn_core.bitstream). FROZEN once streams exist: a changed byte orphans them.
    header_words: ClassVar[tuple[str, ...]] = ()
    # Extra names under which ``mscn view NAME`` reaches this modality's viewer.
    view_names: ClassVar[tuple[str, ...]] = ()
    # The viewer, optional: a method ``view(truth, recon, path, options=None,
    # overwrite=False) -> path`` rendering an item beside its reconstruction, both as
    # ``read`` returns them; it may accept ``animation=PATH`` (``mscn view --gif``).
    view: ClassVar[Callable[..., Any] | None] = None
    # Capabilities (see OPTIONAL_CAPABILITIES): define them as methods to offer them.
    value_scale: ClassVar[Callable[..., float] | None] = None
    output_ulp: ClassVar[Callable[..., float] | None] = None
    reference_group: ClassVar[Callable[..., Any] | None] = None
    scan: ClassVar[Callable[..., list] | None] = None
    load: ClassVar[Callable[..., Any] | None] = None

    # -- files ------------------------------------------------------------------------
    def guess_can_open(self, path: str | os.PathLike) -> bool:
        """Content sniffing (``magic``) before extensions; a plugin may look deeper."""
        path = str(path)
        if self.magic and os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    head = f.read(max(len(m) for m in self.magic))
            except OSError:
                return False
            return any(head.startswith(m) for m in self.magic)
        return path.lower().endswith(self.file_extensions)

    def read(self, path: str | os.PathLike, options: Any = None) -> list[Any]:
        """Items in a file; ``options`` is an instance of ``self.options`` (or None)."""
        raise NotImplementedError

    # -- training-set state (kept in the checkpoint, costs no bits) -------------------
    def fit_state(self, items: Sequence[Any]) -> None:
        """Fit training-set statistics (e.g. value ranges) from the training items."""

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned from a checkpoint."""

    # -- signals and optimisation -----------------------------------------------------
    def to_signal(self, item: Any, options: Any = None) -> Signal:
        raise NotImplementedError

    def item_template(self, item: Any, options: Any = None) -> dict:
        """JSON the decoder needs besides ``Signal.meta`` to rebuild the artifact."""
        return {}

    def item_label(self, item: Any) -> str:
        """Which item this is, for reports and for keeping train/validation disjoint."""
        return str(id(item))

    def sample(self, signal: Signal, n: int, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` samples of one signal: ``coords (n, k)``, ``targets (n, c)``, ``weights (n,)``.

        Default: uniform over valid (unmasked) samples, with replacement.
        """
        import torch

        valid = signal.mask.nonzero().squeeze(1) if signal.mask is not None else None
        n_valid = valid.numel() if valid is not None else signal.n_points
        pick = torch.randint(n_valid, (n,), generator=generator)
        if valid is not None:
            pick = valid[pick]
        return (signal.coords[pick], signal.targets[pick],
                torch.ones(n, dtype=signal.coords.dtype))

    def render(self, field: Field, coords: Tensor) -> Tensor:
        """Predictions of the targets from sample inputs ``(B, n, k) -> (B, n, c)``.

        Pointwise default: the field at the points. NeRF samples along rays and
        volume-renders here.
        """
        return field(coords)

    def objective(self, field: Field, batch: Batch) -> Tensor:
        """Per-item losses ``(B,)``: the inner loop, the outer loop and validation use it."""
        return masked_mse(self.render(field, batch.coords), batch.targets, batch.weights)

    def n_values(self, signal: Signal) -> int:
        """The denominator of bits per value (what the plugin's users count), not samples."""
        return signal.n_points * signal.targets.shape[1]

    def metrics(self, signal: Signal, pred: Tensor) -> dict[str, float]:
        """Quality of ``pred`` (= render of all ``signal.coords``) against the targets."""
        raise NotImplementedError

    # -- artifacts --------------------------------------------------------------------
    def reconstruct(self, meta: dict, predict: PredictFn, options: Any = None,
                    template: Any = None) -> Any:
        """The user-facing artifact from an item's ``meta`` and its ``predict``.

        ``template`` is the original item when it is at hand (``fit``); when decoding a
        stream it is ``None`` and ``meta["template"]`` (from :meth:`item_template`) is all
        there is. ``options`` may ask for another resolution.
        """
        raise NotImplementedError

    def check_meta(self, meta: dict, options: Any = None) -> int:
        """Validate one item's stream metadata cheaply; return how many values
        :meth:`reconstruct` will produce from it with these ``options``.

        ``meta`` is what ``reconstruct`` receives when decoding (``template=None``): it
        comes from a stream, which anyone can forge with a valid checksum. The core calls
        this for every item *before* decoding anything and refuses streams whose total
        is above :func:`mscn_core.limits.max_output_values`, so an override must not
        allocate the output (nor anything sized by an unchecked number) and should raise
        ``ValueError`` naming the problem. Default: ``meta["n_values"]`` (0 if absent),
        which counts the encoded signal, not necessarily the output.
        """
        from .limits import check_count

        return check_count(meta.get("n_values", 0), "n_values", 0)

    def save(self, artifacts: list[Any], path: str | os.PathLike, overwrite: bool = False,
             provenance: dict | None = None) -> Any:
        """Write artifacts atomically; ``provenance`` (checkpoint hash, bits per value) is
        for formats that carry attributes."""
        raise NotImplementedError


def checkpoint_settings(options: Any, fields: Sequence[str], stored: dict | None) -> dict:
    """The values of ``fields`` to use: the options' when training or fitting from scratch
    (``stored`` None), else the checkpoint's ``stored`` ones, because its learned rates
    were meta-learned with them. A flag set away from its default to another value is
    ignored with a warning naming it."""
    given = {k: getattr(options, k) for k in fields}
    if stored is None:
        return given
    changed = [k for k, v in given.items()
               if v != getattr(type(options), k) and v != stored[k]]
    if changed:
        warnings.warn(f"--{changed[0].replace('_', '-')} ignored: the checkpoint was "
                      f"meta-learned with {changed[0]}={stored[changed[0]]}", stacklevel=3)
    return {k: stored[k] for k in fields}


_DEFAULT_ATTRIBUTES = {"magic": (), "file_extensions": (), "options": None,
                       "points_per_step": Modality.points_per_step,
                       "codec_batch_size": None, "view_names": (),
                       "view": None, **dict.fromkeys(OPTIONAL_CAPABILITIES)}


def with_defaults(obj: Any) -> Any:
    """A duck-typed plugin gets the base class's optional members it does not define."""
    if isinstance(obj, Modality):
        return obj
    for meth in OPTIONAL_METHODS:
        if not callable(getattr(obj, meth, None)):
            setattr(obj, meth, types.MethodType(getattr(Modality, meth), obj))
    for attr, value in _DEFAULT_ATTRIBUTES.items():
        if not hasattr(obj, attr):
            setattr(obj, attr, value)
    return obj


def default_options(modality: Any) -> Any:
    """An instance of the modality's options dataclass with its defaults, or None."""
    cls = getattr(modality, "options", None)
    return cls() if isinstance(cls, type) else None


def has_view(modality: Any) -> bool:
    return callable(getattr(modality, "view", None))


def contract_problems(obj: Any) -> list[str]:
    """What an entry point's object lacks to be a v2 modality (empty list: fine)."""
    version = getattr(obj, "contract_version", None)
    if version != CONTRACT_VERSION:
        said = "declares no contract_version (written for v1)" if version is None else \
            f"targets plugin contract v{version}"
        return [f"{said}; this mscn speaks contract v{CONTRACT_VERSION} "
                "(see docs/plugins.md)"]
    problems = []
    for attr in REQUIRED_ATTRIBUTES:
        if not hasattr(obj, attr):
            problems.append(f"missing attribute {attr!r}")
    for meth in REQUIRED_METHODS:
        if not callable(getattr(obj, meth, None)):
            problems.append(f"missing method {meth}()")
    for dim in ("in_dim", "out_dim"):
        v = getattr(obj, dim, None)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            problems.append(f"{dim} must be a positive int, got {v!r}")
    name = getattr(obj, "name", None)
    if name is not None and (not isinstance(name, str) or not name):
        problems.append(f"name must be a non-empty str, got {name!r}")
    opts = getattr(obj, "options", None)
    if opts is not None:
        import dataclasses

        if not (isinstance(opts, type) and dataclasses.is_dataclass(opts)):
            problems.append(f"options must be a dataclass type or None, got {opts!r}")
        else:
            missing = [f.name for f in dataclasses.fields(opts)
                       if f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING]
            if missing:
                problems.append(f"options {opts.__name__}: every field needs a default "
                                f"(the CLI makes them flags); none for {', '.join(missing)}")
    for cap in ("view", *OPTIONAL_CAPABILITIES):
        member = getattr(obj, cap, None)
        if cap == "default_checkpoint":
            if member is not None and not (isinstance(member, str) and member):
                problems.append("default_checkpoint must be a checkpoint file name or None")
        elif member is not None and not callable(member):
            problems.append(f"{cap} must be a method or None")
    if (getattr(obj, "scan", None) is None) != (getattr(obj, "load", None) is None):
        problems.append("scan and load come together (lazy reading needs both) or not at all")
    return problems
