"""MetaSGD inner loop and the guarded outer loop (DESIGN §2, §8).

The inner loop is batched over items: one ``autograd.grad`` of the summed per-item
losses gives every item its own gradient, because items share no per-item state
(``grad_impl="vmap"`` computes the same with torch.func for per-item weight methods).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .methods import Coin, Representation
from .signals import Batch, Signal, full_batches, sample_batch


class DivergedError(ValueError):
    """Meta-training kept diverging after every rollback: a setting the user can change
    (the outer learning rate), so the CLI reports it in one line."""


def item_losses(rep: Representation, modality, state: dict[str, Tensor],
                ctx: dict[str, Tensor], batch: Batch) -> Tensor:
    """Per-item losses ``(B,)``: the modality's objective of the items' adapted fields."""
    return modality.objective(lambda points: rep.predict(state, ctx, points), batch)


def adapt(rep: Representation, batch: Batch, modality, *, steps: int | None = None,
          training: bool = False, first_order: bool = False, checkpoint_steps: bool = False,
          resample: Callable[[int], Batch] | None = None
          ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Fit per-item states to a batch; differentiable w.r.t. the meta-parameters if training.

    ``resample(step)`` gives each inner step its own batch (encode-time sample budget for
    items larger than one step may hold); without it every step sees ``batch``.
    """
    if not rep.meta_learned:
        return fit_from_scratch(rep, batch, modality, steps, resample=resample), {}
    steps = rep.cfg.inner_steps if steps is None else steps
    n_items = batch.coords.shape[0]
    ctx = rep.context(n_items, training)
    state = rep.init_state(n_items)
    names = list(state)
    create_graph = training and not first_order
    per_item_grads = _vmap_grads(rep, modality) if rep.cfg.grad_impl == "vmap" else None

    def make_step(b: Batch):
        def step(*tensors: Tensor) -> tuple[Tensor, ...]:
            if per_item_grads is not None:
                grads = per_item_grads(tensors, *b)
                if not create_graph:
                    grads = tuple(g.detach() for g in grads)
            else:
                st = dict(zip(names, tensors, strict=True))
                loss = item_losses(rep, modality, st, ctx, b).sum()
                grads = torch.autograd.grad(loss, tensors, create_graph=create_graph)
            rates = rep.inner_rates(ctx)
            return tuple(t - rates[n] * g for n, t, g in zip(names, tensors, grads, strict=True))
        return step

    with torch.enable_grad():
        tensors = tuple(state[n] for n in names)
        for k in range(steps):
            step = make_step(batch if resample is None or k == 0 else resample(k))
            if checkpoint_steps and training:
                tensors = checkpoint(step, *tensors, use_reentrant=False)
            else:
                tensors = step(*tensors)
            if not training:
                tensors = tuple(t.detach().requires_grad_(True) for t in tensors)
    return dict(zip(names, tensors, strict=True)), ctx


def _vmap_grads(rep: Representation, modality):
    """Per-item inner gradients as ``vmap(grad(loss of functional_call(net, θ_i)))``.

    §3.3.1 as the paper states it: each item's own copy of the weights, called through
    ``torch.func.functional_call`` on the shared module (the per-item weight methods
    predict with the plain network, so no context is needed). Differentiable by the outer
    autograd (second-order meta-gradients), like the default batched-matmul path.
    """
    from torch.func import functional_call, grad, vmap

    param_names = [name for name, _ in rep.net.named_parameters()]

    def item_loss(params: tuple[Tensor, ...], coords: Tensor, targets: Tensor,
                  weights: Tensor) -> Tensor:
        def field(points: Tensor) -> Tensor:
            return functional_call(rep.net, dict(zip(param_names, params, strict=True)),
                                   (points,))
        one = Batch(coords.unsqueeze(0), targets.unsqueeze(0), weights.unsqueeze(0))
        return modality.objective(field, one).sum()

    return vmap(grad(item_loss))


def fit_from_scratch(rep: Coin, batch: Batch, modality, steps: int | None = None,
                     callback: Callable[[int, dict], bool] | None = None,
                     resample: Callable[[int], Batch] | None = None) -> dict[str, Tensor]:
    """COIN-style fitting: ``torch.optim.Adam`` on a fresh network per item.

    Adam is elementwise and the summed loss gives each item its own gradient, so one
    optimiser over the batched weights is exactly one Adam per item (no item loop).
    ``callback(step, state)`` may return True to stop early (e.g. a target PSNR reached).
    """
    steps = rep.cfg.coin_steps if steps is None else steps
    state = rep.init_state(batch.coords.shape[0])
    opt = torch.optim.Adam(list(state.values()), lr=rep.cfg.coin_lr)
    # long fits show a bar (on a terminal only: tqdm's disable=None)
    bar = tqdm(total=steps, desc="fit from scratch", leave=False, disable=None if steps >= 100
               else True)
    with bar, torch.enable_grad():
        for t in range(1, steps + 1):
            bar.update()
            b = batch if resample is None or t == 1 else resample(t - 1)
            opt.zero_grad(set_to_none=True)
            item_losses(rep, modality, state, {}, b).sum().backward()
            opt.step()
            if callback is not None and callback(t, state):
                break
    return {n: v.detach() for n, v in state.items()}


@dataclass
class TrainConfig:
    """Outer loop; defaults follow the paper (Adam 3e-6) with the guards of DESIGN §8."""

    outer_steps: int = 1000  # outer (meta) optimisation steps
    outer_lr: float = 3e-6  # outer Adam learning rate (the paper's 3e-6)
    batch_size: int = 32  # items per outer step
    points_per_item: int = 4096  # samples (points, rays) per item and outer step
    first_order: bool = False  # drop second-order terms of the meta-gradient
    checkpoint_steps: bool = False  # per-step gradient checkpointing (less memory)
    grad_clip: float = 1.0  # global gradient-norm clip
    ema_decay: float | None = None  # EMA of meta-parameters, used for validation and saving
    val_every: int = 50  # outer steps between validations (keep-best, rollback)
    val_points: int = 4096  # samples per validation item
    divergence_factor: float = 2.0  # val loss above factor × best → roll back, halve the rate
    max_rollbacks: int = 6  # give up after this many divergence rollbacks
    seed: int = 0  # seeds init, batches, points and gates
    device: str = "cpu"  # torch device: cpu, cuda, cuda:1, …
    bf16: bool = False  # bfloat16 autocast for the forward passes
    log_path: str | None = None  # JSONL of per-step metrics
    progress: bool = True  # progress bar


@dataclass
class TrainResult:
    best_val_loss: float
    best_step: int
    steps_run: int
    rollbacks: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def evaluate_loss(rep: Representation, signals: Sequence[Signal], modality,
                  n_points: int | None = None, seed: int = 0, max_batch: int = 16,
                  device: str = "cpu") -> float:
    """Mean post-adaptation loss over items (fixed samples, so runs are comparable)."""
    losses = []
    if n_points is None:
        batches = (b for _, b in full_batches(signals, max_batch))
    else:
        g = torch.Generator().manual_seed(seed)
        batches = (sample_batch(modality, signals[i:i + max_batch], n_points, g)
                   for i in range(0, len(signals), max_batch))
    for b in batches:
        b = b.to(device)
        state, ctx = adapt(rep, b, modality)
        with torch.no_grad():
            losses.append(item_losses(rep, modality, state, ctx, b))
    return float(torch.cat(losses).mean())


class _Ema:
    def __init__(self, rep: Representation, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in rep.state_dict().items()}

    def update(self, rep: Representation) -> None:
        with torch.no_grad():
            for k, v in rep.state_dict().items():
                if v.dtype.is_floating_point:
                    self.shadow[k].mul_(self.decay).add_(v, alpha=1 - self.decay)
                else:
                    self.shadow[k].copy_(v)


def meta_train(rep: Representation, train: Sequence[Signal], val: Sequence[Signal],
               cfg: TrainConfig, modality,
               on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Meta-learn θ0, gates and rates; keeps the best validation state, rolls back on divergence.

    The modality samples each item (``sample``) and scores it (``objective``).
    """
    if not train:
        raise ValueError("meta_train needs at least one training signal")
    val = list(val) or list(train[: max(1, len(train) // 8)])
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    rep.to(device)
    log_file = None
    if cfg.log_path:
        Path(cfg.log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(cfg.log_path, "a")  # noqa: SIM115 - closed in finally

    def log(record: dict) -> None:
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if on_log:
            on_log(record)

    t0 = time.perf_counter()
    if not rep.meta_learned:  # COIN has nothing to meta-learn
        val_loss = evaluate_loss(rep, val, modality, cfg.val_points, device=str(device))
        return TrainResult(val_loss, 0, 0, 0, time.perf_counter() - t0)

    params = [p for p in rep.parameters() if p.requires_grad]
    lr = cfg.outer_lr
    opt = torch.optim.Adam(params, lr=lr)
    ema = _Ema(rep, cfg.ema_decay) if cfg.ema_decay else None

    def val_loss_now() -> float:
        if ema is None:
            return evaluate_loss(rep, val, modality, cfg.val_points, device=str(device))
        live = copy.deepcopy(rep.state_dict())
        rep.load_state_dict(ema.shadow)
        try:
            return evaluate_loss(rep, val, modality, cfg.val_points, device=str(device))
        finally:
            rep.load_state_dict(live)

    best = {"loss": val_loss_now(), "step": 0,
            "state": copy.deepcopy(ema.shadow if ema else rep.state_dict()),
            "live": copy.deepcopy(rep.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    log({"step": 0, "val_loss": best["loss"], "lr": lr})
    rollbacks, history = 0, []
    bar = None
    if cfg.progress:
        bar = tqdm(total=cfg.outer_steps, desc=f"meta-train {rep.name}", unit="step")

    def rollback(reason: str, step: int) -> None:
        nonlocal lr, rollbacks, opt
        rollbacks += 1
        lr *= 0.5
        rep.load_state_dict(best["live"])
        opt = torch.optim.Adam(params, lr=lr)
        if ema:
            ema.shadow = copy.deepcopy(best["state"])
        log({"step": step, "event": "rollback", "reason": reason, "new_lr": lr})
        if rollbacks > cfg.max_rollbacks:
            raise DivergedError(f"meta-training diverged {rollbacks} times ({reason}); "
                               f"last rate {lr:g}. Lower --outer-lr.")

    step = 0
    try:
        for step in range(1, cfg.outer_steps + 1):
            idx = torch.randint(len(train), (min(cfg.batch_size, len(train)),), generator=gen)
            b = sample_batch(modality, [train[i] for i in idx], cfg.points_per_item, gen)
            b = b.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                state, ctx = adapt(rep, b, modality, training=True,
                                   first_order=cfg.first_order,
                                   checkpoint_steps=cfg.checkpoint_steps)
                loss = item_losses(rep, modality, state, ctx, b).float().mean()
                total = loss + rep.regularizer()
            opt.zero_grad(set_to_none=True)
            total.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            if not (math.isfinite(float(total.detach())) and math.isfinite(gnorm)):
                rollback("non-finite loss or gradient", step)
                continue
            opt.step()
            if ema:
                ema.update(rep)
            note = rep.after_outer_step(step)
            loss_value = float(loss.detach())
            record = {"step": step, "loss": loss_value,
                      "psnr": -10 * math.log10(max(loss_value, 1e-12)), "grad_norm": gnorm,
                      "lr": lr}
            if note:
                record["event"] = note
                # Pruning changes the model: the old best no longer describes it.
                best["loss"] = math.inf
            if step % cfg.val_every == 0 or step == cfg.outer_steps:
                vl = val_loss_now()
                record["val_loss"] = vl
                if not math.isfinite(vl) or vl > cfg.divergence_factor * best["loss"]:
                    rollback(f"validation loss {vl:.4g} vs best {best['loss']:.4g}", step)
                elif vl < best["loss"]:
                    best.update(loss=vl, step=step,
                                state=copy.deepcopy(ema.shadow if ema else rep.state_dict()),
                                live=copy.deepcopy(rep.state_dict()),
                                opt=copy.deepcopy(opt.state_dict()))
            history.append(record)
            log(record)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.2e}", best_val=f"{best['loss']:.2e}")
    finally:
        if bar:
            bar.close()
        if log_file:
            log_file.close()
    rep.load_state_dict(best["state"])  # keep-best
    return TrainResult(best["loss"], best["step"], step, rollbacks,
                       time.perf_counter() - t0, history)


def train_config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
