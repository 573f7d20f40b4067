"""File → signal → modulations → bytes, and back: the core's end-to-end operations.

Everything here talks to a modality only through the plugin contract, so the same
functions serve every modality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import bitstream as bs
from . import limits
from . import residual as res
from .checkpoint import Checkpoint
from .entropy import (
    CategoricalModel,
    decode_symbols,
    encode_symbols,
    estimate_bits,
    fit_categorical,
)
from .meta import TrainConfig, adapt, item_losses, meta_train
from .methods import MethodConfig, build_representation
from .modality import default_options, with_defaults
from .quantize import QuantizerStats, UniformQuantizer, fit_stats
from .registry import get_modality
from .signals import Batch, Signal, full_batches, sample_batch
from .siren import SirenConfig

BIT_DEPTHS = tuple(range(2, 9))
CLIP_SIGMA = 3.0
CODEC_BATCH = 16  # items adapted at once by fit_codec unless the modality asks fewer


def train_checkpoint(modality, train_items: Sequence[Any], val_items: Sequence[Any],
                     siren: SirenConfig, method: MethodConfig, train: TrainConfig,
                     info: dict | None = None, options: Any = None,
                     codec_refine_steps: int = 0) -> Checkpoint:
    """Meta-train on items of a modality and fit the codec (on codes after
    ``codec_refine_steps`` refine steps, see :func:`fit_codec`): a ready-to-use checkpoint.

    Lazy items (mscn_core.streaming) stay lazy: ``fit_state`` sees a bounded seeded
    subsample and each step converts only the items it draws."""
    from .distributed import is_main
    from .streaming import as_signals, bounded, fit_sample

    modality.fit_state(fit_sample(train_items, val_items))
    tr = as_signals(modality, train_items, options)
    va = as_signals(modality, val_items, options)
    siren.in_dim, siren.out_dim = modality.in_dim, modality.out_dim
    rep = build_representation(siren, method, torch.Generator().manual_seed(train.seed))
    result = meta_train(rep, tr, va, train, modality)
    rep.eval()
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    ck = Checkpoint(rep, modality.name, modality.state(),
                    info={"train": summary, "train_config": asdict(train),
                          "n_train": len(tr), "n_val": len(va), **(info or {})})
    if rep.meta_learned and is_main():  # the codec: rank 0 only, on a bounded sample
        fit_codec(ck, modality, bounded(tr), refine_steps=codec_refine_steps)
    return ck


def progress(total: int, desc: str, unit: str = "item"):
    """A bar with items/s, on a terminal only (``disable=None``), gone when done."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None)


def item_batches(modality, signals: Sequence[Signal], points_per_step: int | None,
                 max_batch: int, seed: int) -> list[tuple[list[int], Batch | None, Any]]:
    """Signals in batches of item indices: those of at most ``points_per_step`` samples
    (default: the modality's budget) whole, as one Batch; larger ones as ``draw(k=0)``,
    which samples that many per call with one seeded generator per item (its samples do
    not depend on its neighbours), so memory stays bounded at any size."""
    budget = points_per_step or getattr(modality, "points_per_step", 16384)
    if budget < 1:
        raise ValueError(f"points_per_step must be >= 1, got {budget}")
    small = [i for i, s in enumerate(signals) if s.n_points <= budget]
    large = [i for i in range(len(signals)) if signals[i].n_points > budget]
    jobs: list[tuple[list[int], Batch | None, Any]] = [
        ([small[j] for j in idx], b, None)
        for idx, b in full_batches([signals[i] for i in small], max_batch)]
    for start in range(0, len(large), max_batch):
        chunk = large[start:start + max_batch]
        gens = [torch.Generator().manual_seed(seed) for _ in chunk]
        sigs = [signals[i] for i in chunk]

        def draw(k: int = 0, sigs=sigs, gens=gens) -> Batch:
            return sample_batch(modality, sigs, budget, gens)

        jobs.append((chunk, None, draw))
    return jobs


# Batches of items held at once by adapt_codes: streamed items (mscn_core.streaming) are
# loaded one window at a time, so the codec fit's memory does not grow with the archive.
ADAPT_WINDOW = 4


def adapt_codes(ck: Checkpoint, modality, signals: Sequence[Signal], steps: int | None = None,
                max_batch: int = 16, points_per_step: int | None = None,
                seed: int = 0, desc: str = "adapt") -> Tensor:
    """The transmitted values (B, code_size) for each signal after the inner loop.

    Items of at most ``points_per_step`` samples (default: the modality's budget) adapt on
    all of them; larger items draw that many by the modality's sampler at every inner
    step (seeded, so encoding is reproducible), so memory stays bounded at any size.
    """
    out: list[Tensor | None] = [None] * len(signals)
    window = ADAPT_WINDOW * max_batch
    with progress(len(signals), desc) as bar:
        for start in range(0, len(signals), window):
            part = [signals[i] for i in range(start, min(start + window, len(signals)))]
            for idx, batch, draw in item_batches(modality, part, points_per_step, max_batch,
                                                 seed):
                batch = batch if draw is None else draw()
                state, _ = adapt(ck.rep, batch, modality, steps=steps, resample=draw)
                with torch.no_grad():
                    codes = ck.rep.code_values({k: v.detach() for k, v in state.items()})
                for j, i in enumerate(idx):
                    out[start + i] = codes[j]
                bar.update(len(idx))
    return torch.stack(out)  # type: ignore[arg-type]


# Adam rate of encode-time refinement, constant. Measured (bench/refine_steps.py, 100 steps):
# 3e-2 wins by 7-8 % on fields unlike the training set but loses most of the in-distribution
# gain (RMSE 0.633 vs 0.604 K, baseline 0.652); 3e-3 is slower everywhere; warm-up or cosine
# decay lost on out-of-distribution fields. Keep-best makes any rate safe, not good.
REFINE_LR = 1e-2


def check_refinable(rep, refine_steps: int, refine_lr: float | None = None) -> None:
    """Refuse, in one line and before any work, what refinement cannot do."""
    refine_lr = REFINE_LR if refine_lr is None else refine_lr
    if not (isinstance(refine_steps, int) and refine_steps >= 0):
        raise ValueError(f"refine_steps must be an integer >= 0, got {refine_steps!r}")
    if not (math.isfinite(refine_lr) and refine_lr > 0):
        raise ValueError(f"refine_lr must be a finite number > 0, got {refine_lr!r}")
    if refine_steps and not getattr(rep, "refinable", False):
        raise ValueError(f"--refine-steps: method {rep.name!r} has no meta-learned per-item "
                         "code to refine (it is fitted from scratch); use --steps")


def refine_codes(ck: Checkpoint, modality, signals: Sequence[Signal], codes: Tensor,
                 steps: int, lr: float | None = None, bits: int | None = None,
                 quant_aware: bool = True, rate_cap: bool = True, max_batch: int = 16,
                 points_per_step: int | None = None, seed: int = 0, desc: str = "refine") -> Tensor:
    """``steps`` Adam steps on the codes (B, code_size) only, network frozen; the best
    iterate by the item's loss per item, the input codes included (never worse).

    Why: 3 meta-learned steps suit fields like the training set; fields unlike it gain
    from more steps. Only the values of the coded positions move, so the stream's format
    and size class are unchanged and any decoder reads it. The loss is the modality's own
    objective (masks as weights), on all of an item's samples when it has at most
    ``points_per_step`` (then keep-best is on exactly the item's points), else on a fresh
    seeded draw per step with keep-best on one fixed seeded draw (bounded memory).

    ``bits`` (with ``quant_aware``): the forward pass sees the values the decoder will
    (straight-through estimator: gradient as if unquantised), the iterate is projected on
    the quantiser's clip range (values beyond it would only be clipped), and the kept
    iterate is the best *after* quantisation, never worse than the quantised input codes.
    With ``rate_cap`` only iterates whose ideal code length under the entropy model is at
    most the input codes' qualify: the payload does not grow (up to the range coder's
    32-bit word), since symbols the model finds improbable cost up to ~17 bits each.
    Without ``quant_aware``: refine unquantised (the caller quantises after).
    """
    rep = ck.rep
    lr = REFINE_LR if lr is None else lr
    check_refinable(rep, steps, lr)
    if steps == 0 or len(signals) == 0:
        return codes
    coder = quantizer(ck, bits) if bits and quant_aware else None
    out = codes.detach().clone().float()
    budget = points_per_step or getattr(modality, "points_per_step", 16384)
    jobs: list[tuple[list[int], Batch, Any, Batch]] = []
    for idx, batch, draw in item_batches(modality, signals, points_per_step, max_batch,
                                         seed + 1):
        if draw is None:
            jobs.append((idx, batch, None, batch))
        else:  # keep-best on one fixed seeded draw, steps on fresh ones
            held = sample_batch(modality, [signals[i] for i in idx], budget,
                                [torch.Generator().manual_seed(seed + 2) for _ in idx])
            jobs.append((idx, held, draw, held))
    bar = tqdm(total=steps * len(signals), desc=desc, unit="item-step", leave=False,
               disable=None if steps * len(signals) >= 100 else True)
    with bar:
        for idx, batch, resample, held in jobs:
            out[idx] = _refine_batch(rep, modality, out[idx], batch, resample, held, steps,
                                     lr, coder, rate_cap, bar)
    return out


def _refine_batch(rep, modality, codes: Tensor, batch: Batch, resample, held: Batch,
                  steps: int, lr: float,
                  coder: tuple[UniformQuantizer, CategoricalModel] | None, rate_cap: bool,
                  bar) -> Tensor:
    """One batch of items: Adam is elementwise and the summed loss gives each item its own
    gradient, so one optimiser over (B, code_size) is exactly one Adam per item."""
    q, model = coder if coder is not None else (None, None)
    ctx = rep.context(codes.shape[0], training=False)
    x = codes.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    best, best_loss = codes.clone(), torch.full((codes.shape[0],), math.inf)
    lo = hi = cap = None
    if q is not None:
        mean, half = q.stats.mean, q.clip_sigma * q.stats.std
        lo, hi = (torch.as_tensor(v, dtype=x.dtype) for v in (mean - half, mean + half))

    def rate(v: Tensor) -> Tensor:  # ideal bits per item of v's symbols
        sym = q.quantize(torch.nan_to_num(v.detach()).double().numpy())  # type: ignore
        return torch.tensor([estimate_bits(row, model) for row in sym])  # type: ignore

    def seen(v: Tensor) -> Tensor:  # what the decoder sees; gradient straight through
        if q is None:
            return v
        deq = q.dequantize(q.quantize(torch.nan_to_num(v.detach()).double().numpy()))
        return v + (torch.from_numpy(deq).to(v.dtype) - v).detach()

    def losses_of(b: Batch) -> Tensor:
        return item_losses(rep, modality, rep.state_from_code(seen(x)), ctx, b)

    for t in range(steps + 1):
        last = t == steps
        loss = None
        if resample is None or not last:
            with torch.set_grad_enabled(not last):
                loss = losses_of(batch if resample is None else resample())
        if resample is None:
            score = loss.detach()  # the loss of x before this step's update, all its points
        else:
            with torch.no_grad():
                score = losses_of(held)
        better = score < best_loss  # NaN never wins
        if q is not None and rate_cap:
            bits = rate(x)
            cap = bits if cap is None else cap
            better &= bits <= cap + 1e-6
        best[better] = x.detach()[better]
        best_loss = torch.where(better, score, best_loss)
        if last:
            break
        assert loss is not None
        (x.grad,) = torch.autograd.grad(loss.sum(), [x])  # network frozen: no grads to it
        opt.step()
        if lo is not None:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        bar.update(codes.shape[0])
    return best


def predictor(ck: Checkpoint, modality, code: Tensor, chunk: int = 65536):
    """A ``PredictFn`` for one item: its sample inputs → the modality's rendered predictions."""
    state = ck.rep.state_from_code(code.reshape(1, -1))
    ctx = ck.rep.context(1, training=False)

    def field(points: Tensor) -> Tensor:
        return ck.rep.predict(state, ctx, points)

    def predict(coords: Tensor) -> Tensor:
        with torch.no_grad():
            parts = [modality.render(field, coords[i:i + chunk][None])[0]
                     for i in range(0, coords.shape[0], chunk)]
        return torch.cat(parts)

    return predict


# -- the codec: quantiser statistics and entropy models fitted on the training set ------
def fit_codec(ck: Checkpoint, modality, train_signals: Sequence[Signal],
              bit_depths: Sequence[int] = BIT_DEPTHS, clip_sigma: float = CLIP_SIGMA,
              batch_size: int | None = None, refine_steps: int = 0) -> None:
    """Fit the quantiser statistics and an entropy model per bit depth on the codes the
    inner loop gives the training signals. ``batch_size``: items adapted at once (peak
    memory grows with it; the codes do not depend on it); default the modality's
    ``codec_batch_size``, else :data:`CODEC_BATCH`.

    ``refine_steps``: fit on the codes after that many :func:`refine_codes` steps instead,
    and make it the checkpoint's default encode-time refinement (:func:`refine_settings`).
    Why: refined codes leave the meta-learned codes' range by far (a held-out mesh: 100×
    their spread after 300 steps), so a codec fitted on 3-step codes clips them all."""
    batch = batch_size if batch_size is not None else (
        getattr(modality, "codec_batch_size", None) or CODEC_BATCH)
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"codec batch size must be an integer >= 1, got {batch!r}")
    check_refinable(ck.rep, refine_steps)
    meta_learned = adapt_codes(ck, modality, train_signals, max_batch=batch)
    codes = refine_codes(ck, modality, train_signals, meta_learned, refine_steps,
                         max_batch=batch, desc="codec: refine").double().numpy()
    stats = fit_stats(codes)
    arrays = {f"quant.{k}": torch.from_numpy(v) for k, v in stats.to_arrays().items()}
    for b in bit_depths:
        q = UniformQuantizer(b, clip_sigma, stats)
        model = fit_categorical(q.quantize(codes), q.n_symbols)
        arrays.update({f"bits{b}.{k}": torch.from_numpy(np.asarray(v))
                       for k, v in model.to_arrays().items()})
    ck.codec = arrays
    ck.info["codec"] = {"clip_sigma": clip_sigma, "bit_depths": list(bit_depths),
                        "fitted_on_items": len(train_signals)}
    if refine_steps:
        ck.info["codec"]["refine_steps"] = refine_steps
    record_experience(ck, modality, train_signals, meta_learned, max_batch=batch)


# An item whose loss after the meta-learned steps exceeds this many times the 95th
# percentile of the training items' is "unlike anything the checkpoint was trained on".
# Measured with the default climate checkpoint (p95 over its 190 training fields): held-out
# ERA5 t850/z500, COADS, T42 U300, MPI-OM and ETOPO fields 0.25-2.7×; white noise 3.7×, a
# checkerboard 45× (and a constant field, geodesic tracer_1, 10×).
UNFAMILIAR_FACTOR = 3.0


def fit_losses(ck: Checkpoint, modality, signals: Sequence[Signal], codes: Tensor,
               max_batch: int = 16, points_per_step: int | None = None,
               seed: int = 0) -> Tensor:
    """Each item's own objective (B,) at ``codes``: on all its samples when it has at most
    ``points_per_step`` (default: the modality's), else on one seeded draw of that many."""
    out = torch.empty(len(signals))
    for idx, batch, draw in item_batches(modality, signals, points_per_step, max_batch, seed):
        b = batch if draw is None else draw()
        state = ck.rep.state_from_code(codes[idx].float())
        with torch.no_grad():
            out[idx] = item_losses(ck.rep, modality, state,
                                   ck.rep.context(len(idx), training=False), b).float()
    return out


def record_experience(ck: Checkpoint, modality, train_signals: Sequence[Signal],
                      codes: Tensor, max_batch: int = 16) -> None:
    """Keep the spread of the training items' losses at their meta-learned ``codes`` in
    the codec info (``fit_loss``: median, 95th percentile, max), for :func:`unfamiliar`."""
    losses = fit_losses(ck, modality, train_signals, codes, max_batch=max_batch)
    v = losses[torch.isfinite(losses)].double()
    if v.numel():
        ck.info.setdefault("codec", {})["fit_loss"] = {
            "p50": float(v.quantile(0.5)), "p95": float(v.quantile(0.95)),
            "max": float(v.max()), "items": int(v.numel())}


def unfamiliar(ck: Checkpoint, losses: Tensor) -> list[tuple[int, float]]:
    """(index, times the training p95) of items the checkpoint has not seen the like of;
    empty for a checkpoint without the record (fitted before it existed)."""
    p95 = ck.info.get("codec", {}).get("fit_loss", {}).get("p95")
    if not p95:  # absent, or 0 (the schema refuses negatives)
        return []
    ratio = (losses.double() / p95).tolist()
    return [(i, r) for i, r in enumerate(ratio) if not r <= UNFAMILIAR_FACTOR]


def warn_unfamiliar(ck: Checkpoint, modality, signals: Sequence[Signal], codes: Tensor,
                    points_per_step: int | None = None) -> list[int]:
    """Warn, once per item, when an item is far outside the checkpoint's experience,
    with the error its meta-learned fit gives (the modality's metrics). Returns the
    indices warned about."""
    import warnings

    flagged = unfamiliar(ck, fit_losses(ck, modality, signals, codes,
                                        points_per_step=points_per_step))
    for i, ratio in flagged:
        s = signals[i]
        metrics = modality.metrics(s, predictor(ck, modality, codes[i])(s.coords))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in list(metrics.items())[:3]
                          if isinstance(v, int | float))
        warnings.warn(f"item {i + 1} of {len(signals)} is far outside this checkpoint's "
                      f"experience: its loss after the meta-learned steps is {ratio:.3g}× "
                      f"the 95th percentile of its training items'; expected error (before "
                      f"quantisation): "
                      f"{shown} (--refine-steps or a checkpoint trained on such data may "
                      "help)", UserWarning, stacklevel=3)
    return [i for i, _ in flagged]


def refine_settings(ck: Checkpoint, steps: int | None = None,
                    grow: bool | None = None) -> tuple[int, bool]:
    """Encode-time refinement (steps, rate cap lifted) for ``None`` = the checkpoint's own:
    the steps its codec was fitted after (0 for most), and a lifted rate cap when that is
    not 0 (its entropy model prices refined codes, so capping at the meta-learned codes'
    bits would keep almost none)."""
    fitted = int(ck.info.get("codec", {}).get("refine_steps", 0))
    steps = fitted if steps is None else steps
    grow = bool(fitted) if grow is None else grow
    return steps, grow


def quantizer(ck: Checkpoint, bits: int) -> tuple[UniformQuantizer, CategoricalModel]:
    if "quant.mean" not in ck.codec:
        raise ValueError("this checkpoint has no codec statistics (method without a "
                         "meta-learned code?); it cannot encode")
    depths = ck.info.get("codec", {}).get("bit_depths", [])
    if bits not in depths:
        raise ValueError(f"--bits {bits} not available; this checkpoint has entropy models for "
                         f"{depths}")
    arrays = {k: v.numpy() for k, v in ck.codec.items()}
    try:  # tables a forged checkpoint may lack or mis-shape (its digest only proves intent)
        stats = QuantizerStats.from_arrays(arrays, "quant.")
        model = CategoricalModel.from_arrays(arrays, f"bits{bits}.")
        q = UniformQuantizer(bits, ck.info["codec"]["clip_sigma"], stats)
        if stats.n_values is not None and stats.n_values != ck.rep.code_size():
            raise ValueError(f"statistics for {stats.n_values} values, the code has "
                             f"{ck.rep.code_size()}")
        if model.n_symbols != q.n_symbols:
            raise ValueError(f"entropy model of {model.n_symbols} symbols, {bits} bits "
                             f"quantise to {q.n_symbols}")
        if model.per_position and model.n_positions != ck.rep.code_size():
            raise ValueError(f"entropy model for {model.n_positions} positions, the code has "
                             f"{ck.rep.code_size()}")
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"this checkpoint's codec tables for {bits} bits are missing or "
                         f"malformed: {err}") from None
    return q, model


def quantize_codes(ck: Checkpoint, codes: Tensor, bits: int) -> tuple[np.ndarray, Tensor]:
    """Symbols and the values the decoder will see (what `fit --bits` reconstructs from)."""
    q, _ = quantizer(ck, bits)
    symbols = q.quantize(codes.double().numpy())
    return symbols, torch.from_numpy(q.dequantize(symbols)).float()


@dataclass
class EncodeReport:
    n_bytes: int
    payload_bytes: int
    n_values: int
    bits_per_value: float
    payload_bits_per_value: float
    metrics: list[dict]
    residual_bytes: int = 0  # error-bounded mode: bytes of the residuals (in n_bytes)
    bounds: list[dict] | None = None  # per item: bound, achieved max error, residual bytes


def split_common(dicts: Sequence[dict]) -> tuple[dict, list[dict]]:
    """Factor what all dicts share (recursively) out of them: metadata is paid once."""
    if not dicts:
        return {}, []
    common: dict = {}
    rest: list[dict] = [{} for _ in dicts]
    for key in dicts[0]:
        values = [d.get(key, _MISSING) for d in dicts]
        if all(v == values[0] for v in values):
            common[key] = values[0]
        elif all(isinstance(v, dict) for v in values):
            sub_common, sub_rest = split_common(values)
            common[key] = sub_common
            for r, sr in zip(rest, sub_rest, strict=True):
                if sr:
                    r[key] = sr
        else:
            for r, v in zip(rest, values, strict=True):
                if v is not _MISSING:
                    r[key] = v
    for r, d in zip(rest, dicts, strict=True):
        r.update({k: v for k, v in d.items() if k not in dicts[0]})
    return common, rest


def merge_common(common: dict, rest: dict) -> dict:
    out = dict(common)
    for k, v in rest.items():
        out[k] = merge_common(out[k], v) if isinstance(v, dict) and isinstance(
            out.get(k), dict) else v
    return out


_MISSING = object()


def encode_items(ck: Checkpoint, modality, items: Sequence[Any], bits: int = 6,
                 with_metrics: bool = True, options: Any = None,
                 points_per_step: int | None = None, max_abs_error: float | None = None,
                 max_rel_error: float | None = None, refine_steps: int | None = None,
                 refine_lr: float | None = None, refine_grow: bool | None = None
                 ) -> tuple[bytes, EncodeReport]:
    """Adapt, (optionally) refine, quantise and entropy-code items into one .mscn stream.

    ``refine_steps``: :func:`refine_codes` after the meta-learned steps (Adam rate
    ``refine_lr``, default :data:`REFINE_LR`), aware of ``bits``; ``refine_grow``: its
    iterates may cost more bits than the meta-learned codes (no rate cap): measured on
    held-out climate fields at 6 bits, the capped refinement never moved while uncapped
    100 steps cut RMSE 12-25 % for 40-50 % more payload. The residual of a bounded
    encoding is taken after refinement (against what the decoder sees). ``None``: the
    checkpoint's own (:func:`refine_settings`).

    ``max_abs_error`` (artifact units) or ``max_rel_error`` (times each item's value
    range): also code the residual so that every valid point decodes within the bound
    (:mod:`mscn_core.residual`).
    """
    if modality.name != ck.modality:
        raise ValueError(f"checkpoint is for modality {ck.modality!r}, not {modality.name!r}")
    if max_abs_error is not None and max_rel_error is not None:
        raise ValueError("give max_abs_error or max_rel_error, not both")
    refine_steps, refine_grow = refine_settings(ck, refine_steps, refine_grow)
    check_refinable(ck.rep, refine_steps, refine_lr)
    bounded = max_abs_error is not None or max_rel_error is not None
    if bounded:
        for v in (max_abs_error, max_rel_error):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"an error bound must be a finite number > 0, got {v}")
        if not callable(getattr(modality, "value_scale", None)):
            res.value_scale(modality, {})  # the one-line refusal, before any work
    signals = [modality.to_signal(i, options) for i in items]
    n_values = [int(modality.n_values(s)) for s in signals]
    codes = adapt_codes(ck, modality, signals, points_per_step=points_per_step,
                        desc="encode: adapt")
    warn_unfamiliar(ck, modality, signals, codes, points_per_step)
    codes = refine_codes(ck, modality, signals, codes, refine_steps, refine_lr, bits=bits,
                         rate_cap=not refine_grow, points_per_step=points_per_step,
                         desc="encode: refine")
    symbols, dequant = quantize_codes(ck, codes, bits)
    _, model = quantizer(ck, bits)
    payloads = [encode_symbols(s, model) for s in symbols]
    metas = [dict(s.meta, template=modality.item_template(i, options), n_values=n)
             for s, i, n in zip(signals, items, n_values, strict=True)]
    preds: list[Tensor | None] = [None] * len(signals)
    bounds = None
    if bounded:
        bounds = []
        with progress(len(signals), "encode: residuals") as bar:
            for k, (s, code) in enumerate(zip(signals, dequant, strict=True)):
                rmeta, rdata, pred, row = _bound_item(ck, modality, s, code, metas[k],
                                                      max_abs_error, max_rel_error)
                metas[k]["residual"] = rmeta
                payloads[k] = payloads[k] + rdata
                preds[k] = pred
                bounds.append(row)
                bar.update()
    common, per_item = split_common(metas)
    data = bs.write_bitstream(header_words=tuple(getattr(modality, "header_words", ())),
                              checkpoint_hash=ck.sha256, modality=modality.name, bits=bits,
                              items_meta=per_item, payloads=payloads,
                              extra={"common": common},
                              version=bs.BOUNDED_VERSION if bounded else bs.FORMAT_VERSION)
    metrics = []
    if with_metrics:
        for s, code, pred in zip(signals, dequant, preds, strict=True):
            if pred is None:
                pred = predictor(ck, modality, code)(s.coords)
            metrics.append(modality.metrics(s, pred))
    total = sum(n_values)
    payload = sum(len(p) for p in payloads)
    residual_bytes = sum(b["residual_bytes"] for b in bounds or [])
    return data, EncodeReport(len(data), payload, total, 8 * len(data) / total,
                              8 * payload / total, metrics, residual_bytes, bounds)


def _bound_item(ck: Checkpoint, modality, signal: Signal, code: Tensor, meta: dict,
                max_abs_error: float | None, max_rel_error: float | None
                ) -> tuple[dict, bytes, Tensor, dict]:
    """One item's residual: its metadata, its bytes, the bounded prediction and a row for
    the report. The plugin's ``reconstruct`` runs on the metadata as the decoder will see
    it, so the residual is taken against exactly the prediction the decoder computes."""
    seen = bs.json_roundtrip(meta)
    scale = res.value_scale(modality, seen)
    ulp = res.output_ulp(modality, seen)
    targets = signal.targets.double().numpy()
    valid = (signal.mask.numpy().astype(bool) if signal.mask is not None
             else np.ones(signal.n_points, dtype=bool))
    if max_abs_error is not None:
        bound = float(max_abs_error)
    else:
        t = targets[valid]
        bound = float(max_rel_error) * float(t.max() - t.min()) * scale
        if not bound > 0:
            raise res.BoundError("the item's values are all equal: a relative bound is 0; "
                                 "give an absolute bound")
    capture = res.Capture(predictor(ck, modality, code), signal.n_points)
    modality.reconstruct(seen, capture, default_options(modality))
    if capture.pred is None:
        raise res.BoundError(f"the {modality.name!r} plugin's reconstruct never calls "
                             "predict: it cannot encode with an error bound")
    pred = capture.pred.numpy()
    q, step, err = res.quantize(targets, pred, valid, scale, bound, ulp)
    rmeta, rdata = res.encode_residual(q)
    rmeta.update(points=signal.n_points, channels=int(targets.shape[1]), step=step,
                 max_abs_error=bound)
    bounded = torch.from_numpy(pred + q.reshape(pred.shape) * step)
    return rmeta, rdata, bounded, {"bound": bound, "max_abs_error": err,
                                   "residual_bytes": len(rdata), "model": rmeta["model"]}


@dataclass
class Decoded:
    """What a stream decodes to: the plugin, its artifacts, and the stream's numbers."""

    modality: Any
    artifacts: list[Any]
    stream: bs.Bitstream
    n_bytes: int
    n_values: int  # of the signals encoded (the modality's n_values, kept in the stream)

    @property
    def bits_per_value(self) -> float | None:
        """None for streams that do not record their items' value counts."""
        return 8 * self.n_bytes / self.n_values if self.n_values > 0 else None

    @property
    def max_abs_error(self) -> float | None:
        """The largest error bound of the stream's items (None: not error-bounded)."""
        common = self.stream.extra.get("common", {})
        found = [merge_common(common, m).get("residual", {}).get("max_abs_error")
                 for m in self.stream.items_meta]
        found = [float(v) for v in found if v is not None]
        return max(found) if found else None


def decode_stream(data: bytes, ck: Checkpoint, options: Any = None,
                  modality: Any = None) -> Decoded:
    """Bytes → artifacts, rebuilt by the plugin named in the stream.

    ``modality``: a plugin object to use instead of the installed one of that name
    (a plugin under development); it must carry the stream's modality name.

    The stream may be forged (see :mod:`mscn_core.bitstream`): every item's metadata is
    checked by the plugin's ``check_meta`` and the total output is compared with
    :func:`mscn_core.limits.max_output_values` before any payload is decoded.
    """
    stream = bs.read_bitstream(data, expected_checkpoint_hash=ck.sha256)
    if modality is None:
        modality = get_modality(stream.modality)
    elif modality.name != stream.modality:
        raise ValueError(f"the stream holds {stream.modality!r} items, not {modality.name!r}")
    else:
        modality = with_defaults(modality)  # a duck-typed plugin gets check_meta's default
    modality.load_state(ck.modality_state)
    n_values = check_items(stream, modality, ck.rep.code_size(), options)
    artifacts = []
    with progress(len(stream.payloads), "decode") as bar:
        for i in range(len(stream.payloads)):
            artifacts.append(decode_item(stream, i, ck, modality, options))
            bar.update()
    return Decoded(modality, artifacts, stream, len(data), n_values)


def decode_item(stream: bs.Bitstream, index: int, ck: Checkpoint, modality: Any,
                options: Any = None) -> Any:
    """One item of a parsed stream → its artifact, so a reader can decode items lazily.

    The caller has loaded the checkpoint's state into ``modality`` and validated the
    stream with :func:`check_items` (as :func:`decode_stream` does): this decodes one
    payload only, with memory bounded by that item.
    """
    if not 0 <= index < len(stream.payloads):
        raise IndexError(f"item {index} out of range: the stream holds "
                         f"{len(stream.payloads)} items")
    q, model = quantizer(ck, stream.bits)
    n_code = ck.rep.code_size()
    meta = merge_common(stream.extra.get("common", {}), stream.items_meta[index])
    rmeta = meta.pop("residual", None)
    payload = stream.payloads[index]
    code_bytes = payload if rmeta is None else payload[:len(payload) - rmeta["bytes"]]
    try:
        symbols = decode_symbols(code_bytes, n_code, model)
        code = torch.from_numpy(q.dequantize(symbols[None])).float()[0]
        predict = predictor(ck, modality, code)
        if rmeta is not None:
            ints = res.decode_residual(rmeta, payload[len(code_bytes):])
            values = ints.reshape(rmeta["points"], rmeta["channels"]) * float(rmeta["step"])
            predict = res.Residual(values).wrap(predict)
    except ValueError as err:
        raise bs.BitstreamError(f"item {index}: {limits.one_line(err)}") from None
    return modality.reconstruct(meta, predict, options)


# constriction's range coder emits at least one 32-bit word for >= 1 symbol
MIN_PAYLOAD_BYTES = 4


def check_items(stream: bs.Bitstream, modality: Any, n_code: int, options: Any = None
                ) -> int:
    """The stream's total ``n_values``, after checking every item for what a forged
    stream could abuse (raises :class:`~mscn_core.bitstream.BitstreamError`).

    In order, so that nothing is sized by an unchecked number: payload lengths (each
    item needs ``MIN_PAYLOAD_BYTES``, so the item count is bounded by the payload bytes),
    then per item ``n_values`` and the plugin's ``check_meta``, and the running total of
    output values against :func:`mscn_core.limits.max_output_values`.
    """
    need = MIN_PAYLOAD_BYTES if n_code > 0 else 0
    for i, payload in enumerate(stream.payloads):
        if len(payload) < need or len(payload) % 4:
            raise bs.BitstreamError(f"item {i}: a payload of {len(payload)} bytes cannot hold "
                                    f"{n_code} coded values")
    common = stream.extra.get("common", {})
    if not isinstance(common, dict):
        raise bs.BitstreamError("malformed header JSON: extra.common must be an object")
    limit = limits.max_output_values()
    n_values = total = 0
    for i, rest in enumerate(stream.items_meta):
        try:
            meta = merge_common(common, rest)
            if "residual" in meta:
                if stream.version < bs.BOUNDED_VERSION:
                    raise ValueError(f"a residual in a format-{stream.version} stream")
                total += res.check_residual(meta.pop("residual"), len(stream.payloads[i]),
                                            need)
            n_values += limits.check_count(meta.get("n_values", 0), "n_values", 0)
            count = limits.check_count(modality.check_meta(meta, options),
                                       f"{modality.name}.check_meta()", 0)
        except RecursionError:
            raise bs.BitstreamError(f"item {i}: metadata nested too deeply") from None
        except (ValueError, TypeError, KeyError) as err:
            raise bs.BitstreamError(f"item {i}: {limits.one_line(err)}") from None
        total += count
        if total > limit:
            try:
                limits.check_output_values(total, f"the stream (up to item {i})")
            except limits.LimitError as err:
                raise bs.BitstreamError(str(err)) from None
    return n_values


# -- skill scores: how much of the error a reference leaves the codec removes ------------
def target_mse(signal: Signal, pred: Tensor) -> float:
    """Mean squared error in target units over valid points and channels."""
    err = (pred.detach().double() - signal.targets.double()) ** 2
    if signal.mask is not None:
        err = err[signal.mask.bool()]
    return float(err.mean())


def skill(mse: float, reference_mse: float | None) -> float | None:
    """``1 - MSE / MSE_ref`` (1: perfect, 0: no better than the reference); None when the
    reference is itself perfect or absent."""
    if reference_mse is None or not reference_mse > 0:
        return None
    return 1.0 - mse / reference_mse


def initial_predictions(ck: Checkpoint, modality, signals: Sequence[Signal]) -> list[Tensor]:
    """What the meta-learned network predicts before any adaptation (its initial
    modulations): the "training mean" reference. Empty for non-meta-learned methods."""
    if not ck.rep.meta_learned:
        return []
    with torch.no_grad():
        code = ck.rep.code_values(ck.rep.init_state(1))[0]
    predict = predictor(ck, modality, code)
    return [predict(s.coords) for s in signals]


def group_mean_mse(signals: Sequence[Signal], groups: Sequence[Any]) -> list[float | None]:
    """Per item, the MSE of its group's per-point mean target (over the items of the
    group valid there, the item included). None: no group, a group of one, or items of
    different shapes in the group."""
    out: list[float | None] = [None] * len(signals)
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None:
            members.setdefault(g, []).append(i)
    for idx in members.values():
        shapes = {tuple(signals[i].targets.shape) for i in idx}
        if len(idx) < 2 or len(shapes) != 1:
            continue
        total = torch.zeros(next(iter(shapes)), dtype=torch.float64)
        count = torch.zeros(total.shape[0], 1, dtype=torch.float64)
        for i in idx:
            valid = _valid(signals[i])
            total += signals[i].targets.double() * valid
            count += valid
        clim = total / count.clamp_min(1)
        for i in idx:
            out[i] = target_mse(signals[i], clim)
    return out


def _valid(signal: Signal) -> Tensor:
    if signal.mask is None:
        return torch.ones(signal.n_points, 1, dtype=torch.float64)
    return signal.mask.reshape(-1, 1).double()


def psnr(mse: float) -> float:
    return -10 * math.log10(max(mse, 1e-20))


def _as_checkpoint(checkpoint: Checkpoint | str) -> Checkpoint:
    from .checkpoint import load_checkpoint

    return checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)


def encode(items: Sequence[Any] | Any, checkpoint: Checkpoint | str, bits: int = 6,
           options: Any = None, refine_steps: int = 0) -> bytes:
    """Items of the checkpoint's modality (e.g. 2-D DataArrays) → one .mscn stream.

    ``options``: the modality's options dataclass (e.g. which metadata to keep);
    ``refine_steps``: encode-time refinement (:func:`refine_codes`), slower, better.
    """
    ck = _as_checkpoint(checkpoint)
    modality = get_modality(ck.modality)
    modality.load_state(ck.modality_state)
    items = list(items) if isinstance(items, list | tuple) else [items]
    return encode_items(ck, modality, items, bits=bits, with_metrics=False,
                        options=options, refine_steps=refine_steps)[0]


def decode(data: bytes, checkpoint: Checkpoint | str, options: Any = None) -> list[Any]:
    """A .mscn stream → the artifacts (e.g. DataArrays), rebuilt by the named plugin.

    ``options``: the modality's options dataclass (e.g. an output resolution).
    """
    return decode_stream(data, _as_checkpoint(checkpoint), options).artifacts
