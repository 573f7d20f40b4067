"""Posed-image scenes: the SRN format and nerfstudio / NeRF-synthetic ``transforms.json``.

Conventions (one inside mscn, converted at the edges):

* A pose is a 4×4 **camera-to-world** matrix in the **OpenCV / SRN** convention: camera
  x right, y down, z forward (the camera looks along +z). SRN files already are.
  NeRF-synthetic and nerfstudio poses are **OpenGL / Blender** (x right, y up, looking
  along −z) and are converted on reading by ``c2w_cv = c2w_gl · diag(1, −1, −1, 1)``,
  the flip functa applies the other way to SRN poses (:data:`CV_GL_FLIP`; it is its own
  inverse). Writers convert back, so files keep their own convention.
* Pixel ``(row i, column j)`` covers ``[j, j+1) × [i, i+1)`` in image coordinates; rays go
  through pixel **centres** ``(j + ½, i + ½)`` (functa's ``extra_shift``).
* Ray directions are **not** normalised: ``d = R · ((u − cx)/fx, (v − cy)/fy, 1)``, so
  a ray parameter ``t`` is depth along the optical axis, as in NeRF and functa, whose
  near/far (0.8 / 1.8 for SRN Cars) are such depths.

Images are float32 RGB in [0, 1]. transforms.json RGBA images are composited on white
(NeRF-synthetic's convention); SRN images must be RGB (an RGBA file whose alpha is not
fully opaque is refused, since SRN has no compositing rule).

Every problem with a file is a :class:`SceneDataError` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mscn_core.atomic import save_bytes_atomic, write_folder_atomic
from mscn_core.bitstream import short_float

__all__ = [
    "CV_GL_FLIP", "Intrinsics", "Scene", "SceneDataError", "check_rigid", "gl_to_cv",
    "cv_to_gl", "is_scene_path", "look_at", "orbit_poses", "pixel_rays", "project",
    "fill_srn", "read_scenes", "read_srn", "read_transforms", "scene_dirs", "write_srn",
    "write_transforms",
]

#: diag(1, −1, −1, 1): OpenCV ⇄ OpenGL camera axes (right-multiplied onto camera-to-world).
CV_GL_FLIP = np.diag([1.0, -1.0, -1.0, 1.0])
RIGID_TOL = 1e-3  # |RᵀR − I| and |det R − 1| above this: not a rotation
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_SIDE = 8192  # larger views are refused before decoding (memory)


class SceneDataError(ValueError):
    """A scene file that cannot be read as posed views (the message names the file)."""


# -- cameras ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels for images of ``height × width``."""

    fx: float
    fy: float
    cx: float
    cy: float
    height: int
    width: int

    def resized(self, height: int, width: int) -> Intrinsics:
        """The same camera for images resampled to ``height × width`` (continuous image
        coordinates scale about the corner, so pixel centres stay pixel centres)."""
        sx, sy = width / self.width, height / self.height
        return Intrinsics(self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy,
                          int(height), int(width))

    def matrix(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])

    def as_dict(self) -> dict:
        return {"fx": self.fx, "fy": self.fy, "cx": self.cx, "cy": self.cy,
                "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, d: Any) -> Intrinsics:
        """From stream metadata (anyone can forge it): types and ranges checked."""
        if not isinstance(d, dict):
            raise ValueError(f"intrinsics must be an object, got {type(d).__name__}")
        try:
            vals = {k: d[k] for k in ("fx", "fy", "cx", "cy")}
            h, w = d["height"], d["width"]
        except KeyError as err:
            raise ValueError(f"intrinsics lack {err}") from None
        for k, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"intrinsics {k} must be a finite number, got {v!r}")
        if vals["fx"] <= 0 or vals["fy"] <= 0:
            raise ValueError("intrinsics need positive focal lengths")
        for k, v in (("height", h), ("width", w)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIDE:
                raise ValueError(f"intrinsics {k} must be an int in 1..{MAX_SIDE}, got {v!r}")
        return cls(float(vals["fx"]), float(vals["fy"]), float(vals["cx"]), float(vals["cy"]),
                   h, w)


def float32_short(x: float, scale: float = 0.0) -> float | int:
    """``x`` at float32 precision: the shortest decimal within half a float32 ulp of
    ``max(|x|, scale)`` (``scale``: the size the number is relative to, so that a
    coordinate near zero gets no digits below the precision of its neighbours)."""
    ref = max(abs(float(x)), float(scale))
    return short_float(x, 0.5 * float(np.spacing(np.float32(ref))) if ref else 0.0)


def gl_to_cv(c2w: np.ndarray) -> np.ndarray:
    """OpenGL/Blender camera-to-world → OpenCV/SRN (works on (..., 4, 4))."""
    return np.asarray(c2w, dtype=np.float64) @ CV_GL_FLIP


def cv_to_gl(c2w: np.ndarray) -> np.ndarray:
    """OpenCV/SRN camera-to-world → OpenGL/Blender (functa's flip of SRN poses)."""
    return np.asarray(c2w, dtype=np.float64) @ CV_GL_FLIP


def check_rigid(pose: np.ndarray, where: str) -> np.ndarray:
    """``pose`` as float64 (4, 4) if it is a rigid camera-to-world transform, else raise."""
    p = np.asarray(pose, dtype=np.float64)
    if p.shape != (4, 4):
        raise SceneDataError(f"{where}: a pose needs 16 numbers (4×4), got shape {p.shape}")
    if not np.isfinite(p).all():
        raise SceneDataError(f"{where}: the pose has non-finite entries")
    if np.abs(p[3] - [0, 0, 0, 1]).max() > RIGID_TOL:
        raise SceneDataError(f"{where}: not a rigid transform (last row {p[3].tolist()}, "
                             "expected [0, 0, 0, 1])")
    r = p[:3, :3]
    ortho = float(np.abs(r.T @ r - np.eye(3)).max())
    det = float(np.linalg.det(r))
    if ortho > RIGID_TOL or abs(det - 1) > RIGID_TOL:
        raise SceneDataError(f"{where}: not a rigid transform (rotation part has |RᵀR − I| = "
                             f"{ortho:.3g}, det {det:.4g}; scaled, sheared or mirrored poses "
                             "are refused)")
    return p


def pixel_rays(pose: np.ndarray, intr: Intrinsics, convention: str = "opencv"
               ) -> tuple[np.ndarray, np.ndarray]:
    """Origins and directions ``(H, W, 3)`` of the pixel-centre rays of one view.

    ``convention`` of ``pose``: "opencv" (SRN, mscn) or "opengl" (NeRF-synthetic,
    functa's ``get_rays``); both give the same rays for the same physical camera.
    Directions have unit camera-z component (``t`` = depth).
    """
    j, i = np.meshgrid(np.arange(intr.width) + 0.5, np.arange(intr.height) + 0.5,
                       indexing="xy")
    x, y = (j - intr.cx) / intr.fx, (i - intr.cy) / intr.fy
    if convention == "opencv":
        cam = np.stack([x, y, np.ones_like(x)], -1)
    elif convention == "opengl":
        cam = np.stack([x, -y, -np.ones_like(x)], -1)
    else:
        raise ValueError(f"unknown convention {convention!r}")
    pose = np.asarray(pose, dtype=np.float64)
    dirs = cam @ pose[:3, :3].T
    origins = np.broadcast_to(pose[:3, 3], dirs.shape).copy()
    return origins, dirs


def project(points: np.ndarray, pose: np.ndarray, intr: Intrinsics
            ) -> tuple[np.ndarray, np.ndarray]:
    """World points ``(N, 3)`` → image coordinates ``(N, 2)`` as (u = column, v = row),
    continuous (pixel ``(i, j)`` has its centre at ``(j + ½, i + ½)``), and depths ``(N,)``."""
    pose = np.asarray(pose, dtype=np.float64)
    cam = (np.asarray(points, dtype=np.float64) - pose[:3, 3]) @ pose[:3, :3]
    z = cam[:, 2]
    uv = np.stack([intr.fx * cam[:, 0] / z + intr.cx, intr.fy * cam[:, 1] / z + intr.cy], 1)
    return uv, z


def look_at(eye: Sequence[float], target: Sequence[float] = (0.0, 0.0, 0.0),
            up: Sequence[float] = (0.0, 1.0, 0.0)) -> np.ndarray:
    """OpenCV camera-to-world at ``eye`` looking at ``target``, image "up" towards ``up``."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:  # looking straight along up: any right vector will do
        x = np.cross(z, [1.0, 0.0, 0.0] if abs(z[0]) < 0.9 else [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, y, z, eye
    return pose


def orbit_poses(n: int, radius: float, elevation_deg: float,
                up: Sequence[float] = (0.0, 1.0, 0.0),
                target: Sequence[float] = (0.0, 0.0, 0.0),
                start: Sequence[float] | None = None) -> np.ndarray:
    """``n`` cameras on a circle of constant elevation around ``up`` through ``target``.

    ``start``: a direction whose azimuth the first camera takes (e.g. a context camera).
    """
    up = np.asarray(up, dtype=np.float64)
    up /= np.linalg.norm(up)
    ref = np.asarray(start if start is not None else [1.0, 0.0, 0.0], dtype=np.float64)
    a = ref - up * (ref @ up)
    if np.linalg.norm(a) < 1e-6:
        a = np.cross(up, [1.0, 0.0, 0.0] if abs(up[0]) < 0.9 else [0.0, 0.0, 1.0])
    a /= np.linalg.norm(a)
    b = np.cross(up, a)
    el = math.radians(elevation_deg)
    poses = []
    for k in range(n):
        az = 2 * math.pi * k / max(n, 1)
        d = math.cos(el) * (math.cos(az) * a + math.sin(az) * b) + math.sin(el) * up
        poses.append(look_at(np.asarray(target) + radius * d, target, up))
    return np.stack(poses) if poses else np.zeros((0, 4, 4))


# -- scenes -------------------------------------------------------------------------------
@dataclass
class Scene:
    """Posed views of one scene: ``images (V, H, W, 3)`` float32 in [0, 1], ``poses
    (V, 4, 4)`` camera-to-world (OpenCV), shared intrinsics, and each view's id (its
    file number in SRN, its frame index in transforms.json)."""

    name: str
    images: np.ndarray
    poses: np.ndarray
    intrinsics: Intrinsics
    view_ids: list[int]
    source: str = ""
    depths: np.ndarray | None = None  # (V, H, W) expected depth, for rendered views
    info: dict = field(default_factory=dict)  # mscn.json of a rendered scene
    orbit: Scene | None = None  # views rendered along an orbit (reconstructions)

    def __post_init__(self) -> None:
        v = len(self.view_ids)
        h, w = self.intrinsics.height, self.intrinsics.width
        if self.images.shape != (v, h, w, 3) or self.poses.shape != (v, 4, 4):
            raise ValueError(f"scene {self.name}: images {self.images.shape} and poses "
                             f"{self.poses.shape} disagree with {v} views of {h}×{w}")
        if len(set(self.view_ids)) != v:
            raise ValueError(f"scene {self.name}: duplicate view ids")

    def __len__(self) -> int:
        return len(self.view_ids)

    def index(self, view_id: int) -> int:
        return self.view_ids.index(view_id)

    def subset(self, view_ids: Sequence[int]) -> Scene:
        idx = [self.index(v) for v in view_ids]
        return replace(self, images=self.images[idx], poses=self.poses[idx],
                       view_ids=list(view_ids),
                       depths=None if self.depths is None else self.depths[idx], orbit=None)

    def resized(self, size: int) -> Scene:
        """Views resampled to ``size × size`` (box filter down, bicubic up), intrinsics
        scaled to match: the same cameras, fewer pixels."""
        h, w = self.intrinsics.height, self.intrinsics.width
        if (h, w) == (size, size):
            return self
        imgs = np.stack([_resample(im, size, 1.0) for im in self.images])
        depths = None
        if self.depths is not None:
            depths = np.stack([_resample(d[..., None], size, None)[..., 0]
                               for d in self.depths])
        orbit = self.orbit.resized(size) if self.orbit is not None else None
        return replace(self, images=imgs, intrinsics=self.intrinsics.resized(size, size),
                       depths=depths, orbit=orbit)


def _resample(im: np.ndarray, size: int, top: float | None) -> np.ndarray:
    out = []
    down = size < im.shape[0]
    for c in range(im.shape[2]):
        ch = Image.fromarray(im[..., c].astype(np.float32), mode="F")
        ch = ch.resize((size, size), Image.Resampling.BOX if down else Image.Resampling.BICUBIC)
        out.append(np.asarray(ch, dtype=np.float32))
    return np.clip(np.stack(out, -1), 0.0, top)


# -- reading images -------------------------------------------------------------------------
def _numbers(path: Path, text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split()]
    except ValueError:
        raise SceneDataError(f"{path}: expected numbers, got {text.strip()[:60]!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise SceneDataError(f"{path}: non-finite number")
    return vals


def _open_image(path: Path, rgba: str) -> np.ndarray:
    """An image as float32 RGB (H, W, 3). ``rgba``: "refuse" (SRN: RGB only; an opaque
    alpha channel is accepted) or "white" (transforms.json: composite on white)."""
    try:
        with Image.open(path) as im:
            if max(im.size) > MAX_SIDE:
                raise SceneDataError(f"{path}: {im.size[0]}×{im.size[1]} is larger than "
                                     f"{MAX_SIDE} pixels a side")
            im.load()
            mode = im.mode
            if mode in ("P", "PA"):
                im = im.convert("RGBA")
                mode = "RGBA"
            if mode == "I;16":
                arr = np.asarray(im, dtype=np.float32) / 65535.0
                arr = np.repeat(arr[..., None], 3, -1)
                mode = "RGB"
            elif mode in ("RGBA", "LA"):
                arr = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except SceneDataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise SceneDataError(f"{path}: not a readable image ({err})") from None
    if mode in ("RGBA", "LA"):
        alpha = arr[..., 3:4]
        if rgba == "refuse":
            if float(alpha.min()) < 1.0:
                raise SceneDataError(f"{path}: an RGBA image with transparent pixels; SRN "
                                     "views are RGB on a white background (composite it, or "
                                     "use transforms.json, whose RGBA views go on white)")
        else:
            arr = arr[..., :3] * alpha + (1.0 - alpha)
    return np.ascontiguousarray(arr[..., :3], dtype=np.float32)


def _stack_views(paths: Sequence[Path], rgba: str, square: bool) -> np.ndarray:
    imgs = []
    for p in paths:
        im = _open_image(p, rgba)
        if square and im.shape[0] != im.shape[1]:
            raise SceneDataError(f"{p}: {im.shape[1]}×{im.shape[0]} is not square; SRN views "
                                 "are square")
        if imgs and im.shape != imgs[0].shape:
            raise SceneDataError(f"{p}: {im.shape[1]}×{im.shape[0]}, but {paths[0].name} is "
                                 f"{imgs[0].shape[1]}×{imgs[0].shape[0]}; all views of a "
                                 "scene must have one size")
        imgs.append(im)
    return np.stack(imgs)


def _view_id(stem: str, path: Path) -> int:
    m = re.fullmatch(r"\D*?(\d+)", stem)
    if m is None:
        raise SceneDataError(f"{path}: a view file name needs a number (SRN: 000063.png)")
    return int(m.group(1))


# -- SRN -------------------------------------------------------------------------------------
def read_srn_intrinsics(path: Path) -> tuple[Intrinsics, bool]:
    """``f cx cy 0.`` first, ``H W`` last (SRN, pixelNeRF); SRN's optional trailing
    ``world2cam`` flag line is honoured. Returns the intrinsics and that flag."""
    if not path.is_file():
        raise SceneDataError(f"{path}: missing; an SRN scene needs intrinsics.txt (f cx cy 0. "
                             "on the first line, H W on the last)")
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        raise SceneDataError(f"{path}: needs at least two lines (f cx cy 0. … H W)")
    first = _numbers(path, lines[0])
    world2cam = False
    last = _numbers(path, lines[-1])
    if len(last) == 1 and len(lines) >= 3 and len(_numbers(path, lines[-2])) == 2:
        world2cam = bool(int(last[0]))
        last = _numbers(path, lines[-2])
    if len(first) not in (3, 4) or len(last) != 2:
        raise SceneDataError(f"{path}: expected 'f cx cy 0.' on the first line and 'H W' on "
                             f"the last, got {lines[0].strip()!r} … {lines[-1].strip()!r}")
    f, cx, cy = first[:3]
    h, w = last
    if f <= 0 or h < 1 or w < 1 or h != int(h) or w != int(w):
        raise SceneDataError(f"{path}: needs a positive focal length and integer H W, got "
                             f"f={f}, H W={h} {w}")
    return Intrinsics(f, f, cx, cy, int(h), int(w)), world2cam


def read_srn(path: str | os.PathLike, size: int | None = None) -> Scene:
    """An SRN scene folder: ``rgb/*.png``, ``pose/*.txt`` (4×4 camera-to-world, OpenCV),
    ``intrinsics.txt``. Views pair by file number; ``size`` resamples them square.

    Intrinsics for another image size than the files' are scaled to the files (SRN's own
    ``parse_intrinsics`` does so). A rendered reconstruction's ``depth/``, ``orbit/`` and
    ``mscn.json`` are read too.
    """
    root = Path(path)
    if root.is_file():
        root = root.parent
    intr, world2cam = read_srn_intrinsics(root / "intrinsics.txt")
    rgb_dir, pose_dir = root / "rgb", root / "pose"
    for d in (rgb_dir, pose_dir):
        if not d.is_dir():
            raise SceneDataError(f"{d}: missing; an SRN scene has rgb/ and pose/ folders")
    images = {_view_id(p.stem, p): p for p in sorted(rgb_dir.iterdir())
              if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")}
    poses = {_view_id(p.stem, p): p for p in sorted(pose_dir.iterdir())
             if p.suffix.lower() == ".txt" and not p.name.startswith(".")}
    if not images:
        raise SceneDataError(f"{rgb_dir}: no images")
    if set(images) != set(poses):
        only_img = sorted(set(images) - set(poses))
        only_pose = sorted(set(poses) - set(images))
        what = []
        if only_img:
            names = ", ".join(images[i].name for i in only_img[:5])
            what.append(f"images without a pose: {names}")
        if only_pose:
            names = ", ".join(poses[i].name for i in only_pose[:5])
            what.append(f"poses without an image: {names}")
        raise SceneDataError(f"{root}: {len(images)} images but {len(poses)} poses "
                             f"({'; '.join(what)})")
    ids = sorted(images)
    mats = []
    for i in ids:
        p = poses[i]
        vals = _numbers(p, p.read_text(errors="replace"))
        if len(vals) not in (12, 16):
            raise SceneDataError(f"{p}: a pose needs 16 numbers (4×4 camera-to-world), got "
                                 f"{len(vals)}")
        m = np.asarray(vals + ([0, 0, 0, 1] if len(vals) == 12 else []),
                       dtype=np.float64).reshape(4, 4)
        m = check_rigid(m, str(p))
        mats.append(np.linalg.inv(m) if world2cam else m)
    imgs = _stack_views([images[i] for i in ids], "refuse", square=True)
    h, w = imgs.shape[1:3]
    if (h, w) != (intr.height, intr.width):
        if abs(h / intr.height - w / intr.width) > 1e-6:
            raise SceneDataError(f"{root / 'intrinsics.txt'}: H W = {intr.height} "
                                 f"{intr.width}, but the views are {h}×{w} (another aspect "
                                 "ratio)")
        intr = intr.resized(h, w)
    scene = Scene(root.name, imgs, np.stack(mats), intr, ids, source=str(root))
    _read_extras(scene, root)
    return scene.resized(size) if size else scene


def _read_extras(scene: Scene, root: Path) -> None:
    """What mscn writes beside a rendered scene: mscn.json, depth/, orbit/."""
    info = root / "mscn.json"
    if info.is_file():
        try:
            scene.info = json.loads(info.read_text())
        except ValueError as err:
            raise SceneDataError(f"{info}: not JSON ({err})") from None
        if not isinstance(scene.info, dict):
            raise SceneDataError(f"{info}: expected a JSON object")
    unit = float(scene.info.get("depth_unit", 0) or 0)
    depth_dir = root / "depth"
    if unit > 0 and depth_dir.is_dir():
        d = []
        for i in scene.view_ids:
            p = depth_dir / f"{i:06d}.png"
            if not p.is_file():
                d = []
                break
            with Image.open(p) as im:
                d.append(np.asarray(im, dtype=np.float32) * unit)
        if d:
            scene.depths = np.stack(d)
    if (root / "orbit" / "intrinsics.txt").is_file():
        scene.orbit = read_srn(root / "orbit")


def write_srn(scene: Scene, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``scene`` as an SRN folder (atomically: built aside, then renamed in);
    depths (16-bit PNG), the orbit and ``scene.info`` go beside (mscn.json)."""
    return write_folder_atomic(path, lambda tmp: fill_srn(scene, tmp), overwrite)


def _png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def fill_srn(scene: Scene, root: Path) -> None:
    (root / "rgb").mkdir()
    (root / "pose").mkdir()
    k = scene.intrinsics
    if abs(k.fx - k.fy) > 1e-6 * k.fx:
        raise ValueError(f"scene {scene.name}: SRN intrinsics have one focal length; fx "
                         f"{k.fx} ≠ fy {k.fy} (write transforms.json instead)")
    save_bytes_atomic(f"{k.fx:.6f} {k.cx:.6f} {k.cy:.6f} 0.\n0. 0. 0.\n1.\n"
                      f"{k.height} {k.width}\n".encode(), root / "intrinsics.txt")
    info = dict(scene.info)
    if scene.depths is not None:
        finite = scene.depths[np.isfinite(scene.depths)]
        top = float(finite.max()) if finite.size else 1.0
        info["depth_unit"] = max(top, 1e-6) / 65000.0
        (root / "depth").mkdir()
    for v, vid in enumerate(scene.view_ids):
        rgb = np.round(np.clip(scene.images[v], 0, 1) * 255).astype(np.uint8)
        save_bytes_atomic(_png_bytes(rgb), root / "rgb" / f"{vid:06d}.png")
        save_bytes_atomic((" ".join(f"{x:.9g}" for x in scene.poses[v].reshape(-1))
                           + "\n").encode(), root / "pose" / f"{vid:06d}.txt")
        if scene.depths is not None:
            d = np.nan_to_num(scene.depths[v], nan=0.0, posinf=0.0) / info["depth_unit"]
            d16 = np.clip(np.round(d), 0, 65535).astype(np.uint16)
            save_bytes_atomic(_png_bytes(d16), root / "depth" / f"{vid:06d}.png")
    if info:
        save_bytes_atomic(json.dumps(info, indent=1).encode(), root / "mscn.json")
    if scene.orbit is not None:
        orbit_root = root / "orbit"
        orbit_root.mkdir()
        fill_srn(scene.orbit, orbit_root)


# -- transforms.json -------------------------------------------------------------------------
def read_transforms(path: str | os.PathLike, size: int | None = None) -> Scene:
    """nerfstudio / NeRF-synthetic ``transforms.json``: ``camera_angle_x`` (optionally
    ``camera_angle_y``) or ``fl_x``/``fl_y``/``cx``/``cy`` (+ ``w``/``h``), and
    ``frames[].transform_matrix`` (OpenGL camera-to-world) with ``file_path`` relative to
    the file (NeRF-synthetic omits ``.png``). View ids are frame indices."""
    path = Path(path)
    if path.is_dir():
        path = path / "transforms.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise SceneDataError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise SceneDataError(f"{path}: not JSON ({err})") from None
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list) or not frames:
        raise SceneDataError(f"{path}: no 'frames' list")
    for key in ("k1", "k2", "k3", "k4", "p1", "p2"):
        if float(meta.get(key, 0) or 0) != 0:
            raise SceneDataError(f"{path}: lens distortion ({key}) is not supported; "
                                 "undistort the images first")
    files, mats = [], []
    for n, fr in enumerate(frames):
        if not isinstance(fr, dict) or "file_path" not in fr or "transform_matrix" not in fr:
            raise SceneDataError(f"{path}: frame {n} needs file_path and transform_matrix")
        for key in ("fl_x", "fl_y", "cx", "cy", "w", "h"):
            if key in fr and fr[key] != meta.get(key):
                raise SceneDataError(f"{path}: frame {n} has its own {key}; per-frame "
                                     "intrinsics are not supported")
        f = (path.parent / str(fr["file_path"])).resolve()
        if not f.suffix and not f.exists():
            f = f.with_suffix(".png")
        if not f.is_file():
            raise SceneDataError(f"{path}: frame {n}: image {fr['file_path']} not found")
        try:
            m = np.asarray(fr["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            raise SceneDataError(f"{path}: frame {n}: transform_matrix is not numbers") from None
        if m.shape == (3, 4):
            m = np.vstack([m, [0, 0, 0, 1]])
        mats.append(gl_to_cv(check_rigid(m, f"{path}: frame {n} ({fr['file_path']})")))
        files.append(f)
    imgs = _stack_views(files, "white", square=False)
    h, w = imgs.shape[1:3]
    fw, fh = float(meta.get("w", w)), float(meta.get("h", h))
    if "fl_x" in meta:
        fx = float(meta["fl_x"])
        fy = float(meta.get("fl_y", fx))
    elif "camera_angle_x" in meta:
        fx = 0.5 * fw / math.tan(0.5 * float(meta["camera_angle_x"]))
        fy = (0.5 * fh / math.tan(0.5 * float(meta["camera_angle_y"]))
              if "camera_angle_y" in meta else fx)
    else:
        raise SceneDataError(f"{path}: no camera: needs camera_angle_x or fl_x")
    intr = Intrinsics(fx, fy, float(meta.get("cx", fw / 2)), float(meta.get("cy", fh / 2)),
                      int(round(fh)), int(round(fw)))
    if not (math.isfinite(fx) and math.isfinite(fy) and fx > 0 and fy > 0):
        raise SceneDataError(f"{path}: focal lengths must be positive, got {fx}, {fy}")
    if (h, w) != (intr.height, intr.width):
        intr = intr.resized(h, w)
    name = path.parent.name if path.stem == "transforms" else f"{path.parent.name}_{path.stem}"
    scene = Scene(name, imgs, np.stack(mats), intr, list(range(len(files))),
                  source=str(path))
    if size:
        if h != w:
            raise SceneDataError(f"{path}: views are {w}×{h}; resampling (size) needs square "
                                 "views")
        scene = scene.resized(size)
    return scene


def write_transforms(scene: Scene, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """A NeRF-synthetic-style folder: ``transforms.json`` (OpenGL poses, ``fl_x`` …) and
    ``images/*.png``."""
    def fill(root: Path) -> None:
        (root / "images").mkdir()
        k = scene.intrinsics
        frames = []
        for v, vid in enumerate(scene.view_ids):
            rgb = np.round(np.clip(scene.images[v], 0, 1) * 255).astype(np.uint8)
            save_bytes_atomic(_png_bytes(rgb), root / "images" / f"{vid:06d}.png")
            frames.append({"file_path": f"images/{vid:06d}.png",
                           "transform_matrix": cv_to_gl(scene.poses[v]).tolist()})
        meta = {"fl_x": k.fx, "fl_y": k.fy, "cx": k.cx, "cy": k.cy, "w": k.width,
                "h": k.height, "frames": frames}
        save_bytes_atomic(json.dumps(meta, indent=1).encode(), root / "transforms.json")

    return write_folder_atomic(path, fill, overwrite)


# -- finding scenes -------------------------------------------------------------------------
def _is_srn_dir(p: Path) -> bool:
    return (p / "intrinsics.txt").is_file() or ((p / "rgb").is_dir() and (p / "pose").is_dir())


def _is_transforms_dir(p: Path) -> bool:
    return (p / "transforms.json").is_file()


def is_scene_path(path: str | os.PathLike) -> bool:
    """A scene folder (SRN or transforms.json), its ``intrinsics.txt`` or
    ``transforms*.json``, or a folder whose sub-folders are scenes (SRN's cars_train/)."""
    p = Path(path)
    if p.is_file():
        return p.name == "intrinsics.txt" or (p.suffix == ".json"
                                              and p.stem.startswith("transforms"))
    if not p.is_dir():
        return False
    return _is_srn_dir(p) or _is_transforms_dir(p) or bool(scene_dirs(p, limit=1))


def scene_dirs(folder: Path, limit: int | None = None) -> list[Path]:
    """Sub-folders of ``folder`` that are scenes, sorted."""
    out = []
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return []
    for c in children:
        if c.is_dir() and not c.name.startswith(".") and (_is_srn_dir(c)
                                                           or _is_transforms_dir(c)):
            out.append(c)
            if limit and len(out) >= limit:
                break
    return out


def read_scenes(path: str | os.PathLike, size: int | None = None) -> list[Scene]:
    """Every scene at ``path`` (see :func:`is_scene_path`), each checked in full."""
    p = Path(path)
    if p.is_file():
        if p.name == "intrinsics.txt":
            return [read_srn(p.parent, size)]
        if p.suffix == ".json":
            return [read_transforms(p, size)]
        raise SceneDataError(f"{p}: not a scene file (intrinsics.txt or transforms.json)")
    if not p.is_dir():
        raise SceneDataError(f"{p}: no such scene")
    if _is_transforms_dir(p):
        return [read_transforms(p, size)]
    if _is_srn_dir(p):
        return [read_srn(p, size)]
    dirs = scene_dirs(p)
    if not dirs:
        alt = sorted(x.name for x in p.glob("transforms_*.json"))
        hint = (f" (it has {', '.join(alt)}: name the one to read)" if alt else "")
        raise SceneDataError(f"{p}: neither an SRN scene (intrinsics.txt, rgb/, pose/), a "
                             f"transforms.json scene nor a folder of scenes{hint}")
    return [s for d in dirs for s in read_scenes(d, size)]


def transforms_name(path: str | os.PathLike) -> str:
    """The scene name :func:`read_transforms` gives the file at ``path`` (a folder: its
    ``transforms.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "transforms.json"
    return path.parent.name if path.stem == "transforms" else f"{path.parent.name}_{path.stem}"


def scene_sources(path: str | os.PathLike) -> list[tuple[str, str, Path]]:
    """``(kind, name, where)`` of every scene :func:`read_scenes` reads at ``path``, in its
    order, without reading a view (lazy listing): kind ``"srn"`` (``where``: the folder,
    for :func:`read_srn`) or ``"transforms"`` (the JSON file, for :func:`read_transforms`).
    The same rules and errors as :func:`read_scenes` for what is not a scene."""
    p = Path(path)
    if p.is_file():
        if p.name == "intrinsics.txt":
            return [("srn", p.parent.name, p.parent)]
        if p.suffix == ".json":
            return [("transforms", transforms_name(p), p)]
        raise SceneDataError(f"{p}: not a scene file (intrinsics.txt or transforms.json)")
    if not p.is_dir():
        raise SceneDataError(f"{p}: no such scene")
    if _is_transforms_dir(p):
        return [("transforms", transforms_name(p), p / "transforms.json")]
    if _is_srn_dir(p):
        return [("srn", p.name, p)]
    dirs = scene_dirs(p)
    if not dirs:
        read_scenes(p)  # raises read_scenes' own message (nothing is decoded on this path)
    return [s for d in dirs for s in scene_sources(d)]
