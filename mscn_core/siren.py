"""The shared SIREN whose per-item shift modulations carry each signal.

Weights may be shared (``(out, in)``) or per item (``(B, out, in)``): the same forward
serves the structured methods (shared weights, per-item shifts) and the methods that
adapt weights per item (MSCN-grad, MetaSparseINR, COIN), with no loop over items.

Shared weights on CPU take a fused path (same maths, see ``_fused_forward``):
activations kept feature-major ``(features, points)``, matrix products through oneDNN,
and a sine whose ``sin``/``cos`` are computed once and reused by every derivative order
of the second-order inner loop. ``set_fused(False)`` or ``MSCN_FUSED_SIREN=0`` turns it off.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class SirenConfig:
    """Architecture; defaults are the paper's 15×512, w0=30 network (DESIGN §3)."""

    in_dim: int = 3  # coordinate dimension (set by the modality)
    out_dim: int = 1  # output channels (set by the modality)
    width: int = 512  # units per hidden layer
    depth: int = 15  # layers including the linear output layer: depth-1 sine layers
    w0: float = 30.0  # SIREN frequency of the hidden layers
    w0_first: float = 30.0  # SIREN frequency of the first layer
    output_offset: float = 0.5  # Functa / COIN++ offset on the linear output

    @property
    def n_sine_layers(self) -> int:
        return self.depth - 1

    @property
    def n_shifts(self) -> int:
        return self.width * (self.depth - 1)

    def validate(self) -> None:
        if self.depth < 2:
            raise ValueError(f"depth must be >= 2 (one sine layer + output), got {self.depth}")
        if self.width < 1 or self.in_dim < 1 or self.out_dim < 1:
            raise ValueError("width, in_dim and out_dim must be positive")


def layer_shapes(cfg: SirenConfig) -> list[tuple[int, int]]:
    dims = [cfg.in_dim] + [cfg.width] * (cfg.depth - 1) + [cfg.out_dim]
    return [(dims[i + 1], dims[i]) for i in range(cfg.depth)]


def siren_init(cfg: SirenConfig, generator: torch.Generator | None = None) -> list[Tensor]:
    """SIREN init: first layer U(±1/fan_in), others U(±√(6/fan_in)/w0), output bias 0.

    Returns a flat list ``[W0, b0, W1, b1, …]``; biases use the same bound as weights.
    """
    params: list[Tensor] = []
    for i, (fan_out, fan_in) in enumerate(layer_shapes(cfg)):
        bound = 1.0 / fan_in if i == 0 else math.sqrt(6.0 / fan_in) / cfg.w0
        w = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
        if i == cfg.depth - 1:
            b = torch.zeros(fan_out)
        else:
            b = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
        params += [w, b]
    return params


def _linear(h: Tensor, w: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """``scale·(h Wᵀ + b)`` with w0 folded into the small W and b, never the activations.

    Multiplying the (out, in) weights instead of the (B, N, out) activations removes a
    full elementwise pass from the forward and from every backward pass through it.
    """
    if scale != 1.0:
        w, b = w * scale, b * scale
    if w.dim() == 2:
        out = torch.addmm(b, h.reshape(-1, h.shape[-1]), w.t())
        return out.reshape(*h.shape[:-1], -1)
    # per-item weights (B, out, in), biases (B, out); h (B, N, in)
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def siren_forward(
    cfg: SirenConfig, params: list[Tensor], coords: Tensor, shifts: Tensor | None = None
) -> Tensor:
    """Raw network output ``(B, N, out_dim)`` for coordinates ``(B, N, in_dim)``.

    ``shifts`` is ``(B, depth-1, width)`` (already multiplied by the gates) or None.
    """
    if _fused_applies(params, coords, shifts):
        return _fused_forward(cfg, params, coords, shifts)
    return _plain_forward(cfg, params, coords, shifts)


def _plain_forward(cfg: SirenConfig, params: list[Tensor], coords: Tensor,
                   shifts: Tensor | None) -> Tensor:
    """The reference path: point-major activations, ATen ops and autograd formulas."""
    h = coords
    n_sine = cfg.depth - 1
    for i in range(n_sine):
        w0 = cfg.w0_first if i == 0 else cfg.w0
        pre = _linear(h, params[2 * i], params[2 * i + 1], w0)
        if shifts is not None:
            pre = pre + (w0 * shifts[:, i, :]).unsqueeze(1)
        h = torch.sin(pre)
    return _linear(h, params[-2], params[-1]) + cfg.output_offset


# -- fused path ---------------------------------------------------------------------------
#
# Why: on CPU a second-order meta step is half matrix products, half elementwise passes.
# ATen's fp32 GEMM goes to MKL, which on some x86 CPUs (AMD) runs an AVX2 kernel at under
# half of what the oneDNN kernel shipped in the same torch build reaches; oneDNN's fast
# layouts need the big operand row-major, which a feature-major ``(features, points)``
# layout gives every product of the forward, the inner gradients and the meta-gradient.
# ``torch.sin``'s autograd recomputes ``cos`` in each of the two backward passes through
# an inner step's layer and ``sin`` again in the double backward (4 transcendental passes
# per layer and inner step); here sin and cos are computed once each (2). The products and
# functions are the plain path's, so results agree with it to float32 rounding
# (tests/test_fused_sine.py).

_FUSED = {"enabled": os.environ.get("MSCN_FUSED_SIREN", "1") != "0"}


def set_fused(enabled: bool) -> None:
    """Turn the fused shared-weight path on or off (process-wide)."""
    _FUSED["enabled"] = bool(enabled)


def fused_enabled() -> bool:
    return _FUSED["enabled"]


@contextmanager
def fused(enabled: bool) -> Iterator[None]:
    """Temporarily turn the fused path on or off (benchmarks, tests)."""
    old = _FUSED["enabled"]
    _FUSED["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _FUSED["enabled"] = old


def _onednn_linear():
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if hasattr(torch.ops, "mkldnn") \
        else None
    return op if op is not None and torch.backends.mkldnn.is_available() else None


_LINEAR = _onednn_linear()


def _fused_applies(params: list[Tensor], coords: Tensor, shifts: Tensor | None) -> bool:
    if not _FUSED["enabled"] or coords.device.type != "cpu" or coords.dim() < 2:
        return False
    if coords.dtype not in (torch.float32, torch.float64):
        return False
    if any(p.dim() != 2 - (i % 2) or p.dtype != coords.dtype for i, p in enumerate(params)):
        return False  # per-item weights (B, out, in) or mixed dtypes: plain path
    if shifts is not None and (shifts.dim() != 3 or coords.dim() != 3
                               or coords.shape[0] not in (1, shifts.shape[0])):
        return False  # other broadcasts between coordinates and shifts: plain path
    if torch.is_autocast_enabled("cpu") or torch._C._are_functorch_transforms_active():
        return False  # autocast casts, vmap/grad transforms need functorch-aware Functions
    return True


def _small_big(s: Tensor, x: Tensor) -> Tensor:
    """``s @ x`` for a small ``s (p, q)`` and a big feature-major ``x (q, M)``."""
    if _LINEAR is not None and x.dtype == torch.float32:
        return _LINEAR(s.contiguous(), x.contiguous().t(), None, "none", [], "")
    return torch.mm(s, x)


def _big_big_t(x: Tensor, y: Tensor) -> Tensor:
    """``x @ yᵀ`` for big feature-major ``x (p, M)``, ``y (q, M)``: the reduction over M."""
    if _LINEAR is not None and x.dtype == torch.float32:
        return _LINEAR(x.contiguous(), y.contiguous(), None, "none", [], "")
    return torch.mm(x, y.t())


def _wanted(ctx, i: int) -> bool:
    """Whether input ``i``'s gradient is needed by the running backward.

    ``needs_input_grad`` only says the input requires grad; an inner-loop
    ``autograd.grad(loss, shifts)`` never uses the weights' gradient, and ATen's own
    backward formulas skip it too (a big product each).
    """
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    if node is None:
        return True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (RuntimeError, AttributeError):  # e.g. a leaf's node inside autograd.grad
        return True  # compute it: always correct, at most one small product wasted


class _SmallBig(torch.autograd.Function):
    """``s @ x``; its backward is built from these same differentiable products."""

    @staticmethod
    def forward(ctx, s: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(s, x)
        return _small_big(s, x)

    @staticmethod
    def backward(ctx, g: Tensor):
        s, x = ctx.saved_tensors
        gs = _BigBigT.apply(g, x) if _wanted(ctx, 0) else None
        gx = _SmallBig.apply(s.t(), g) if _wanted(ctx, 1) else None
        return gs, gx


class _BigBigT(torch.autograd.Function):
    """``x @ yᵀ`` (weight gradients); differentiable again through ``_SmallBig``."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(x, y)
        return _big_big_t(x, y)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y = ctx.saved_tensors
        gx = _SmallBig.apply(g, y) if _wanted(ctx, 0) else None
        gy = _SmallBig.apply(g.t(), x) if _wanted(ctx, 1) else None
        return gx, gy


class _Affine(torch.autograd.Function):
    """``w @ x + c`` with ``c (p, B|1)`` broadcast over each item's N points of ``x (q, B·N)``.

    The per-item column (bias + shift, already times w0) is added in place into the
    fresh product: no extra pass and no extra activation-sized tensor.
    """

    @staticmethod
    def forward(ctx, w: Tensor, x: Tensor, c: Tensor) -> Tensor:
        ctx.save_for_backward(w, x)
        ctx.c_items = c.shape[1]
        out = _small_big(w, x)
        out.view(out.shape[0], c.shape[1], -1).add_(c.unsqueeze(-1))
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        w, x = ctx.saved_tensors
        gw = _BigBigT.apply(g, x) if _wanted(ctx, 0) else None
        gx = _SmallBig.apply(w.t(), g) if _wanted(ctx, 1) else None
        gc = g.view(g.shape[0], ctx.c_items, -1).sum(-1) if _wanted(ctx, 2) else None
        return gw, gx, gc


def _times_derivative(g: Tensor, sin: Tensor, cos: Tensor, k: int) -> Tensor:
    """``g · sin⁽ᵏ⁾(pre)`` from the stored tables: sin, cos, −sin, −cos."""
    out = g * (sin if k % 2 == 0 else cos)
    return out.neg_() if k % 4 >= 2 else out


class _TrigMul(torch.autograd.Function):
    """``g · sin⁽ᵏ⁾(pre)``, differentiable in ``g`` and ``pre`` to any order.

    ``sin``/``cos`` are the forward's tables (no grad); ``pre`` only anchors the graph.
    Everything goes through ``save_for_backward``, so gradient checkpointing can drop and
    recompute it like any ATen node's saved tensors.
    """

    @staticmethod
    def forward(ctx, g: Tensor, pre: Tensor, sin: Tensor, cos: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(g, pre, sin, cos)
        ctx.k = k
        return _times_derivative(g, sin, cos, k)

    @staticmethod
    def backward(ctx, go: Tensor):
        g, pre, sin, cos = ctx.saved_tensors
        gg = _TrigMul.apply(go, pre, sin, cos, ctx.k) if _wanted(ctx, 0) else None
        gp = _TrigMul.apply(go * g, pre, sin, cos, ctx.k + 1) if _wanted(ctx, 1) else None
        return gg, gp, None, None, None


class FusedSine(torch.autograd.Function):
    """``sin(x)`` whose backward ``g·cos(x)`` is a differentiable Function (``_TrigMul``)
    reusing one ``sin``/``cos`` pair.

    ``torch.sin``'s autograd recomputes ``cos`` in each of the two backward passes a
    second-order step makes through a layer, and ``sin`` in the double backward. Here
    ``cos`` is computed on the first backward and kept for the second only when that
    first one builds a graph (an inner step's): the outer loss's own forward never holds
    it, so peak memory stays the plain path's. Under saved-tensor hooks (gradient
    checkpointing) nothing is kept outside the saved tensors: ``cos`` is recomputed.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        s = torch.sin(x)
        ctx.save_for_backward(x, s)
        ctx.cos = None
        return s

    @staticmethod
    def backward(ctx, g: Tensor):
        x, s = ctx.saved_tensors
        c = ctx.cos
        if c is None:
            c = torch.cos(x.detach())
            if (torch.is_grad_enabled()
                    and torch._C._autograd._top_saved_tensors_default_hooks(False) is None):
                ctx.cos = c  # detached: no reference back into the graph
        return _TrigMul.apply(g, x, s.detach(), c, 1)


def fused_sine(x: Tensor) -> Tensor:
    """``torch.sin`` with cached derivatives (same values; see ``FusedSine``)."""
    return FusedSine.apply(x)


def _fused_forward(cfg: SirenConfig, params: list[Tensor], coords: Tensor,
                   shifts: Tensor | None) -> Tensor:
    """``_plain_forward`` with feature-major activations ``(features, B·N)``.

    Same maths: sin(w0·W h + w0·(b + shift)) per sine layer, W h + b + offset at the end.
    """
    lead = coords.shape[:-1]
    if shifts is not None:
        n_items = shifts.shape[0]
        coords = coords.expand(n_items, *coords.shape[1:])
    else:
        n_items = 1
    h = coords.reshape(-1, coords.shape[-1]).t().contiguous()  # (in, B·N), small
    for i in range(cfg.depth - 1):
        w0 = cfg.w0_first if i == 0 else cfg.w0
        w, b = params[2 * i], params[2 * i + 1]
        col = b.unsqueeze(1) if shifts is None else b.unsqueeze(1) + shifts[:, i, :].t()
        h = FusedSine.apply(_Affine.apply(w * w0, h, col * w0))
    col = params[-1].unsqueeze(1) + cfg.output_offset
    out = _Affine.apply(params[-2], h, col)  # (out_dim, B·N)
    lead = (n_items, *lead[1:]) if shifts is not None else lead
    return out.t().reshape(*lead, out.shape[0])


class GatedSiren(nn.Module):
    """SIREN with per-unit shift modulations batched over items ``(B, depth-1, width)``."""

    def __init__(self, cfg: SirenConfig, generator: torch.Generator | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.params = nn.ParameterList([nn.Parameter(p) for p in siren_init(cfg, generator)])

    def forward(self, coords: Tensor, shifts: Tensor | None = None,
                params: list[Tensor] | None = None) -> Tensor:
        return siren_forward(self.cfg, list(self.params) if params is None else params,
                             coords, shifts)
