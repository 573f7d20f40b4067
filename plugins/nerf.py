"""Radiance fields of posed views (the paper's SRN Cars experiment, after functa).

A scene (an SRN folder or a transforms.json, see :mod:`mscn_datasets.scenes`) is one
item. Its **signal** is rays: ``coords (N, 6)`` = origin and direction of every pixel-centre
ray of its *context* views, then of its *held-out* views, ``targets (N, 3)`` their RGB,
and the mask marks the context rays. Only context rays are ever adapted on: the sampler
draws from them alone, and the held-out rays carry zero weight if a whole signal is used;
:meth:`NerfModality.metrics` then scores the held-out views (functa's protocol: adapt on
view 63, or 63 and 127; score 23, 55, 82, 119). A scene without those views (an SRN
*training* scene of 50 views) is all context and scored on its own views.

Rendering (:meth:`NerfModality.render`, used by the inner and outer loops, validation,
metrics and decoding alike), functa's ``render_rays``: ``samples`` depths evenly spaced
from ``near`` to ``far`` (both included; ``stratified`` jitters them within their bins
while adapting, seeded by the batch), the network at every point, RGB = the raw outputs
(the SIREN's 0.5 offset included), density ``clip(elu(x, 0.1) + 0.1, 0, max_density)``,
emission–absorption compositing with Δt scaled by |d| (the last interval 1e-3), and the
untaken transmittance filled with white. The loss is the mean squared error of the
rendered colours (the contract's default ``objective``, functa's ``loss_fn_nerf``).

Bits per value count the **context pixels** (H·W per context view): what a receiver had
to see to get the scene. Output of fit/decode: a scene folder (SRN layout) with the
scored views rendered at their poses, their depth maps, an orbit of new views and
``mscn.json``; ``mscn view`` shows truth beside prediction.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mscn_core import limits
from mscn_core.atomic import write_folder_atomic
from mscn_core.modality import Field, Modality, PredictFn, checkpoint_settings
from mscn_core.signals import Signal
from mscn_core.streaming import ItemRef
from mscn_datasets import scenes
from mscn_datasets.scenes import Intrinsics, Scene, SceneDataError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# torch (~1 s) is imported by the functions that use it: listing plugins (``mscn
# modalities``) imports this module and must stay fast.

# Points per network call when rendering without gradients (views for metrics/output):
# bounded memory at any image size; with gradients the batch is the caller's choice.
RENDER_POINTS = 1 << 17
AUX_COLUMNS = 7  # coords with a 7th column ask render for depth and opacity too
MAX_VIEWS = 4096  # scored views a stream may declare


@dataclass
class NerfOptions:
    """Rays, rendering and the evaluation protocol (defaults: functa's SRN Cars)."""

    near: float = 0.8  # depth along the optical axis where ray samples start (SRN Cars)
    far: float = 1.8  # depth where ray samples end
    samples: int = 32  # evenly spaced samples per ray, near and far included
    # jitter every sample within its bin while adapting (seeded by the batch)
    stratified: bool = False
    white_background: bool = True  # composite onto white (SRN, NeRF-synthetic)
    max_density: float = 10.0  # clip of the density elu(x, 0.1) + 0.1 (functa)
    views_per_step: int = 8  # V: each step draws its rays from V context views
    # rays per inner step when fitting or encoding (V × R; functa 8 × 1024); meta-training
    # draws --points-per-item rays; --points-per-step overrides this for one command
    rays_per_step: int = 8192
    # auto: held-out protocol when a scene has every context view, else all views are
    # context (a training scene); train: all views are context; heldout: required
    protocol: Literal["auto", "train", "heldout"] = "auto"
    # view ids adapted on (functa: 63, or 63 and 127; repeat the flag)
    context_views: list[int] = field(default_factory=lambda: [63])
    # view ids scored after adapting, never adapted on (functa: 23 55 82 119)
    novel_views: list[int] = field(default_factory=lambda: [23, 55, 82, 119])
    size: int | None = None  # resample views to SIZE×SIZE on reading (intrinsics scaled)
    orbit_views: int = 12  # fit/decode also render this many new views along an orbit
    orbit_size: int | None = None  # side of the orbit views in pixels (default: the scene's)
    # elevation of the orbit in degrees (default: the context cameras')
    orbit_elevation: float | None = None
    ssim: bool = True  # also report SSIM (scikit-image) of the scored views


def _opts(options: NerfOptions | None) -> NerfOptions:
    return options if options is not None else NerfOptions()


def _size(options: NerfOptions | None) -> int | None:
    """``options.size``, checked (read, scan and load alike)."""
    size = _opts(options).size
    if size is not None and not 1 <= size <= scenes.MAX_SIDE:
        raise ValueError(f"--size must be 1..{scenes.MAX_SIDE}, got {size}")
    return size


@dataclass
class SceneSignal(Signal):
    """A Signal that remembers how to sample and score it (never transmitted)."""

    views_per_step: int = 8
    ssim: bool = True


# -- geometry helpers -------------------------------------------------------------------
def view_rays(pose: np.ndarray, intr: Intrinsics) -> np.ndarray:
    """Rays ``(H·W, 6)`` (origin, direction) of one view, row-major pixels."""
    o, d = scenes.pixel_rays(pose, intr)
    return np.concatenate([o, d], -1).reshape(-1, 6)


# A pose is sent as its camera centre alone when the look-at camera at that centre (aimed
# at the orbit's target, level with its up) is it to within this (world units, and
# radians for the axes: 1e-4 of a pixel at SRN's focal length); else as 12 numbers.
LOOK_AT_TOL = 1e-6


MAX_COORD = 1e9  # |a pose or orbit number| above this is refused (no overflow downstream)


def _bounded(x: Any, what: str) -> float:
    v = limits.check_finite(x, what)
    if abs(v) > MAX_COORD:
        raise ValueError(f"{what} must be within ±{MAX_COORD:g}, got {v:g}")
    return v


def _f32(x: float, scale: float = 0.0) -> float | int:
    return scenes.float32_short(x, scale)


def encode_poses(poses: np.ndarray, target: Any, up: Any) -> list[float | int]:
    """Camera-to-world poses → a flat list of numbers at float32 precision (what the old
    base64 of float32 held, in fewer bytes): 3 per view (the camera centre) when every
    pose is the look-at camera of its centre towards ``target`` with ``up`` up (SRN's and
    NeRF-synthetic's cameras are; the orbit's target and up are such a point and axis),
    else the 12 numbers of each 3×4 matrix, row by row. :func:`decode_poses` inverts it;
    ``target`` and ``up`` must be the values the decoder reads (after JSON)."""
    poses = np.asarray(poses, np.float64)
    scale = float(np.abs(poses[:, :3, 3]).max(initial=0.0))
    centres = [[_f32(x, scale) for x in p[:3, 3]] for p in poses]
    try:
        again = decode_poses([x for c in centres for x in c], len(poses), target, up)
        if np.abs(again[:, :3, :4] - poses[:, :3, :4]).max(initial=0.0) <= LOOK_AT_TOL:
            return [x for c in centres for x in c]
    except ValueError:
        pass
    return [_f32(x, 1.0 if k % 4 < 3 else scale)  # rotation entries are in [-1, 1]
            for p in poses for k, x in enumerate(p[:3, :4].reshape(-1))]


def decode_poses(values: Any, n: int, target: Any, up: Any) -> np.ndarray:
    """The inverse of :func:`encode_poses`, checked (stream metadata may be forged): ``n``
    poses (4×4) from 3 or 12 numbers per view."""
    if not isinstance(values, list) or len(values) not in (3 * n, 12 * n):
        raise ValueError(f"poses must be 3 (a look-at camera's centre) or 12 (a 3×4 pose) "
                         f"numbers per view, {n} views; got "
                         f"{len(values) if isinstance(values, list) else type(values).__name__}")
    v = np.array([_bounded(x, "a pose entry") for x in values], np.float64)
    out = np.tile(np.eye(4), (n, 1, 1))
    if len(values) == 12 * n:
        out[:, :3, :4] = v.reshape(n, 3, 4)
        for k in range(n):
            try:
                scenes.check_rigid(out[k], f"pose {k}")
            except SceneDataError as err:
                raise ValueError(str(err)) from None
        return out
    t = np.asarray(target, np.float64)
    for k, c in enumerate(v.reshape(n, 3)):
        if not np.linalg.norm(c - t) > 1e-9:
            raise ValueError(f"pose {k}: a look-at camera at the orbit target has no direction")
        with np.errstate(all="ignore"):  # overflowing numbers: refused just below
            out[k] = scenes.look_at(c, t, up)
        try:
            scenes.check_rigid(out[k], f"pose {k}")
        except SceneDataError as err:
            raise ValueError(str(err)) from None
    return out


def encode_intrinsics(intr: Intrinsics) -> list[float | int]:
    """``[height, width, fx]`` for square pixels centred on the image (SRN, NeRF-synthetic),
    ``[height, width, fx, fy]`` when centred, else ``[height, width, fx, fy, cx, cy]``;
    float32 precision (rays are computed in float32)."""
    out = [intr.height, intr.width, _f32(intr.fx)]
    if intr.cx == intr.width / 2 and intr.cy == intr.height / 2:
        return out if intr.fy == intr.fx else out + [_f32(intr.fy)]
    return out + [_f32(intr.fy), _f32(intr.cx, intr.width), _f32(intr.cy, intr.height)]


def decode_intrinsics(v: Any) -> Intrinsics:
    """The inverse of :func:`encode_intrinsics`, checked as :meth:`Intrinsics.from_dict`."""
    if not isinstance(v, list) or len(v) not in (3, 4, 6):
        raise ValueError("intrinsics must be [height, width, fx], [height, width, fx, fy] "
                         "or [height, width, fx, fy, cx, cy]")
    h, w, fx = v[:3]
    fy = v[3] if len(v) > 3 else fx
    cx, cy = (v[4], v[5]) if len(v) == 6 else (
        (w / 2, h / 2) if isinstance(w, int) and isinstance(h, int) else (0.0, 0.0))
    return Intrinsics.from_dict({"fx": fx, "fy": fy, "cx": cx, "cy": cy, "height": h,
                                 "width": w})


def view_layout(meta: dict) -> tuple[Intrinsics, list[int], list[int], bool]:
    """(intrinsics, context view ids, scored view ids, held out?) of an item's meta: the
    scored views are ``views``; ``context`` is there when they were held out, else the
    scored views were the context views."""
    intr = decode_intrinsics(meta.get("intrinsics"))
    scored = meta.get("views")
    if not isinstance(scored, list) or not 1 <= len(scored) <= MAX_VIEWS:
        raise ValueError(f"views must be a list of 1..{MAX_VIEWS} view ids")
    scored = [limits.check_count(v, "a view id", 0, 10**9) for v in scored]
    if "context" not in meta:
        return intr, scored, scored, False
    ctx = meta["context"]
    if not isinstance(ctx, list) or not 1 <= len(ctx) <= MAX_VIEWS:
        raise ValueError(f"context must be a list of 1..{MAX_VIEWS} view ids")
    return intr, [limits.check_count(v, "a view id", 0, 10**9) for v in ctx], scored, True


ORBIT_FIELDS = ("target", "up", "start", "radius", "elevation")


def encode_orbit(orbit: dict) -> list[float | int]:
    """:func:`orbit_frame`'s dict as 11 numbers: target, up, start (3 each), radius,
    elevation (their 6 and 4 decimals, shortest form)."""
    return [_f32(x) for k in ORBIT_FIELDS for x in np.atleast_1d(orbit[k])]


def decode_orbit(v: Any) -> dict:
    """The inverse of :func:`encode_orbit`, checked."""
    if not isinstance(v, list) or len(v) != 11:
        raise ValueError("orbit must be 11 numbers: target, up, start (3 each), radius, "
                         "elevation")
    x = [_bounded(a, "an orbit number") for a in v]
    orbit = {"target": x[0:3], "up": x[3:6], "start": x[6:9], "radius": x[9],
             "elevation": x[10]}
    if not orbit["radius"] > 0 or np.linalg.norm(orbit["up"]) < 1e-6:
        raise ValueError("orbit needs a positive radius and a non-zero up vector")
    return orbit


def _check_layout(meta: dict) -> None:
    """Streams of the first header layout (base64 poses, object intrinsics and orbit)
    are refused in one line rather than misread."""
    if isinstance(meta.get("intrinsics"), dict) or "scored_views" in meta:
        raise ValueError("this nerf stream has the earlier header layout (base64 poses); "
                         "re-encode the scene with this version of mscn")


def world_up(poses: np.ndarray) -> np.ndarray:
    """The scene's up direction, assuming cameras are not rolled (their x axes are
    level): the normal of the plane of the cameras' x axes when they span one (cameras
    at several azimuths), else the world axis nearest the cameras' image-up (one camera
    cannot tell its own elevation; SRN scenes are +y up, NeRF-synthetic +z)."""
    cam_up = -poses[:, :3, 1].mean(0)
    if len(poses) >= 2:
        _, sv, vt = np.linalg.svd(poses[:, :3, 0])
        if sv[1] > 0.2 * sv[0] and sv[2] < 0.05 * sv[0]:
            up = vt[2]
            return up if up @ cam_up >= 0 else -up
    k = int(np.argmax(np.abs(cam_up)))
    up = np.zeros(3)
    up[k] = np.sign(cam_up[k]) or 1.0
    return up


def orbit_frame(poses: np.ndarray, near: float, far: float) -> dict:
    """Where an orbit of new views goes, from the context cameras: the point they look
    at (least-squares meeting point of their axes; one camera: its axis at the middle
    depth), their distance to it, the scene's up (:func:`world_up`), their elevation
    above the horizontal plane, and the first one's azimuth."""
    centres, axes = poses[:, :3, 3], poses[:, :3, 2]
    mid = centres + axes * (near + far) / 2
    target = mid.mean(0)
    if len(poses) > 1:
        a = np.zeros((3, 3))
        b = np.zeros(3)
        for c, z in zip(centres, axes, strict=True):
            p = np.eye(3) - np.outer(z, z)
            a += p
            b += p @ c
        if np.linalg.cond(a) < 1e6:
            target = np.linalg.solve(a, b)
    up = world_up(poses)
    rel = centres - target
    radius = float(np.linalg.norm(rel, axis=1).mean())
    el = float(np.degrees(np.arcsin(np.clip((rel / np.linalg.norm(rel, axis=1)[:, None])
                                            @ up, -1, 1))).mean())
    return {"target": [round(float(x), 6) for x in target],
            "up": [round(float(x), 6) for x in up], "radius": round(radius, 6),
            "elevation": round(el, 4), "start": [round(float(x), 6) for x in rel[0]]}


# -- the modality -----------------------------------------------------------------------
class NerfModality(Modality):
    name = "nerf"
    # the stream header's preset dictionary: FROZEN
    header_words = ('"orbit":[', '"poses":[', '"intrinsics":[', '"views":[', '"context":[',
                    '"nerf"')
    description = ("radiance fields of posed views (SRN folders, transforms.json) → novel "
                   "views (PNG)")
    in_dim = 3
    out_dim = 4
    options = NerfOptions
    points_per_step = 8192  # rays per inner step when fitting/encoding (functa 8 × 1024)
    codec_batch_size = 2  # scenes adapted at once to fit the codec: each step renders
    # rays × samples points (6 scenes at 8192 rays: 4.9 GB over the baseline at 16, 1.6 at 2)
    view_names = ("scene", "scenes", "views")

    RENDER_FIELDS = ("near", "far", "samples", "stratified", "white_background",
                     "max_density")

    def __init__(self) -> None:
        self.render_cfg = {k: getattr(NerfOptions, k) for k in self.RENDER_FIELDS}
        self.points_per_step = NerfOptions.rays_per_step
        self._from_checkpoint = False

    # -- files -------------------------------------------------------------------------
    def guess_can_open(self, path: str | os.PathLike) -> bool:
        return scenes.is_scene_path(path)

    def read(self, path: str | os.PathLike, options: NerfOptions | None = None
             ) -> list[Scene]:
        return scenes.read_scenes(path, size=_size(options))

    def scan(self, path: str | os.PathLike, options: NerfOptions | None = None
             ) -> list[ItemRef]:
        """References to :meth:`read`'s scenes (a scene folder, its intrinsics.txt or
        transforms*.json, or a folder of scene folders), named from their paths: no
        image or pose is read. A broken scene is found when it is loaded."""
        _size(options)  # a bad --size fails here, before any training
        return [ItemRef((kind, str(where)), name)
                for kind, name, where in scenes.scene_sources(path)]

    def load(self, ref: ItemRef, options: NerfOptions | None = None) -> Scene:
        """One scene of :meth:`scan`, as :meth:`read` gives it."""
        kind, where = ref.key
        read = scenes.read_srn if kind == "srn" else scenes.read_transforms
        return read(where, size=_size(options))

    def item_label(self, item: Scene) -> str:
        return item.name

    # -- settings kept in the checkpoint -------------------------------------------------
    def state(self) -> dict:
        return {"render": dict(self.render_cfg), "rays_per_step": int(self.points_per_step)}

    def load_state(self, state: dict) -> None:
        self.render_cfg.update(state.get("render", {}))
        self.points_per_step = int(state.get("rays_per_step", self.points_per_step))
        self._from_checkpoint = True

    def _use_options(self, o: NerfOptions) -> None:
        """Meta-training (or a fit from scratch) takes the options; afterwards the
        checkpoint's rendering wins: its network and rates were learnt for it."""
        if o.samples < 2 or not 0 <= o.near < o.far or o.max_density <= 0:
            raise ValueError(f"need samples >= 2, 0 <= near < far and max_density > 0; got "
                             f"samples={o.samples}, near={o.near}, far={o.far}, "
                             f"max_density={o.max_density}")
        if o.views_per_step < 1 or o.rays_per_step < 1:
            raise ValueError("views_per_step and rays_per_step must be >= 1")
        stored = self.render_cfg if self._from_checkpoint else None
        self.render_cfg = checkpoint_settings(o, self.RENDER_FIELDS, stored)
        if stored is None:
            self.points_per_step = o.rays_per_step

    # -- signals ---------------------------------------------------------------------------
    def split_views(self, scene: Scene, o: NerfOptions) -> tuple[list[int], list[int]]:
        """(context view ids, held-out view ids) of a scene under the protocol."""
        have = set(scene.view_ids)
        ctx, novel = list(dict.fromkeys(o.context_views)), list(dict.fromkeys(o.novel_views))
        if set(ctx) & set(novel):
            raise ValueError(f"views {sorted(set(ctx) & set(novel))} are both context and "
                             "novel views")
        heldout = o.protocol == "heldout" or (o.protocol == "auto" and ctx
                                              and set(ctx) <= have)
        if not heldout:
            return list(scene.view_ids), []
        missing = [v for v in ctx + novel if v not in have]
        if missing or not ctx:
            raise SceneDataError(f"{scene.source or scene.name}: the held-out protocol needs "
                                 f"views {ctx} (context) and {novel} (novel); missing "
                                 f"{missing or 'context views'} (--protocol train adapts on "
                                 "all views)")
        return ctx, novel

    def _orbit(self, item: Scene, ctx: list[int]) -> dict:
        cfg = self.render_cfg
        return orbit_frame(item.poses[[item.index(v) for v in ctx]], cfg["near"], cfg["far"])

    def to_signal(self, item: Scene, options: NerfOptions | None = None) -> SceneSignal:
        """Rays of the context views, then the held-out ones. ``meta`` is what a stream
        carries: ``name``, ``intrinsics`` (:func:`encode_intrinsics`), the scored
        ``views``, ``context`` (only when they are held out) and ``orbit``
        (:func:`encode_orbit`); the scored views' poses are the item's template."""
        import torch

        o = _opts(options)
        self._use_options(o)
        ctx, novel = self.split_views(item, o)
        intr = item.intrinsics
        ids = ctx + novel
        idx = [item.index(v) for v in ids]
        rays = np.concatenate([view_rays(item.poses[i], intr) for i in idx]).astype(np.float32)
        rgb = item.images[idx].reshape(-1, 3).astype(np.float32)
        hw = intr.height * intr.width
        mask = torch.zeros(len(rays), dtype=torch.bool)
        mask[: len(ctx) * hw] = True
        meta = {"name": item.name, "intrinsics": encode_intrinsics(intr),
                "views": novel or ctx, **({"context": ctx} if novel else {}),
                "orbit": encode_orbit(self._orbit(item, ctx))}
        return SceneSignal(torch.from_numpy(rays), torch.from_numpy(rgb), mask, meta,
                           views_per_step=o.views_per_step, ssim=o.ssim)

    def item_template(self, item: Scene, options: NerfOptions | None = None) -> dict:
        """The poses of the scored views (:func:`encode_poses`: 3 or 12 numbers each),
        so a decoder renders them."""
        o = _opts(options)
        ctx, novel = self.split_views(item, o)
        orbit = decode_orbit(encode_orbit(self._orbit(item, ctx)))  # as the decoder reads it
        return {"poses": encode_poses(item.poses[[item.index(v) for v in novel or ctx]],
                                      orbit["target"], orbit["up"])}

    def sample(self, signal: Signal, n: int, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """V context views (without replacement), ``n / V`` uniform rays from each."""
        import torch

        intr, ctx, _, _ = view_layout(signal.meta)
        hw, n_ctx = intr.height * intr.width, len(ctx)
        v = max(1, min(getattr(signal, "views_per_step", 8), n_ctx, n))
        views = torch.randperm(n_ctx, generator=generator)[:v]
        counts = [n // v + (1 if k < n % v else 0) for k in range(v)]
        pick = torch.cat([views[k] * hw + torch.randint(hw, (c,), generator=generator)
                          for k, c in enumerate(counts)])
        return (signal.coords[pick], signal.targets[pick],
                torch.ones(n, dtype=signal.coords.dtype))

    # -- volume rendering ------------------------------------------------------------------
    def render(self, field: Field, coords: Tensor) -> Tensor:
        """Rays ``(B, n, 6)`` → RGB ``(B, n, 3)``; with a 7th column, ``(B, n, 5)`` =
        RGB, depth (expected depth / opacity) and opacity."""
        import torch

        if not torch.is_grad_enabled():
            step = max(1, RENDER_POINTS // (coords.shape[0] * int(self.render_cfg["samples"])))
            if coords.shape[1] > step:
                return torch.cat([self.render(field, coords[:, i:i + step])
                                  for i in range(0, coords.shape[1], step)], 1)
        rgb, depth, acc = self.render_rays(field, coords[..., :3], coords[..., 3:6])
        if coords.shape[-1] >= AUX_COLUMNS:
            return torch.cat([rgb, depth[..., None], acc[..., None]], -1)
        return rgb

    def render_rays(self, field: Field, origins: Tensor, dirs: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """Emission–absorption along rays ``(B, n, 3)``: colour, depth, opacity."""
        import torch
        import torch.nn.functional as F

        cfg = self.render_cfg
        s, near, far = int(cfg["samples"]), float(cfg["near"]), float(cfg["far"])
        b, n = origins.shape[:2]
        t = torch.linspace(near, far, s, dtype=origins.dtype, device=origins.device)
        t = t.expand(b, n, s)
        if cfg["stratified"] and torch.is_grad_enabled():
            seed = int(abs(float(origins.detach().double().sum()
                                 + dirs.detach().double().sum())) * 1e6) % (2**62)
            g = torch.Generator().manual_seed(seed)
            mids = 0.5 * (t[..., 1:] + t[..., :-1])
            lower = torch.cat([t[..., :1], mids], -1)
            upper = torch.cat([mids, t[..., -1:]], -1)
            u = torch.rand(t.shape, generator=g, dtype=t.dtype).to(t.device)
            t = lower + (upper - lower) * u
        points = origins[..., None, :] + dirs[..., None, :] * t[..., None]
        out = field(points.reshape(b, n * s, 3)).reshape(b, n, s, -1)
        rgb = out[..., :3]
        sigma = (F.elu(out[..., 3], alpha=0.1) + 0.1).clamp(0.0, float(cfg["max_density"]))
        delta = torch.cat([t[..., 1:] - t[..., :-1], torch.full_like(t[..., :1], 1e-3)], -1)
        delta = delta * dirs.norm(dim=-1, keepdim=True)
        alpha = 1.0 - torch.exp(-sigma * delta)
        trans = torch.clamp(1.0 - alpha + 1e-10, max=1.0)
        trans = torch.cumprod(torch.cat([torch.ones_like(trans[..., :1]), trans[..., :-1]],
                                        -1), -1)
        w = alpha * trans
        acc = w.sum(-1)
        colour = (w[..., None] * rgb).sum(-2)
        if cfg["white_background"]:
            colour = colour + (1.0 - acc)[..., None]
        depth = (w * t).sum(-1) / acc.clamp_min(1e-6)
        return colour, depth, acc

    # -- numbers ---------------------------------------------------------------------------
    def n_values(self, signal: Signal) -> int:
        """Context pixels: bits per value are bits per pixel of the views adapted on."""
        intr, ctx, _, _ = view_layout(signal.meta)
        return len(ctx) * intr.height * intr.width

    def metrics(self, signal: Signal, pred: Tensor) -> dict[str, float]:
        """Mean per-view PSNR (and SSIM) of the scored views (held-out ones when the
        scene has them, colours clipped to [0, 1]); PSNR of the context views too."""
        intr, ctx, _, heldout = view_layout(signal.meta)
        h, w, n_ctx = intr.height, intr.width, len(ctx)
        p = pred[..., :3].detach().clamp(0, 1).double().reshape(-1, h, w, 3)
        t = signal.targets.double().reshape(-1, h, w, 3)
        mse = ((p - t) ** 2).mean(dim=(1, 2, 3))
        psnr = [-10 * math.log10(max(float(m), 1e-20)) for m in mse]
        scored = list(range(n_ctx, len(psnr))) if heldout else list(range(n_ctx))
        out = {"psnr": float(np.mean([psnr[i] for i in scored])),
               "psnr_context": float(np.mean(psnr[:n_ctx])),
               "mse": float(mse[scored].mean()),
               "heldout": float(heldout), "views_scored": float(len(scored))}
        if getattr(signal, "ssim", True) and min(h, w) >= 7:
            from skimage.metrics import structural_similarity

            out["ssim"] = float(np.mean([
                structural_similarity(t[i].numpy(), p[i].numpy(), channel_axis=2,
                                      data_range=1.0) for i in scored]))
        return out

    # -- artifacts -------------------------------------------------------------------------
    def check_meta(self, meta: dict, options: NerfOptions | None = None) -> int:
        """Name, intrinsics, view ids, poses and orbit as a stream states them; returns
        the values the rendering will have (RGB + depth per pixel).

        The layout is :meth:`to_signal`'s (compact lists). Streams written with the first
        layout (object intrinsics and orbit, ``scored_views``, base64 float32 poses) are
        refused with one line asking to re-encode: no such stream was published."""
        o = _opts(options)
        _check_layout(meta)
        if not isinstance(meta.get("name"), str) or not meta["name"]:
            raise ValueError("name must be a non-empty string")
        intr, _, ids, _ = view_layout(meta)
        orbit = decode_orbit(meta.get("orbit"))
        template = meta.get("template")
        if not isinstance(template, dict):
            raise ValueError("template must be an object")
        decode_poses(template.get("poses"), len(ids), orbit["target"], orbit["up"])
        n_orbit = limits.check_count(o.orbit_views, "orbit_views", 0, MAX_VIEWS)
        side = limits.check_count(o.orbit_size or intr.height, "orbit_size", 1,
                                  scenes.MAX_SIDE)
        n = 4 * (len(ids) * intr.height * intr.width + n_orbit * side * side)
        return limits.check_output_values(n, f"scene {meta['name']!r}")

    def reconstruct(self, meta: dict, predict: PredictFn, options: NerfOptions | None = None,
                    template: Scene | None = None) -> Scene:
        """The scored views rendered at their poses (with depth) and an orbit of new
        views, as a :class:`Scene` (``save`` writes it as an SRN folder)."""
        o = _opts(options)
        if template is None:
            self.check_meta(meta, options)
        intr, ctx, ids, heldout = view_layout(meta)
        orb = decode_orbit(meta["orbit"])
        if template is None:
            poses = decode_poses(meta["template"]["poses"], len(ids), orb["target"], orb["up"])
        else:
            poses = template.poses[[template.index(v) for v in ids]]
        images, depths = self.render_views(predict, poses, intr)
        elevation = o.orbit_elevation if o.orbit_elevation is not None else orb["elevation"]
        info = {"kind": "mscn nerf rendering", "scene": meta["name"], "context_views": ctx,
                "scored_views": ids, "heldout": heldout, "render": dict(self.render_cfg)}
        orbit = None
        if o.orbit_views > 0:
            side = o.orbit_size or intr.height
            ointr = intr.resized(side, round(side * intr.width / intr.height))
            opose = scenes.orbit_poses(o.orbit_views, orb["radius"], elevation, orb["up"],
                                       orb["target"], orb["start"])
            oimg, odep = self.render_views(predict, opose, ointr)
            orbit = Scene(f"{meta['name']}_orbit", oimg, opose, ointr,
                          list(range(o.orbit_views)), depths=odep,
                          info={"kind": "mscn nerf orbit", "elevation": elevation})
        return Scene(meta["name"], images, poses, intr, ids, source="mscn reconstruction",
                     depths=depths, info=info, orbit=orbit)

    def render_views(self, predict: PredictFn, poses: np.ndarray, intr: Intrinsics
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Images ``(V, H, W, 3)`` and depths ``(V, H, W)`` (inf where nothing is hit)."""
        import torch

        imgs, deps = [], []
        for pose in poses:
            rays = view_rays(pose, intr)
            coords = np.concatenate([rays, np.ones((len(rays), 1))], 1).astype(np.float32)
            with torch.no_grad():
                out = predict(torch.from_numpy(coords)).double().numpy()
            imgs.append(np.clip(out[:, :3], 0, 1).reshape(intr.height, intr.width, 3))
            d = np.where(out[:, 4] > 0.5, out[:, 3], np.inf)
            deps.append(d.reshape(intr.height, intr.width))
        return np.stack(imgs).astype(np.float32), np.stack(deps).astype(np.float32)

    def save(self, artifacts: list[Scene], path: str | os.PathLike, overwrite: bool = False,
             provenance: dict | None = None) -> Path:
        """One scene: an SRN folder at ``path``; several: one sub-folder per scene. The
        folder carries mscn's output marker, so ``overwrite`` may replace it later."""
        for a in artifacts:
            a.info = {**a.info, **({"provenance": provenance} if provenance else {})}
        names = [a.name for a in artifacts]
        if len(set(names)) != len(names):
            raise ValueError(f"scenes share names ({names}); cannot write one folder each")

        def fill(root: Path) -> None:
            if len(artifacts) == 1:
                scenes.fill_srn(artifacts[0], root)
                return
            for a in artifacts:
                (root / a.name).mkdir()
                scenes.fill_srn(a, root / a.name)

        marker = {k: provenance[k] for k in ("checkpoint_sha256", "command")
                  if provenance and k in provenance}
        return write_folder_atomic(path, fill, overwrite, marker=marker)

    def view(self, truth: Scene, recon: Scene, path: str | os.PathLike,
             options: NerfOptions | None = None, overwrite: bool = False,
             animation: str | os.PathLike | None = None) -> Path:
        """Truth beside prediction (and depth) for the views both have, PSNR in each
        title, and the orbit; ``animation``: the orbit as a GIF."""
        from mscn_viewers import nerf_views

        return nerf_views.view_scene(truth, recon, path, overwrite=overwrite,
                                     animation=animation)
