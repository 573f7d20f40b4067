"""NeRF viewer: held-out views truth beside prediction (PSNR in the title), depth maps,
and new views along an orbit as a PNG grid and a GIF.

Inputs are :class:`mscn_datasets.scenes.Scene` objects as the nerf modality reads them:
``truth`` an original scene, ``recon`` a rendered one (``mscn fit``/``decode`` output:
its views at the truth's poses, ``depths``, ``orbit`` and ``info``). Pure matplotlib /
Pillow / imageio (no GPU stack, no child process). Every file goes through
:func:`mscn_core.atomic.write_atomic`; existing outputs are refused before any work
unless ``overwrite``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from mscn_core.atomic import check_output, write_atomic
from mscn_datasets.scenes import Scene

__all__ = ["depth_image", "orbit_frames", "orbit_indices", "psnr", "view_scene",
           "write_gif"]

MAX_ROWS = 6  # scored views shown (the first ones)
ORBIT_COLUMNS = 8


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [0, 1]."""
    mse = float(np.mean((np.clip(a, 0, 1) - np.clip(b, 0, 1)) ** 2))
    return -10 * math.log10(max(mse, 1e-20))


def depth_image(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Depth ``(H, W)`` → RGB in [0, 1] (turbo: near red … far blue), background white."""
    from matplotlib import colormaps

    hit = np.isfinite(depth) & (depth > 0)
    x = np.clip((np.where(hit, depth, hi) - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = colormaps["turbo_r"](x)[..., :3]
    rgb[~hit] = 1.0
    return rgb.astype(np.float32)


def _depth_range(scene: Scene) -> tuple[float, float]:
    render = scene.info.get("render", {}) if isinstance(scene.info, dict) else {}
    if "near" in render and "far" in render:
        return float(render["near"]), float(render["far"])
    ds = [d[np.isfinite(d) & (d > 0)] for d in
          ([scene.depths] if scene.depths is not None else [])]
    vals = np.concatenate([d.ravel() for d in ds]) if ds else np.zeros(0)
    return (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)


def orbit_indices(n: int, columns: int = ORBIT_COLUMNS) -> list[int]:
    """Which of ``n`` orbit views (view k at 360·k/n degrees) one row of at most
    ``columns`` shows: all when they fit; else every (n/m)-th view for the largest
    divisor m of n with columns/2 ≤ m ≤ columns (exactly even steps: 12 views → 6, every
    60°); else ``columns`` views at the nearest of evenly spaced angles."""
    if n <= columns:
        return list(range(n))
    for m in range(columns, (columns + 1) // 2 - 1, -1):
        if n % m == 0:
            return list(range(0, n, n // m))
    return sorted(set(np.linspace(0, n, columns, endpoint=False).round().astype(int)
                      .tolist()))


def _degrees(a: float) -> str:
    """An orbit angle for a title: whole degrees exactly, else one decimal."""
    return f"{a:.1f}".removesuffix(".0")


def orbit_frames(recon: Scene, min_side: int = 128) -> list[np.ndarray]:
    """Orbit views as uint8 frames: colour beside depth, enlarged to ``min_side``."""
    if recon.orbit is None or len(recon.orbit) == 0:
        return []
    lo, hi = _depth_range(recon)
    frames = []
    for k in range(len(recon.orbit)):
        rgb = recon.orbit.images[k]
        dep = (depth_image(recon.orbit.depths[k], lo, hi) if recon.orbit.depths is not None
               else np.ones_like(rgb))
        pad = np.ones((rgb.shape[0], max(2, rgb.shape[1] // 32), 3), np.float32)
        frame = np.concatenate([rgb, pad, dep], 1)
        rep = max(1, math.ceil(min_side / rgb.shape[0]))
        frame = frame.repeat(rep, 0).repeat(rep, 1)
        frames.append(np.round(frame * 255).astype(np.uint8))
    return frames


def write_gif(frames: list[np.ndarray], path: str | os.PathLike, overwrite: bool = False,
              fps: float = 8.0) -> Path:
    """An endlessly looping GIF of the frames."""
    import imageio.v3 as iio

    if not frames:
        raise ValueError("no orbit views to animate (the reconstruction was rendered with "
                         "--orbit-views 0)")
    stack = np.stack(frames)
    return write_atomic(path, lambda tmp: iio.imwrite(tmp, stack, extension=".gif",
                                                      duration=1000 / fps, loop=0), overwrite)


def view_scene(truth: Scene, recon: Scene, path: str | os.PathLike, overwrite: bool = False,
               animation: str | os.PathLike | None = None) -> Path:
    """One PNG: context views the model adapted on; for each scored view truth,
    prediction (PSNR in the title) and predicted depth; the orbit (colour and depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for p in (path, animation):
        if p is not None:
            check_output(p, overwrite)
    if truth.intrinsics.height != recon.intrinsics.height:
        truth = truth.resized(recon.intrinsics.height)
    info = recon.info if isinstance(recon.info, dict) else {}
    common = [v for v in recon.view_ids if v in truth.view_ids][:MAX_ROWS]
    context = [v for v in info.get("context_views", []) if v in truth.view_ids][:4]
    heldout = bool(info.get("heldout", False))
    lo, hi = _depth_range(recon)
    orbit = recon.orbit if recon.orbit is not None and len(recon.orbit) else None
    n_orbit = len(orbit_indices(len(orbit), ORBIT_COLUMNS)) if orbit is not None else 0
    ncols = max(3, min(ORBIT_COLUMNS, max(n_orbit, 6)))
    rows: list[tuple[str, list[tuple[np.ndarray, str]]]] = []
    if context:
        rows.append(("context", [(truth.images[truth.index(v)], f"context view {v}\n"
                                  "(adapted on)") for v in context]))
    scores = []
    per_view = 3 if recon.depths is not None else 2
    per_row = max(1, ncols // per_view)
    row: list[tuple[np.ndarray, str]] = []
    for v in common:
        t, p = truth.images[truth.index(v)], recon.images[recon.index(v)]
        s = psnr(p, t)
        scores.append(s)
        kind = "held-out" if heldout else "view"
        row += [(t, f"{kind} {v}: truth"), (p, f"prediction {s:.2f} dB")]
        if recon.depths is not None:
            row.append((depth_image(recon.depths[recon.index(v)], lo, hi),
                        f"depth ({lo:g}–{hi:g})"))
        if len(row) == per_row * per_view:
            rows.append(("scored", row))
            row = []
    if row:
        rows.append(("scored", row))
    if not common:  # nothing to compare with: show what was rendered
        rows.append(("scored", [(recon.images[k], f"view {v} (no truth)")
                                for k, v in enumerate(recon.view_ids[:ncols])]))
    if orbit is not None:
        ks = orbit_indices(len(orbit), ORBIT_COLUMNS)
        rows.append(("orbit", [(orbit.images[k], f"orbit {_degrees(360 * k / len(orbit))}°")
                               for k in ks]))
        if orbit.depths is not None:
            rows.append(("orbit", [(depth_image(orbit.depths[k], lo, hi), "depth")
                                   for k in ks]))
    cell = 1.9
    fig, axes = plt.subplots(len(rows), ncols, figsize=(cell * ncols, cell * len(rows) + 0.6),
                             squeeze=False)
    for r, (_, cells) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(cells):
                img, title = cells[c]
                ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
                ax.set_title(title, fontsize=7.5)
    mean = f", mean {np.mean(scores):.2f} dB over {len(scores)} views" if scores else ""
    what = "held-out views" if heldout else "views"
    fig.suptitle(f"{truth.name}: {what} rendered from the adapted field{mean}", fontsize=9)
    fig.tight_layout()
    try:
        out = write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100),
                           overwrite)
    finally:
        plt.close(fig)
    if animation is not None:
        write_gif(orbit_frames(recon), animation, overwrite)
    return out
