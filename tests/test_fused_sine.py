"""The fused SIREN path (mscn_core/siren.py) computes the plain path's maths.

Its sine's backward is itself a differentiable Function (second-order meta-gradients go
through it), so it is checked with gradcheck and gradgradcheck in float64; the whole
network with and without it must give the same outputs, inner gradients and
second-order meta-gradients in float32, with and without per-step checkpointing.
"""

from __future__ import annotations

import pytest
import torch

from mscn_core import siren as S
from mscn_core.meta import adapt, item_losses
from mscn_core.methods import MethodConfig, build_representation
from mscn_core.modality import Modality
from mscn_core.signals import Batch


def test_fused_sine_gradcheck_and_gradgradcheck():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(S.fused_sine, (x,))
    assert torch.autograd.gradgradcheck(S.fused_sine, (x,))


def test_fused_sine_third_derivative():
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    (g1,) = torch.autograd.grad(S.fused_sine(x).sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), x, create_graph=True)
    (g3,) = torch.autograd.grad(g2.sum(), x)
    torch.testing.assert_close(g1, x.cos())
    torch.testing.assert_close(g2, -x.sin())
    torch.testing.assert_close(g3, -x.cos())


def _cfg(out_dim: int = 2) -> S.SirenConfig:
    return S.SirenConfig(in_dim=3, out_dim=out_dim, width=16, depth=4, w0=30.0, w0_first=30.0)


def test_fused_network_gradgradcheck_float64():
    cfg = _cfg()
    params = [p.double().requires_grad_(True)
              for p in S.siren_init(cfg, torch.Generator().manual_seed(0))]
    coords = torch.randn(2, 5, 3, dtype=torch.float64)
    shifts = (0.01 * torch.randn(2, 3, 16, dtype=torch.float64)).requires_grad_(True)

    def f(*t):
        return S._fused_forward(cfg, list(t[:-1]), coords, t[-1])

    assert torch.autograd.gradcheck(f, (*params, shifts))
    assert torch.autograd.gradgradcheck(f, (*params, shifts))


@pytest.mark.parametrize("with_shifts", [True, False])
def test_fused_forward_matches_plain(with_shifts):
    cfg = _cfg(out_dim=3)
    params = S.siren_init(cfg, torch.Generator().manual_seed(0))
    coords = torch.rand(2, 40, 3) * 2 - 1
    shifts = 0.05 * torch.randn(2, 3, 16) if with_shifts else None
    with S.fused(True):
        assert S._fused_applies(params, coords, shifts)
        a = S.siren_forward(cfg, params, coords, shifts)
    with S.fused(False):
        b = S.siren_forward(cfg, params, coords, shifts)
    assert a.shape == b.shape == (2, 40, 3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _meta_gradient(fused: bool, checkpoint_steps: bool = False):
    """One second-order outer step's loss, adapted shifts and meta-gradients."""
    cfg = _cfg(out_dim=1)
    rep = build_representation(cfg, MethodConfig(method="metasgd-dense", inner_steps=3,
                                                 budget=None),
                               torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(3, 64, 3, generator=g) * 2 - 1
    batch = Batch(coords, torch.rand(3, 64, 1, generator=g), torch.ones(3, 64))
    with S.fused(fused):
        state, ctx = adapt(rep, batch, Modality(), training=True,
                           checkpoint_steps=checkpoint_steps)
        loss = item_losses(rep, Modality(), state, ctx, batch).mean()
        grads = torch.autograd.grad(loss, [p for p in rep.parameters() if p.requires_grad])
    return loss.detach(), state["shifts"].detach(), grads


@pytest.mark.parametrize("checkpoint_steps", [False, True])
def test_fused_meta_gradient_matches_plain(checkpoint_steps):
    loss_a, shifts_a, grads_a = _meta_gradient(fused=True, checkpoint_steps=checkpoint_steps)
    loss_b, shifts_b, grads_b = _meta_gradient(fused=False)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(shifts_a, shifts_b, rtol=1e-4, atol=1e-6)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b, strict=True):
        assert float((a - b).norm() / b.norm().clamp_min(1e-12)) < 1e-4


def test_fused_path_keeps_state_dict_and_falls_back():
    cfg = _cfg()
    net = S.GatedSiren(cfg, torch.Generator().manual_seed(0))
    assert [k for k, _ in net.state_dict().items()] == [f"params.{i}" for i in range(8)]
    coords = torch.rand(2, 9, 3)
    per_item = [p.expand(2, *p.shape) for p in net.params]  # (B, out, in): plain path
    assert not S._fused_applies(per_item, coords, None)
    with torch.no_grad():
        a = net(coords)
        with S.fused(False):
            b = net(coords)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
