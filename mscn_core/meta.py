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
from .signals import Batch, Signal, full_batches, sample_batch, whole_signal


class DivergedError(ValueError):
    """Meta-training kept diverging after every rollback: a setting the user can change
    (the outer learning rate), so the CLI reports it in one line."""


def item_losses(rep: Representation, modality, state: dict[str, Tensor],
                ctx: dict[str, Tensor], batch: Batch) -> Tensor:
    """Per-item losses ``(B,)``: the modality's objective of the items' adapted fields."""
    return modality.objective(lambda points: rep.predict(state, ctx, points), batch)


def adapt(rep: Representation, batch: Batch, modality, *, steps: int | None = None,
          training: bool = False, first_order: bool = False, checkpoint_steps: bool = False,
          resample: Callable[[int], Batch] | None = None,
          ctx: dict[str, Tensor] | None = None
          ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Fit per-item states to a batch; differentiable w.r.t. the meta-parameters if training.

    ``resample(step)`` gives each inner step its own batch (encode-time sample budget for
    items larger than one step may hold); without it every step sees ``batch``.
    ``ctx``: the batch's context (sampled gates) when the caller drew it (distributed
    meta-training draws it for the global batch and keeps this rank's rows).
    """
    if not rep.meta_learned:
        return fit_from_scratch(rep, batch, modality, steps, resample=resample), {}
    steps = rep.cfg.inner_steps if steps is None else steps
    n_items = batch.coords.shape[0]
    if ctx is None:
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
    log_path: str | None = None  # JSONL of per-step metrics (the CLI: OUTPUT.train/metrics.jsonl)
    progress: bool = True  # progress bar
    # folder of the training-state files state.pt / state.prev.pt (the CLI: OUTPUT.train)
    state_dir: str | None = None
    save_every: int = 100  # outer steps between training-state saves (0: by steps never)
    save_seconds: float | None = None  # also save when this many seconds passed since the last
    resume: bool = False  # continue from the state in state_dir (bitwise the same result)
    tensorboard_dir: str | None = None  # also write TensorBoard scalars here


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


def slot_seed(seed: int, step: int, slot: int) -> int:
    """A 63-bit seed for (run seed, outer step, batch slot): splitmix64 of the three.

    Why per slot: a slot's samples then do not depend on which process draws it, so one
    process and N processes train on the same samples.
    """
    x = 0
    for v in (seed, step, slot):
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


def _slot_generators(seed: int, step: int, slots: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(slot_seed(seed, step, s)) for s in slots]


# Settings that change the trajectory: a resumed run must match them (outer_steps,
# saving, logging, device and process count may change).
_TRAJECTORY = ("outer_lr", "batch_size", "points_per_item", "first_order", "grad_clip",
               "ema_decay", "val_every", "val_points", "divergence_factor", "seed", "bf16")


def fingerprint(siren_cfg, method_cfg, cfg: TrainConfig, n_train: int, n_val: int) -> dict:
    """What a resumed run must share with the saved one (``trainstate.mismatch``)."""
    fp: dict = {"n_train": n_train, "n_val": n_val}
    for prefix, conf in (("siren", siren_cfg), ("method", method_cfg)):
        fp.update({f"{prefix}.{k}": v for k, v in asdict(conf).items()})
    fp.update({k: getattr(cfg, k) for k in _TRAJECTORY})
    return json.loads(json.dumps(fp))  # as it reads back from a state file


def _batch_context(rep: Representation, n: int, rows: list[int],
                   device: torch.device) -> dict[str, Tensor]:
    """The context of the global batch of ``n`` items (same random draws on every rank),
    restricted to ``rows``. A tensor is per item when its leading size follows the batch
    size (probed with n + 1 items under a forked RNG, so the probe draws nothing)."""
    full = rep.context(n, True)
    if rows == list(range(n)):
        return full
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = rep.context(n + 1, True)
    index = torch.tensor(rows, dtype=torch.long)
    out = {}
    for k, v in full.items():
        per_item = v.dim() > 0 and v.shape[0] == n and probe[k].shape[0] == n + 1
        out[k] = v[index.to(v.device)] if per_item else v
    return out


class _Log:
    """JSONL log (rank 0). ``lazy``: records wait in memory until :meth:`open` (the first
    state save, or the end of the run), so an early interrupt leaves no file behind."""

    def __init__(self, path: str | None, lazy: bool,
                 on_log: Callable[[dict], None] | None) -> None:
        self.path, self.on_log = path, on_log
        self.file = None
        self.pending: list[str] = []
        if path and not lazy:
            self.open()

    def open(self) -> None:
        if self.file is None and self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
            self.file.writelines(self.pending)
            self.file.flush()
            self.pending = []

    def __call__(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self.file:
            self.file.write(line)
            self.file.flush()
        elif self.path:
            self.pending.append(line)
        if self.on_log:
            self.on_log(record)

    def close(self) -> None:
        if self.file:
            self.file.close()


def meta_train(rep: Representation, train: Sequence[Signal], val: Sequence[Signal],
               cfg: TrainConfig, modality,
               on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Meta-learn θ0, gates and rates; keeps the best validation state, rolls back on divergence.

    The modality samples each item (``sample``) and scores it (``objective``).

    Resumable: with ``cfg.state_dir`` rank 0 saves the whole training state every
    ``save_every`` steps / ``save_seconds`` seconds (:mod:`mscn_core.trainstate`), and
    ``cfg.resume`` continues from it to the bit-identical result.

    Data-parallel when a ``torch.distributed`` process group is initialised
    (:mod:`mscn_core.distributed`). The global batch's item indices come from the shared
    seeded generator, rank r takes slots r, r+W, …, each slot's points come from its own
    generator (:func:`slot_seed`) and the gate context is drawn for the global batch, so
    the ranks together compute exactly the single-process batch. Each rank's loss is its
    slots' sum / global B; the meta-gradient is all-reduced (SUM, one flat buffer: manual
    all-reduce, no DistributedDataParallel, which would not see the inner loop's second
    order graph any better) before clipping, so clip, Adam, EMA and rollbacks are the same
    on every rank; the regulariser is added on rank 0 only. Validation is sharded and
    all-reduced per item, so every rank takes the same keep-best/rollback decisions.
    Only rank 0 writes the log, TensorBoard and state files and shows the bar.
    """
    from . import distributed as dist
    from .trainstate import cut_log, load_state, mismatch, save_state

    if not train:
        raise ValueError("meta_train needs at least one training signal")
    val = list(val) or list(train[: max(1, len(train) // 8)])
    world, rank = dist.world_size(), dist.rank()
    main = rank == 0
    n_batch = min(cfg.batch_size, len(train))
    if world > n_batch:
        raise ValueError(f"{world} processes for a batch of {n_batch} items: use at most "
                         f"{n_batch} processes")
    mine = list(range(rank, n_batch, world))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(dist.device_for(cfg.device))
    rep.to(device)
    dist.broadcast_module(rep)

    t0 = time.perf_counter()
    if not rep.meta_learned:  # COIN has nothing to meta-learn
        val_loss = evaluate_loss(rep, val, modality, cfg.val_points, device=str(device))
        return TrainResult(val_loss, 0, 0, 0, time.perf_counter() - t0)

    fprint = fingerprint(rep.siren_cfg, rep.cfg, cfg, len(train), len(val))
    saved = None
    if cfg.resume:
        if not cfg.state_dir:
            raise ValueError("resume needs a state_dir")
        saved, saved_path = load_state(cfg.state_dir)
        diff = mismatch(json.loads(saved["fingerprint"]), fprint)
        if diff:
            raise ValueError(f"{saved_path}: cannot resume, the settings differ ({diff}); "
                             "run without --resume to start over")
        dist.barrier()  # every rank has read it before rank 0 may replace it
    lazy = bool(cfg.state_dir and cfg.log_path
                and Path(cfg.log_path).parent == Path(cfg.state_dir))
    if main and saved is not None and cfg.log_path:
        cut_log(cfg.log_path, int(saved["step"]))
    log = _Log(cfg.log_path if main else None, lazy and saved is None, on_log if main else None)

    params = [p for p in rep.parameters() if p.requires_grad]
    lr = cfg.outer_lr
    opt = torch.optim.Adam(params, lr=lr)
    ema = _Ema(rep, cfg.ema_decay) if cfg.ema_decay else None

    def val_loss_now() -> float:
        if ema is None:
            return _sharded_val_loss(rep, val, modality, cfg, device, rank, world)
        live = copy.deepcopy(rep.state_dict())
        rep.load_state_dict(ema.shadow)
        try:
            return _sharded_val_loss(rep, val, modality, cfg, device, rank, world)
        finally:
            rep.load_state_dict(live)

    rollbacks, history, start = 0, [], 0
    if saved is None:
        best = {"loss": val_loss_now(), "step": 0,
                "state": copy.deepcopy(ema.shadow if ema else rep.state_dict()),
                "live": copy.deepcopy(rep.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
        log({"step": 0, "val_loss": best["loss"], "lr": lr})
    else:
        rep.load_state_dict(saved["rep"])
        lr, rollbacks, start = float(saved["lr"]), int(saved["rollbacks"]), int(saved["step"])
        opt = torch.optim.Adam(params, lr=lr)
        opt.load_state_dict(saved["opt"])
        if ema:
            ema.shadow = {k: v.to(device) for k, v in saved["ema"].items()}
        best = dict(saved["best"])
        history = json.loads(saved["history"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        gen.set_state(saved["gen"])
        t0 -= float(saved.get("seconds", 0.0))

    writer = None
    if main and cfg.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(cfg.tensorboard_dir,
                               purge_step=start + 1 if saved is not None else None)
    bar = None
    if cfg.progress and main:
        bar = tqdm(total=cfg.outer_steps, initial=start, desc=f"meta-train {rep.name}",
                   unit="step")
    t_run, last_save = time.perf_counter(), time.perf_counter()

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

    def save(step: int) -> None:
        log.open()  # the log reaches the disk before the state that it must not outrun
        payload = {
            "step": step, "rep": rep.state_dict(), "opt": opt.state_dict(), "lr": lr,
            "rollbacks": rollbacks, "best": best,
            "ema": ema.shadow if ema else None, "history": json.dumps(history),
            "rng": torch.get_rng_state(), "gen": gen.get_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "fingerprint": json.dumps(fprint),
            "seconds": time.perf_counter() - t0}
        save_state(cfg.state_dir, payload)

    step = start
    finished = False
    try:
        for step in range(start + 1, cfg.outer_steps + 1):
            idx = torch.randint(len(train), (n_batch,), generator=gen)
            gens = _slot_generators(cfg.seed, step, mine)
            b = sample_batch(modality, [train[int(idx[s])] for s in mine], cfg.points_per_item,
                             gens)
            b = b.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                ctx = _batch_context(rep, n_batch, mine, device)
                state, ctx = adapt(rep, b, modality, training=True,
                                   first_order=cfg.first_order,
                                   checkpoint_steps=cfg.checkpoint_steps, ctx=ctx)
                loss = item_losses(rep, modality, state, ctx, b).float().sum() / n_batch
                reg = rep.regularizer()
                total = loss + reg if main else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            dist.all_reduce_grads(params)
            loss_value = float(dist.all_reduce_sum(loss.detach().clone()))
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            if not (math.isfinite(loss_value + float(reg.detach())) and math.isfinite(gnorm)):
                rollback("non-finite loss or gradient", step)
                continue
            opt.step()
            if ema:
                ema.update(rep)
            note = rep.after_outer_step(step)
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
            if writer:
                for k in ("loss", "psnr", "grad_norm", "lr", "val_loss"):
                    if k in record:
                        writer.add_scalar(f"train/{k}", record[k], step)
            now = time.perf_counter()
            if main and cfg.state_dir and step < cfg.outer_steps and (
                    (cfg.save_every and step % cfg.save_every == 0)
                    or (cfg.save_seconds is not None and now - last_save >= cfg.save_seconds)):
                save(step)
                last_save = now
            if bar:
                bar.update(1)
                rate = (step - start) * n_batch / max(now - t_run, 1e-9)
                bar.set_postfix({"items/s": f"{rate:.1f}", "loss": f"{loss_value:.2e}",
                                 "best_val": f"{best['loss']:.2e}"})
        finished = True
    except Exception:
        finished = True  # a failed run (diverged) keeps its log: what to look at
        raise
    finally:
        if bar:
            bar.close()
        if writer:
            writer.close()
        if finished:
            log.open()
        log.close()
    rep.load_state_dict(best["state"])  # keep-best
    return TrainResult(best["loss"], best["step"], step, rollbacks,
                       time.perf_counter() - t0, history)


def _sharded_val_loss(rep: Representation, val: Sequence[Signal], modality, cfg: TrainConfig,
                      device: torch.device, rank: int, world: int, max_batch: int = 16
                      ) -> float:
    """Mean post-adaptation loss over the validation items, this rank's share computed here.

    Each item's samples come from its own generator (the same at every validation), and
    the per-item losses are all-reduced into one vector (zeros elsewhere, so the sum is
    exact) and averaged in item order: every rank, and any process count, sees the same
    number, hence the same keep-best and rollback decisions.
    """
    from . import distributed as dist

    losses = torch.zeros(len(val), dtype=torch.float64, device=device)
    shard = list(range(rank, len(val), world))
    for i in range(0, len(shard), max_batch):
        chunk = shard[i:i + max_batch]
        sigs = [val[j] for j in chunk]
        if cfg.val_points is None:
            parts = [whole_signal(s) for s in sigs]
            if len({s.n_points for s in sigs}) > 1:
                for j, p in zip(chunk, parts, strict=True):
                    losses[j] = _adapted_losses(rep, modality, p.to(device))[0].double()
                continue
            b = Batch(*(torch.cat(x) for x in zip(*parts, strict=True)))
        else:
            gens = [torch.Generator().manual_seed(slot_seed(cfg.seed, -1, j)) for j in chunk]
            b = sample_batch(modality, sigs, cfg.val_points, gens)
        losses[chunk] = _adapted_losses(rep, modality, b.to(device)).double()
    dist.all_reduce_sum(losses)
    return float(losses.mean())


def _adapted_losses(rep: Representation, modality, b: Batch) -> Tensor:
    state, ctx = adapt(rep, b, modality)
    with torch.no_grad():
        return item_losses(rep, modality, state, ctx, b)

def train_config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
