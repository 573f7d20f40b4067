"""The modality-agnostic engine: meta-gradients, gates, methods, outer-loop guards, checkpoints.

Everything here is a real (tiny) computation: float64 nets for the finite-difference
checks, 8–32 units wide, a few points, one thread (these nets are far too small to gain
from a second one, and a shared machine makes OpenMP spin-waits very costly).
"""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from mscn_core.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from mscn_core.gates import (
    GAMMA,
    ZETA,
    HardConcreteGates,
    budget_mask,
    deterministic_gates,
    expected_l0,
    sample_gates,
)
from mscn_core.meta import (
    DivergedError,
    TrainConfig,
    adapt,
    evaluate_loss,
    fit_from_scratch,
    item_losses,
    meta_train,
)
from mscn_core.methods import METHODS, REGISTRY, MethodConfig, build_representation
from mscn_core.modality import Modality, masked_mse
from mscn_core.signals import Batch, Signal
from mscn_core.siren import SirenConfig

ROOT = Path(__file__).resolve().parents[1]



def tiny_siren(in_dim: int = 2, width: int = 8, depth: int = 3, w0: float = 3.0) -> SirenConfig:
    return SirenConfig(in_dim=in_dim, out_dim=1, width=width, depth=depth, w0=w0, w0_first=w0)


def build(method: str, seed: int = 0, siren: SirenConfig | None = None, **cfg):
    cfg.setdefault("budget", None)
    return build_representation(siren or tiny_siren(), MethodConfig(method=method, **cfg),
                                torch.Generator().manual_seed(seed))


# A plain Modality is the pointwise-MSE modality of the contract's defaults.
POINTWISE = Modality()


def toy_batch(b: int = 2, n: int = 20, in_dim: int = 2, seed: int = 1,
              dtype=torch.float32) -> Batch:
    g = torch.Generator().manual_seed(seed)
    coords = (torch.rand(b, n, in_dim, generator=g, dtype=torch.float64) * 2 - 1)
    targets = 0.5 + 0.4 * torch.sin(3 * coords.sum(-1, keepdim=True)
                                    + torch.rand(b, 1, 1, generator=g, dtype=torch.float64) * 6)
    return Batch(coords.to(dtype), targets.to(dtype), torch.ones(b, n, dtype=dtype))


def sinusoid_family(n: int, seed: int, side: int = 16) -> list[Signal]:
    """f(x, y) = 0.5 + 0.4 sin(a x + b y + c) on a side×side grid, a, b ~ U(±3), c ~ U(0, 2π)."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.linspace(-1, 1, side)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    coords = torch.stack([xx, yy], -1).reshape(-1, 2)
    out = []
    for _ in range(n):
        a, b = ((torch.rand(2, generator=g) * 2 - 1) * 3).tolist()
        c = float(torch.rand((), generator=g)) * 2 * math.pi
        t = 0.5 + 0.4 * torch.sin(a * coords[:, 0] + b * coords[:, 1] + c)
        out.append(Signal(coords, t[:, None]))
    return out


def quick_train(**kw) -> TrainConfig:
    base = dict(outer_steps=3, outer_lr=1e-3, batch_size=4, points_per_item=64, val_every=3,
                val_points=64, progress=False)
    base.update(kw)
    return TrainConfig(**base)


# -- meta-gradient: second order through T=3 inner steps ------------------------------------


def _outer_loss(rep, batch: Batch, seed=5, **kw) -> torch.Tensor:
    torch.manual_seed(seed)  # the same sampled gates (u) for every evaluation
    state, ctx = adapt(rep, batch, POINTWISE, training=True, **kw)
    return item_losses(rep, POINTWISE, state, ctx, batch).mean()


@pytest.mark.parametrize("method,budget", [("metasgd-dense", None), ("mscn", None), ("mscn", 6)],
                         ids=["gates-off", "sampled-fixed-gates", "budget-gates"])
def test_meta_gradient_matches_central_differences(method, budget):
    rep = build(method, budget=budget, inner_steps=3).double()
    assert rep.cfg.inner_steps == 3 and not rep.cfg.adapt_gates
    b = toy_batch(dtype=torch.float64)
    named = {n: p for n, p in rep.named_parameters() if p.requires_grad}
    names = list(named)
    grads = dict(zip(names, torch.autograd.grad(_outer_loss(rep, b), list(named.values())),
                     strict=True))

    probes = [("net.params.0", (1, 0)), ("net.params.1", (2,)), ("net.params.2", (3, 4)),
              ("net.params.4", (0, 2)), ("shift_rates", (0, 1)), ("shift_rates", (1, 5))]
    if method == "mscn" and budget is None:
        # a gate logit whose sampled gate is strictly inside (0, 1) for some item, so that
        # the loss is smooth in it (the clamp is not active within ±h)
        torch.manual_seed(5)
        z = rep.context(b.coords.shape[0], training=True)["z"]
        inside = ((z > 0.01) & (z < 0.99)).any(0).nonzero()
        assert len(inside) > 0
        probes.append(("gates.log_alpha", tuple(inside[0].tolist())))
    h = 1e-6
    for name, idx in probes:
        p = named[name]
        with torch.no_grad():
            p[idx] += h
        plus = float(_outer_loss(rep, b).detach())
        with torch.no_grad():
            p[idx] -= 2 * h
        minus = float(_outer_loss(rep, b).detach())
        with torch.no_grad():
            p[idx] += h
        fd, an = (plus - minus) / (2 * h), float(grads[name][idx])
        # central differences in float64: truncation O(h²)~1e-12, rounding O(ε/h)~1e-10
        assert abs(fd - an) <= 1e-7 + 1e-6 * abs(an), (name, idx, fd, an)
    assert any(abs(float(grads[n][i])) > 1e-3 for n, i in probes)  # not a vacuous match

    # first order drops the second-order terms: a visibly different meta-gradient
    fo = torch.autograd.grad(_outer_loss(rep, b, first_order=True),
                             list(named.values()))
    diff = max(float((a - b).abs().max()) for a, b in zip(grads.values(), fo, strict=True))
    scale = max(float(a.abs().max()) for a in grads.values())
    assert diff > 1e-3 * scale

    # per-step gradient checkpointing recomputes, it does not approximate
    ck = torch.autograd.grad(_outer_loss(rep, b, checkpoint_steps=True),
                             list(named.values()))
    for a, b in zip(grads.values(), ck, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


# -- gates -----------------------------------------------------------------------------------


def test_expected_l0_matches_monte_carlo_fraction():
    log_alpha = torch.linspace(-4, 4, 41, dtype=torch.float64)
    n = 20000
    u = torch.rand(n, 41, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    nonzero = (sample_gates(log_alpha.expand(n, -1), u) != 0).double()
    p = torch.sigmoid(log_alpha - (2 / 3) * math.log(-GAMMA / ZETA))
    # per gate: binomial std sqrt(p(1-p)/n); 5σ (+1e-5 for the u clamp at 1e-6)
    tol = 5 * torch.sqrt(p * (1 - p) / n) + 1e-5
    assert ((nonzero.mean(0) - p).abs() <= tol).all()
    total_std = math.sqrt(float((p * (1 - p)).sum()) / n)
    assert abs(float(nonzero.sum(1).mean()) - float(expected_l0(log_alpha))) <= 5 * total_std
    torch.testing.assert_close(expected_l0(log_alpha), p.sum())


def test_deterministic_gates_are_exactly_zero_or_one_at_the_extremes():
    z = deterministic_gates(torch.tensor([-50.0, -10.0, 0.0, 10.0, 50.0]))
    assert z[0].item() == 0.0 and z[1].item() == 0.0
    assert z[3].item() == 1.0 and z[4].item() == 1.0
    assert z[2].item() == pytest.approx(0.5)  # 0.5·(ζ−γ)+γ


@pytest.mark.parametrize("k", [1, 7, 48])
def test_budget_mask_keeps_exactly_the_k_most_probable(k):
    la = torch.randn(3, 16, generator=torch.Generator().manual_seed(k))
    m = budget_mask(la, k)
    assert int((m != 0).sum()) == k and set(m.unique().tolist()) <= {0.0, 1.0}
    if k < la.numel():
        assert la[m == 1].min() >= la[m == 0].max()
    ties = budget_mask(torch.zeros(3, 16), k)  # all tied: still exactly k
    assert int(ties.sum()) == k
    gates = HardConcreteGates((3, 16), budget=k, generator=torch.Generator().manual_seed(1))
    assert int((gates.test_gates() != 0).sum()) == k


@pytest.mark.parametrize("k", [0, 49])
def test_budget_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match="budget"):
        budget_mask(torch.zeros(3, 16), k)


def test_mscn_code_size_is_the_budget():
    rep = build("mscn", siren=tiny_siren(width=16, depth=4), budget=20)
    assert rep.code_size() == 20
    info = rep.describe_sparsity()
    assert info["code_size"] == 20 and sum(info["per_layer_nonzero"]) == 20
    state, _ = adapt(rep, toy_batch(b=3), POINTWISE)
    assert rep.code_values(state).shape == (3, 20)


def test_straight_through_budget_gates():
    k = 10
    gates = HardConcreteGates((3, 16), budget=k, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    z = gates.train_gates(4)
    mask = budget_mask(gates.log_alpha, k)
    assert z.shape == (4, 3, 16)
    for b in range(4):  # forward value: exactly the budget mask, k ones per item
        assert int((z[b] != 0).sum()) == k
        assert torch.equal(z[b].detach(), mask)
    weights = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(3))
    (z * weights).sum().backward()
    grad = gates.log_alpha.grad
    assert grad is not None and grad.abs().sum() > 0
    assert (grad[mask == 0] == 0).all()  # only surviving gates receive the task gradient


# -- meta-training ---------------------------------------------------------------------------


def test_meta_training_lowers_post_adaptation_loss_on_held_out_signals():
    torch.manual_seed(0)
    train, val, test = sinusoid_family(64, 1), sinusoid_family(8, 2), sinusoid_family(16, 3)
    rep = build("mscn", siren=tiny_siren(width=32, depth=4, w0=10.0), budget=48)
    before = evaluate_loss(rep, test, POINTWISE)  # all 256 points per item, 3 inner steps
    res = meta_train(rep, train, val, quick_train(outer_steps=30, outer_lr=3e-3, batch_size=8,
                                                  points_per_item=128, val_every=10,
                                                  val_points=128), POINTWISE)
    after = evaluate_loss(rep, test, POINTWISE)
    assert res.rollbacks == 0 and res.steps_run == 30
    assert all(math.isfinite(r["loss"]) for r in res.history)
    # measured: 0.084 → 0.013; demand a clear factor, not noise
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_adapts(method):
    torch.manual_seed(0)
    train, val = sinusoid_family(8, 4, side=8), sinusoid_family(2, 5, side=8)
    rep = build(method, siren=tiny_siren(width=16, depth=3), budget=12, latent_dim=8,
                coin_steps=10, coin_lr=1e-3, prune_every=2, prune_rounds=1)
    res = meta_train(rep, train, val, quick_train(), POINTWISE)
    assert math.isfinite(res.best_val_loss)
    if rep.meta_learned:
        assert res.steps_run == 3 and len(res.history) == 3
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
                   for r in res.history)
    assert all(torch.isfinite(p).all() for p in rep.parameters())
    b = toy_batch(b=3)
    state, ctx = adapt(rep, b, POINTWISE)
    pred = rep.predict(state, ctx, b.coords)
    assert pred.shape == (3, 20, 1) and torch.isfinite(pred).all()


def test_coin_fits_from_scratch():
    rep = build("coin", siren=tiny_siren(width=16), coin_lr=1e-3)
    b = toy_batch(b=2, n=64)
    s0 = fit_from_scratch(rep, b, POINTWISE, steps=0)
    s1 = fit_from_scratch(rep, b, POINTWISE, steps=150)
    l0 = masked_mse(rep.predict(s0, {}, b.coords), b.targets, b.weights)
    l1 = masked_mse(rep.predict(s1, {}, b.coords), b.targets, b.weights)
    assert (l1 < 0.5 * l0).all(), (l0, l1)
    # early stop through the callback
    calls = []
    fit_from_scratch(rep, b, POINTWISE, steps=100,
                     callback=lambda step, st: calls.append(step) or step == 7)
    assert calls[-1] == 7


def test_coin_adam_fits_each_item_independently_of_the_batch():
    """One torch.optim.Adam over batched weights is one Adam per item: an item's result
    does not depend on which other items share its batch."""
    rep = build("coin", siren=tiny_siren(width=16), coin_lr=1e-3)
    b = toy_batch(b=3, n=64)

    def items(*idx: int) -> Batch:
        return Batch(*(t[list(idx)] for t in b))

    steps = 60
    pair = fit_from_scratch(rep, items(0, 1), POINTWISE, steps=steps)
    alone = fit_from_scratch(rep, items(0), POINTWISE, steps=steps)
    # COIN's fresh init is drawn per batch position, so item 1 is compared at position 1
    other = fit_from_scratch(rep, items(2, 1), POINTWISE, steps=steps)
    for name in pair:
        torch.testing.assert_close(alone[name][0], pair[name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other[name][1], pair[name][1], rtol=1e-5, atol=1e-6)
    # and Adam lowered every item's loss on its own
    start = fit_from_scratch(rep, items(0, 1), POINTWISE, steps=0)
    with torch.no_grad():
        l0 = item_losses(rep, POINTWISE, start, {}, items(0, 1))
        l1 = item_losses(rep, POINTWISE, pair, {}, items(0, 1))
    assert (l1 < 0.7 * l0).all(), (l0, l1)
    assert not torch.equal(pair["w0"][0], pair["w0"][1])  # two items, two networks


def test_metasparseinr_prunes_a_fifth_of_survivors_per_round():
    rep = build("metasparseinr", siren=tiny_siren(width=16), prune_every=1, prune_rounds=2,
                prune_fraction=0.2)
    weights = [i for i in range(len(rep.net.params)) if i % 2 == 0]
    n_weights = sum(rep.net.params[i].numel() for i in weights)
    n_bias = sum(rep.net.params[i].numel() for i in range(1, len(rep.net.params), 2))

    def survivors() -> int:
        return sum(int(rep.masks()[i].sum()) for i in weights)

    alive = [n_weights]
    for step in (1, 2):
        assert rep.after_outer_step(step) is not None
        alive.append(survivors())
    assert alive[1] == n_weights - int(0.2 * n_weights)
    assert alive[2] == alive[1] - int(0.2 * alive[1])
    assert rep.after_outer_step(3) is None and survivors() == alive[2]  # rounds exhausted
    assert rep.code_size() == alive[2] + n_bias  # biases are never pruned
    for i in weights:  # pruned weights are zero in θ0 and stay zero through adaptation
        assert (rep.net.params[i][~rep.masks()[i]] == 0).all()
    state, _ = adapt(rep, toy_batch(), POINTWISE)
    for name, i in zip(state, range(len(rep.net.params)), strict=True):
        if i % 2 == 0:
            assert (state[name][:, ~rep.masks()[i]] == 0).all()


def test_mscn_grad_code_lives_on_the_gate_support():
    rep = build("mscn-grad", budget=25)
    mask = rep.code_mask()
    assert int(mask.sum()) == 25
    state, _ = adapt(rep, toy_batch(b=3), POINTWISE)
    flat = torch.cat([v.reshape(3, -1) for v in state.values()], dim=1)
    theta = torch.cat([p.detach().reshape(-1) for p in rep.net.params])
    delta = flat - theta
    assert (delta[:, ~mask] == 0).all()  # off the support nothing moved, exactly
    assert (delta[:, mask] != 0).float().mean() > 0.5
    code = rep.code_values(state)
    assert code.shape == (3, 25)
    torch.testing.assert_close(code, delta[:, mask])


@pytest.mark.parametrize("method", ["mscn-grad", "metasparseinr"])
def test_vmap_functional_call_inner_loop_equals_the_batched_matmul_one(method):
    """§3.3.1 both ways: torch.func vmap(grad(functional_call)) and one batched grad."""
    kw = {"budget": 25} if method == "mscn-grad" else {}
    reps = {impl: build(method, grad_impl=impl, **kw).double() for impl in ("bmm", "vmap")}
    b = toy_batch(b=3, dtype=torch.float64)
    states, grads = {}, {}
    for impl, rep in reps.items():
        state, _ = adapt(rep, b, POINTWISE)  # test time: no graph
        states[impl] = state
        params = [p for p in rep.parameters() if p.requires_grad]
        grads[impl] = torch.autograd.grad(_outer_loss(rep, b), params)
    for name in states["bmm"]:
        torch.testing.assert_close(states["vmap"][name], states["bmm"][name],
                                   rtol=1e-12, atol=1e-14)
    moved = max(float((v - reps["bmm"].init_state(3)[k]).detach().abs().max())
                for k, v in states["bmm"].items())
    assert moved > 1e-3  # the inner loop did something
    for a, b in zip(grads["vmap"], grads["bmm"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)  # second order, both ways
    assert max(float(g.abs().max()) for g in grads["bmm"]) > 1e-4


def test_method_registry_is_the_one_list_of_methods():
    from mscn_core.methods import Representation, per_item_weight_methods

    assert tuple(REGISTRY) == METHODS
    assert set(METHODS) == {"mscn", "mscn-grad", "functa", "metasgd-dense", "metasparseinr",
                            "coin"}
    for name, cls in REGISTRY.items():
        assert issubclass(cls, Representation) and cls.name == name
        assert type(build(name, budget=10, latent_dim=6)) is cls
    assert set(per_item_weight_methods()) == {"mscn-grad", "metasparseinr"}
    assert [n for n, c in REGISTRY.items() if not c.meta_learned] == ["coin"]
    with pytest.raises(ValueError, match="unknown method 'nonsense'") as err:
        build("nonsense")
    listed = str(err.value).split("choose one of", 1)[1]
    assert all(name in listed for name in METHODS), str(err.value)


def test_vmap_grad_impl_is_refused_where_state_is_not_per_item_weights():
    with pytest.raises(ValueError, match="grad_impl='vmap' applies to"):
        build("mscn", grad_impl="vmap")
    with pytest.raises(ValueError, match="unknown grad_impl"):
        build("mscn-grad", grad_impl="jax")


@pytest.mark.parametrize("method", METHODS)
def test_code_round_trip_gives_the_same_predictions(method):
    rep = build(method, budget=10, latent_dim=6, coin_steps=5, prune_every=1)
    if method == "metasparseinr":
        rep.after_outer_step(1)
    b = toy_batch(b=3)
    state, ctx = adapt(rep, b, POINTWISE)
    values = rep.code_values(state)
    assert values.shape == (3, rep.code_size())
    back = rep.state_from_code(values)
    with torch.no_grad():
        p1, p2 = rep.predict(state, ctx, b.coords), rep.predict(back, ctx, b.coords)
    if method == "mscn-grad":  # θ + (θ' − θ) may differ from θ' by one rounding
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-6)
    else:
        assert torch.equal(p1, p2)


def test_per_item_gate_patterns_have_no_shared_code():
    rep = build("mscn", adapt_gates=True)
    with pytest.raises(NotImplementedError, match="adapt_gates"):
        rep.code_size()


# -- encode-time sample budget ------------------------------------------------------------


@pytest.fixture(scope="module")
def era5_checkpoint(tiny_sphere_checkpoint):
    from conftest import ERA5

    from mscn_core.registry import get_modality

    ck = load_checkpoint(tiny_sphere_checkpoint)
    m = get_modality("sphere")
    m.load_state(ck.modality_state)
    held_out = [f for f in m.read(ERA5, var="t", sel=["isobaricInhPa=850"])
                if int(f["number"]) >= 8]
    return ck, m, [m.to_signal(f) for f in held_out[:4]]


def test_adapt_codes_resamples_large_items_per_step_reproducibly(era5_checkpoint):
    """Items larger than ``points_per_step`` adapt on that many fresh samples per inner
    step (bounded memory), seeded: the same call gives the same codes."""
    from mscn_core.pipeline import adapt_codes, predictor

    ck, m, signals = era5_checkpoint
    n_points, budget = signals[0].n_points, 1024
    assert n_points == 61 * 120 > budget
    seen: list[torch.Tensor] = []
    objective = m.objective

    def recording(field, batch):
        seen.append(batch.coords.detach().clone())
        return objective(field, batch)

    m.objective = recording
    try:
        a = adapt_codes(ck, m, signals, points_per_step=budget)
    finally:
        del m.objective
    steps = ck.rep.cfg.inner_steps
    assert len(seen) == steps  # one objective call per inner step
    assert all(c.shape == (len(signals), budget, 3) for c in seen)  # never the whole item
    assert all(not torch.equal(seen[0], c) for c in seen[1:])  # resampled at every step
    b = adapt_codes(ck, m, signals, points_per_step=budget)
    assert torch.equal(a, b)
    assert not torch.equal(a, adapt_codes(ck, m, signals, points_per_step=budget, seed=1))

    # a decent fit, close to the one on all points (measured: mean RMSE within 0.2 %,
    # 99 % of the full-batch improvement over the shared init)
    def rmse(codes: torch.Tensor) -> list[float]:
        return [m.metrics(s, predictor(ck, m, c)(s.coords))["rmse"]
                for s, c in zip(signals, codes, strict=True)]

    full, zero, sampled = rmse(adapt_codes(ck, m, signals)), \
        rmse(adapt_codes(ck, m, signals, steps=0)), rmse(a)
    assert all(r <= 1.02 * f for r, f in zip(sampled, full, strict=True)), (sampled, full)
    gain_full = sum(zero) - sum(full)
    assert gain_full > 0 and sum(zero) - sum(sampled) > 0.8 * gain_full


def test_adapt_codes_mixes_small_and_large_items_in_order(era5_checkpoint):
    """Items within the budget adapt on all their points, larger ones on samples; the
    codes come back in the order of the signals."""
    from mscn_core.pipeline import adapt_codes

    ck, m, signals = era5_checkpoint
    big = signals[0]
    small = Signal(big.coords[::4], big.targets[::4], None, big.meta)  # 1830 points
    budget = 2048
    mixed = adapt_codes(ck, m, [big, small, signals[1]], points_per_step=budget)
    assert torch.equal(mixed[1], adapt_codes(ck, m, [small])[0])  # all points: no sampling
    # the default budget (the modality's, 65536) holds every ERA5 item whole
    assert torch.equal(adapt_codes(ck, m, [small], points_per_step=budget),
                       adapt_codes(ck, m, [small]))
    large = adapt_codes(ck, m, [big, signals[1]], points_per_step=budget)
    torch.testing.assert_close(mixed[[0, 2]], large, rtol=0, atol=0)


# -- outer-loop guards -----------------------------------------------------------------------


@pytest.mark.parametrize("max_rollbacks,steps", [(3, 8), (12, 16)],
                         ids=["gives-up-clearly", "recovers"])
def test_absurd_outer_rate_rolls_back_instead_of_ending_in_nan(max_rollbacks, steps):
    torch.manual_seed(0)
    train, val = sinusoid_family(8, 6, side=8), sinusoid_family(4, 7, side=8)
    rep = build("mscn", siren=tiny_siren(width=16, w0=10.0), budget=12)
    init_val = evaluate_loss(rep, val, POINTWISE, n_points=64)
    cfg = quick_train(outer_steps=steps, outer_lr=10.0, val_every=1,
                      max_rollbacks=max_rollbacks)
    events = []
    try:
        res = meta_train(rep, train, val, cfg, POINTWISE, on_log=events.append)
    except DivergedError as err:  # halving 10 three times is not enough: a clear error
        assert "diverged" in str(err) and "outer-lr" in str(err)
        assert max_rollbacks == 3
    else:  # with enough halvings the rate becomes usable and training goes on
        assert res.rollbacks > 0 and math.isfinite(res.best_val_loss)
        assert res.best_val_loss < init_val
    assert sum(e.get("event") == "rollback" for e in events) >= min(max_rollbacks, 3)
    assert all(torch.isfinite(p).all() for p in rep.state_dict().values()
               if p.dtype.is_floating_point)
    kept = evaluate_loss(rep, val, POINTWISE, n_points=64)  # the kept state is the best seen
    assert math.isfinite(kept) and kept <= init_val * (1 + 1e-6)


# -- checkpoints -----------------------------------------------------------------------------


def _trained_like(method: str):
    """A representation whose tensors are not at their init (so equality means something)."""
    rep = build(method, budget=10, latent_dim=6, coin_steps=5, prune_every=1)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in rep.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    if method == "metasparseinr":
        rep.after_outer_step(1)
    return rep


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_round_trip_is_exact(method, tmp_path, monkeypatch):
    rep = _trained_like(method)
    codec = {"scale": torch.linspace(0, 1, 5), "counts": torch.arange(7)}
    ck = Checkpoint(rep, "toy", {"scaling": {"t[K]": [200.0, 320.0]}}, codec, {"note": "x"})
    path = tmp_path / f"{method}.safetensors"
    digest = save_checkpoint(ck, path)

    def no_unpickling(*_a, **_k):
        raise AssertionError("checkpoint loading must never unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    back = load_checkpoint(path)
    assert back.sha256 == digest and back.modality == "toy"
    assert back.modality_state == {"scaling": {"t[K]": [200.0, 320.0]}}
    assert back.info == {"note": "x"}
    assert back.codec.keys() == codec.keys()
    assert all(torch.equal(back.codec[k], v) for k, v in codec.items())
    sd0, sd1 = rep.state_dict(), back.rep.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype and torch.equal(sd0[k], sd1[k]), k
    assert back.rep.describe_sparsity() == rep.describe_sparsity()
    assert read_config(path)["format_version"] == FORMAT_VERSION
    b = toy_batch(b=2)
    s0, x0 = adapt(rep.eval(), b, POINTWISE)
    s1, x1 = adapt(back.rep, b, POINTWISE)
    with torch.no_grad():
        assert torch.equal(rep.predict(s0, x0, b.coords), back.rep.predict(s1, x1, b.coords))


def test_checkpoint_code_never_unpickles():
    src = (ROOT / "mscn_core" / "checkpoint.py").read_text()
    assert "torch.load" not in src and "import pickle" not in src
    for f in sorted((ROOT / "mscn_core").glob("*.py")):
        for call in re.findall(r"torch\.load\([^)]*\)", f.read_text()):
            assert "weights_only=True" in call, (f.name, call)


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "good.safetensors"
    save_checkpoint(Checkpoint(_trained_like("mscn"), "toy", {}), path)
    return path


def _rewrite_config(src: Path, dst: Path, edit) -> Path:
    """Re-save the same tensors with an edited JSON config (tensor checksum stays valid)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["mscn"])
    edit(cfg)
    meta["mscn"] = json.dumps(cfg)
    dst.write_bytes(st_save(tensors, metadata=meta))
    return dst


def _header_len(raw: bytes) -> int:
    return struct.unpack("<Q", raw[:8])[0]


def test_flipped_tensor_bytes_are_refused(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    data_start = 8 + _header_len(raw)
    raw[data_start + (len(raw) - data_start) // 2] ^= 0x5A
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted or altered"):
        load_checkpoint(bad)


def test_flipped_header_bytes_are_refused(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    raw[8] ^= 0xFF  # the header's opening brace
    bad = tmp_path / "header.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(bad)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_checkpoint_is_refused(saved, tmp_path, cut):
    raw = saved.read_bytes()
    keep = len(raw) - 16 if cut == "data" else 8 + _header_len(raw) // 2
    bad = tmp_path / "short.safetensors"
    bad.write_bytes(raw[:keep])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(bad)


def test_non_safetensors_file_is_refused(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("this is a text file, not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError, match="not a readable mscn checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_foreign_safetensors_file_is_refused(tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(st_save({"weight": torch.zeros(3, 3)}, metadata={"format": "pt"}))
    with pytest.raises(CheckpointError, match="not an mscn checkpoint.*'mscn' metadata"):
        load_checkpoint(other)


def test_wrong_format_version_is_refused(saved, tmp_path):
    bad = _rewrite_config(saved, tmp_path / "v99.safetensors",
                          lambda cfg: cfg.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99"):
        read_config(bad)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(bad)


def test_mismatched_architecture_is_refused(saved, tmp_path):
    bad = _rewrite_config(saved, tmp_path / "wide.safetensors",
                          lambda cfg: cfg["siren"].update(width=16))
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(bad)
    worse = _rewrite_config(saved, tmp_path / "nomethod.safetensors",
                            lambda cfg: cfg["method_config"].update(method="nonsense"))
    with pytest.raises(CheckpointError, match="config is invalid"):
        load_checkpoint(worse)


def test_every_config_flag_has_a_help_text(capsys):
    """`mscn meta-train --help` documents each setting (from its dataclass comment)."""
    import dataclasses

    from mscn_core.cli import build_parser, field_docs

    for cls in (SirenConfig, MethodConfig, TrainConfig):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, (cls.__name__, missing)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["meta-train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--grad-impl {bmm,vmap}" in text
    assert "items per outer step (default: 32)" in text
    assert "exact number of non-zero modulations (None: L0 penalty only) (default: 256)" in text


def test_allocator_preload_and_opt_out(monkeypatch):
    """The launcher's environment: tcmalloc prepended once, never with MSCN_ALLOCATOR=glibc."""
    from mscn_core import allocator

    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: "/opt/lib/libtcmalloc_minimal.so.4")
    env = allocator.preload_env({"LD_PRELOAD": "/x/libfoo.so"})
    assert env["LD_PRELOAD"] == "/opt/lib/libtcmalloc_minimal.so.4 /x/libfoo.so"
    assert allocator.preload_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]  # idempotent
    assert "LD_PRELOAD" not in allocator.preload_env({"MSCN_ALLOCATOR": "glibc"})
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: None)
    assert "LD_PRELOAD" not in allocator.preload_env({})


def test_top_level_help_does_not_import_torch():
    """DESIGN §7 wants `mscn --help` under a second; torch alone takes about one."""
    import subprocess
    import sys

    code = ("import sys\nfrom mscn_core.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "meta-train" in out.stdout and out.stdout.strip().endswith("False")
