"""The representations compared in the paper, behind one interface.

Each method says what a *per-item state* is (the numbers that encode one signal), how
the shared network predicts from it, and which tensors the inner loop adapts with
which rates. The MetaSGD inner loop itself lives in ``meta.adapt`` and is the same
for all of them; nothing here loops over items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .gates import HardConcreteGates, deterministic_gates, sample_gates
from .siren import GatedSiren, SirenConfig, layer_shapes, siren_forward, siren_init

GRAD_IMPLS = ("bmm", "vmap")
# The one method registry: name -> Representation class, filled by @register below.
# METHODS is rebound to the final tuple of names at the end of this module.
REGISTRY: dict[str, type[Representation]] = {}
METHODS: tuple[str, ...] = ()


def register(cls: type[Representation]) -> type[Representation]:
    """Add a representation to the method registry under its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def per_item_weight_methods() -> tuple[str, ...]:
    return tuple(n for n, c in REGISTRY.items() if c.per_item_weights)


@dataclass
class MethodConfig:
    """Meta-learning settings; defaults follow the paper (MetaSGD, 3 inner steps)."""

    method: str = "mscn"  # structured MSCN or a baseline; mscn-grad = §3.3.1 sparse weight updates
    inner_steps: int = 3  # MetaSGD inner steps per item (training and fitting)
    lr_init_low: float = 0.005  # MetaSGD rates ~ U(low, high), clipped to (0, 1)
    lr_init_high: float = 0.1  # upper end of the initial MetaSGD rates
    budget: int | None = 256  # exact number of non-zero modulations (None: L0 penalty only)
    l0_weight: float = 0.0  # λ on E[L0]
    gate_keep_prob: float = 0.9  # initial P(gate ≠ 0)
    adapt_gates: bool = False  # eq. 8: gate logits adapt per item (pattern then costs bits)
    learn_init: bool = False  # learn the modulation init instead of zeros
    latent_dim: int = 256  # functa: latent size (= its modulation budget)
    maml_lr: float = 1e-2  # metasparseinr: plain MAML inner SGD rate
    prune_fraction: float = 0.2  # metasparseinr: fraction of survivors pruned per round
    prune_every: int = 100  # metasparseinr: outer steps between pruning rounds
    prune_rounds: int = 5  # metasparseinr: number of pruning rounds
    coin_steps: int = 1000  # coin: Adam steps from scratch per item
    coin_lr: float = 1e-4  # coin: Adam rate
    # How per-item inner gradients of per-item weights are batched (same numbers; timed by
    # bench/meta_step.py): "bmm" = one autograd.grad over (B, out, in) weights, "vmap" =
    # torch.func vmap(grad(functional_call)).
    grad_impl: str = "bmm"  # mscn-grad/metasparseinr: bmm (batched matmuls) or vmap (torch.func)

    def validate(self) -> None:
        if self.method not in REGISTRY:
            raise ValueError(f"unknown method {self.method!r}; choose one of "
                             f"{', '.join(REGISTRY)}")
        if self.grad_impl not in GRAD_IMPLS:
            raise ValueError(f"unknown grad_impl {self.grad_impl!r}; choose one of "
                             f"{', '.join(GRAD_IMPLS)}")
        if self.grad_impl == "vmap" and self.method not in per_item_weight_methods():
            raise ValueError(f"grad_impl='vmap' applies to the per-item weight methods "
                             f"({', '.join(per_item_weight_methods())}), not {self.method!r}")
        if self.inner_steps < 0:
            raise ValueError("inner_steps must be >= 0")
        if not 0 < self.lr_init_low <= self.lr_init_high < 1:
            raise ValueError("need 0 < lr_init_low <= lr_init_high < 1")


def _rates(shape: tuple[int, ...], cfg: MethodConfig, generator) -> nn.Parameter:
    u = torch.rand(shape, generator=generator)
    return nn.Parameter(cfg.lr_init_low + (cfg.lr_init_high - cfg.lr_init_low) * u)


def clip_rate(raw: Tensor) -> Tensor:
    """Learned rates stay in (0, 1): bounded rates are one of the outer-loop guards."""
    return raw.clamp(1e-6, 1.0)


class Representation(nn.Module):
    """Base class: per-item state, prediction, inner-loop rates and the transmitted code."""

    name = "base"
    meta_learned = True  # False: nothing shared is learnt, each item is fitted from scratch
    per_item_weights = False  # the per-item state is a copy of the network's weights
    refinable = True  # the code is per-item values a frozen network can be refined on

    def __init__(self, siren: SirenConfig, cfg: MethodConfig,
                 generator: torch.Generator | None = None):
        super().__init__()
        siren.validate()
        cfg.validate()
        self.siren_cfg = siren
        self.cfg = cfg
        self.net = GatedSiren(siren, generator)

    # -- per item -----------------------------------------------------------------
    def init_state(self, batch: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def context(self, batch: int, training: bool) -> dict[str, Tensor]:
        """Per-batch quantities fixed during the inner loop (e.g. sampled gates)."""
        return {}

    def predict(self, state: dict[str, Tensor], ctx: dict[str, Tensor], coords: Tensor) -> Tensor:
        raise NotImplementedError

    def inner_rates(self, ctx: dict[str, Tensor]) -> dict[str, Tensor]:
        """Elementwise step sizes (already gated) for every state tensor."""
        raise NotImplementedError

    def regularizer(self) -> Tensor:
        return torch.zeros(())

    # -- the code that is transmitted --------------------------------------------
    def code_mask(self) -> Tensor:
        """Boolean mask over the flattened state: which entries are transmitted."""
        raise NotImplementedError

    def code_values(self, state: dict[str, Tensor]) -> Tensor:
        flat = torch.cat([v.reshape(v.shape[0], -1) for v in state.values()], dim=1)
        return flat[:, self.code_mask()]

    def state_from_code(self, values: Tensor) -> dict[str, Tensor]:
        ref = self.init_state(values.shape[0])
        flat = torch.cat([v.detach().reshape(v.shape[0], -1) for v in ref.values()], dim=1)
        flat = flat.clone()
        flat[:, self.code_mask()] = values.to(flat.dtype)
        out, start = {}, 0
        for k, v in ref.items():
            n = v[0].numel()
            out[k] = flat[:, start:start + n].reshape(v.shape)
            start += n
        return out

    def code_size(self) -> int:
        return int(self.code_mask().sum())

    def after_outer_step(self, step: int) -> str | None:
        """Hook for outer-loop schedules (pruning); returns a message when it acts."""
        return None

    def describe_sparsity(self) -> dict:
        return {"code_size": self.code_size()}


@register
class StructuredMSCN(Representation):
    """§3.3.2: gated per-unit shifts; only modulations adapt (the paper's default)."""

    name = "mscn"
    use_gates = True

    def __init__(self, siren, cfg, generator=None):
        super().__init__(siren, cfg, generator)
        shape = (siren.depth - 1, siren.width)
        self.shift_rates = _rates(shape, cfg, generator)
        self.shift_init = nn.Parameter(torch.zeros(shape), requires_grad=cfg.learn_init)
        if self.use_gates:
            self.gates = HardConcreteGates(shape, cfg.gate_keep_prob, cfg.budget, generator)
            if cfg.adapt_gates:
                self.gate_rates = _rates(shape, cfg, generator)

    def init_state(self, batch):
        m = self.shift_init.expand(batch, *self.shift_init.shape)
        state = {"shifts": m if m.requires_grad else m.clone().requires_grad_(True)}
        if self.use_gates and self.cfg.adapt_gates:
            state["log_alpha"] = self.gates.log_alpha.expand(batch, *self.shift_init.shape)
        return state

    def context(self, batch, training):
        if not self.use_gates:
            return {}
        if self.cfg.adapt_gates:
            return {"u": torch.rand(batch, *self.shift_init.shape)} if training else {}
        return {"z": self.gates.train_gates(batch) if training else self.gates.test_gates()}

    def gate_values(self, state, ctx) -> Tensor | None:
        if not self.use_gates:
            return None
        if self.cfg.adapt_gates:
            la = state["log_alpha"]
            return sample_gates(la, ctx["u"]) if "u" in ctx else deterministic_gates(la)
        return ctx["z"]

    def predict(self, state, ctx, coords):
        z = self.gate_values(state, ctx)
        shifts = state["shifts"] if z is None else z * state["shifts"]
        return self.net(coords, shifts)

    def inner_rates(self, ctx):
        rates = {"shifts": clip_rate(self.shift_rates)}
        if self.use_gates and self.cfg.adapt_gates:
            rates["log_alpha"] = clip_rate(self.gate_rates)
        return rates

    def regularizer(self):
        if not self.use_gates or self.cfg.l0_weight == 0:
            return torch.zeros(())
        return self.cfg.l0_weight * self.gates.expected_l0()

    def code_mask(self):
        if self.use_gates and self.cfg.adapt_gates:
            raise NotImplementedError(
                "checkpoints trained with adapt_gates have a per-item sparsity pattern; "
                "the bitstream codes only the shared (compression-mode) pattern")
        if not self.use_gates:
            return torch.ones(self.shift_init.numel(), dtype=torch.bool)
        return (self.gates.test_gates() != 0).reshape(-1)

    def describe_sparsity(self):
        out = {"code_size": None, "per_layer_nonzero": None}
        if self.use_gates and not self.cfg.adapt_gates:
            z = self.gates.test_gates()
            out["per_layer_nonzero"] = [int(v) for v in (z != 0).sum(dim=1)]
            out["code_size"] = int((z != 0).sum())
        elif not self.use_gates:
            out["code_size"] = self.shift_init.numel()
        return out


@register
class DenseMetaSGD(StructuredMSCN):
    """All shifts adapt, no gates (dense MetaSGD modulations)."""

    name = "metasgd-dense"
    use_gates = False


@register
class Functa(Representation):
    """Functa: a latent vector, mapped linearly to dense shifts; MetaSGD on the latent."""

    name = "functa"

    def __init__(self, siren, cfg, generator=None):
        super().__init__(siren, cfg, generator)
        n_shift = siren.n_shifts
        self.latent_to_shifts = nn.Linear(cfg.latent_dim, n_shift)
        bound = 1.0 / math.sqrt(cfg.latent_dim)
        with torch.no_grad():
            self.latent_to_shifts.weight.uniform_(-bound, bound, generator=generator)
            self.latent_to_shifts.bias.zero_()
        self.latent_rates = _rates((cfg.latent_dim,), cfg, generator)
        self.latent_init = nn.Parameter(torch.zeros(cfg.latent_dim), requires_grad=cfg.learn_init)

    def init_state(self, batch):
        z = self.latent_init.expand(batch, -1)
        return {"latent": z if z.requires_grad else z.clone().requires_grad_(True)}

    def predict(self, state, ctx, coords):
        shifts = self.latent_to_shifts(state["latent"])
        shifts = shifts.reshape(-1, self.siren_cfg.depth - 1, self.siren_cfg.width)
        return self.net(coords, shifts)

    def inner_rates(self, ctx):
        return {"latent": clip_rate(self.latent_rates)}

    def code_mask(self):
        return torch.ones(self.cfg.latent_dim, dtype=torch.bool)


def _param_names(siren: SirenConfig) -> list[str]:
    return [f"{kind}{i}" for i in range(siren.depth) for kind in ("w", "b")]


@register
class SparseGradMSCN(Representation):
    """§3.3.1: every weight may adapt, each inner update gated: θ ← θ − α ⊙ z ⊙ ∇θL."""

    name = "mscn-grad"
    per_item_weights = True

    def __init__(self, siren, cfg, generator=None):
        super().__init__(siren, cfg, generator)
        self.shapes = [p.shape for p in self.net.params]
        n = sum(math.prod(s) for s in self.shapes)
        self.rates = _rates((n,), cfg, generator)
        self.gates = HardConcreteGates((n,), cfg.gate_keep_prob, cfg.budget, generator)

    def _split(self, flat: Tensor) -> list[Tensor]:
        out, start = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(flat[..., start:start + n].reshape(*flat.shape[:-1], *s))
            start += n
        return out

    def init_state(self, batch):
        return {name: p.expand(batch, *p.shape)
                for name, p in zip(_param_names(self.siren_cfg), self.net.params, strict=True)}

    def context(self, batch, training):
        # One shared pattern per batch keeps every item's δθ on the same support.
        return {"z": self.gates.train_gates(1)[0] if training else self.gates.test_gates()}

    def predict(self, state, ctx, coords):
        return siren_forward(self.siren_cfg, list(state.values()), coords)

    def inner_rates(self, ctx):
        rates = self._split(clip_rate(self.rates) * ctx["z"])
        return dict(zip(_param_names(self.siren_cfg), rates, strict=True))

    def regularizer(self):
        if self.cfg.l0_weight == 0:
            return torch.zeros(())
        return self.cfg.l0_weight * self.gates.expected_l0()

    def code_mask(self):
        return self.gates.test_gates() != 0

    def code_values(self, state):
        flat = torch.cat([v.reshape(v.shape[0], -1) for v in state.values()], dim=1)
        theta = torch.cat([p.detach().reshape(-1) for p in self.net.params])
        return (flat - theta)[:, self.code_mask()]  # the sparse δθ

    def state_from_code(self, values):
        theta = torch.cat([p.detach().reshape(-1) for p in self.net.params])
        flat = theta.expand(values.shape[0], -1).clone()
        flat[:, self.code_mask()] += values.to(flat.dtype)
        return dict(zip(_param_names(self.siren_cfg), self._split(flat), strict=True))


@register
class MetaSparseINR(Representation):
    """MetaSparseINR: plain MAML on all surviving weights; magnitude pruning of θ0."""

    name = "metasparseinr"
    per_item_weights = True

    def __init__(self, siren, cfg, generator=None):
        super().__init__(siren, cfg, generator)
        for i, p in enumerate(self.net.params):
            self.register_buffer(f"keep{i}", torch.ones_like(p, dtype=torch.bool))
        # a buffer, so rollbacks and checkpoints restore it with the masks
        self.register_buffer("pruning_rounds", torch.zeros((), dtype=torch.long))

    @property
    def rounds_done(self) -> int:
        return int(self.pruning_rounds)

    def masks(self) -> list[Tensor]:
        return [getattr(self, f"keep{i}") for i in range(len(self.net.params))]

    def init_state(self, batch):
        return {name: (p * m).expand(batch, *p.shape)
                for name, p, m in zip(_param_names(self.siren_cfg), self.net.params,
                                      self.masks(), strict=True)}

    def predict(self, state, ctx, coords):
        return siren_forward(self.siren_cfg, list(state.values()), coords)

    def inner_rates(self, ctx):
        return {name: m.to(torch.float32) * self.cfg.maml_lr
                for name, m in zip(_param_names(self.siren_cfg), self.masks(), strict=True)}

    def after_outer_step(self, step):
        if self.rounds_done >= self.cfg.prune_rounds or step % self.cfg.prune_every:
            return None
        # Global magnitude pruning of weight matrices, 20 % of the survivors per round.
        weights = [(p, m) for i, (p, m) in enumerate(zip(self.net.params, self.masks(),
                                                         strict=True)) if i % 2 == 0]
        alive = torch.cat([p.detach().abs()[m] for p, m in weights])
        n_prune = int(self.cfg.prune_fraction * alive.numel())
        if n_prune == 0:
            return None
        threshold = torch.kthvalue(alive, n_prune).values
        with torch.no_grad():
            for p, m in weights:
                m &= p.abs() > threshold
                p.mul_(m)
        self.pruning_rounds += 1
        kept = sum(int(m.sum()) for m in self.masks())
        return f"pruning round {self.rounds_done}: {kept} parameters survive"

    def code_mask(self):
        return torch.cat([m.reshape(-1) for m in self.masks()])

    def describe_sparsity(self):
        return {"code_size": self.code_size(), "pruning_rounds": self.rounds_done}


@register
class Coin(Representation):
    """COIN-style baseline: a fresh SIREN per item fitted from scratch with Adam."""

    name = "coin"
    meta_learned = False
    refinable = False  # nothing meta-learned: it is Adam from scratch already (--steps)

    def init_state(self, batch):
        g = torch.Generator().manual_seed(1234)
        per_item = [siren_init(self.siren_cfg, g) for _ in range(batch)]
        return {name: torch.stack([p[j] for p in per_item]).requires_grad_(True)
                for j, name in enumerate(_param_names(self.siren_cfg))}

    def predict(self, state, ctx, coords):
        return siren_forward(self.siren_cfg, list(state.values()), coords)

    def inner_rates(self, ctx):
        return {}

    def code_mask(self):
        n = sum(math.prod(s) for s in layer_shapes(self.siren_cfg)) + sum(
            s[0] for s in layer_shapes(self.siren_cfg))
        return torch.ones(n, dtype=torch.bool)


def build_representation(siren: SirenConfig, cfg: MethodConfig,
                         generator: torch.Generator | None = None) -> Representation:
    cfg.validate()
    return REGISTRY[cfg.method](siren, cfg, generator)


METHODS = tuple(REGISTRY)
