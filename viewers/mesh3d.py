"""3-D viewers for shapes: truth vs. reconstruction pictures, voxel diffs, turntables, GLB.

Why a child process: open3d's offscreen renderer (Filament on Vulkan/EGL) can *abort the
whole process* on machines without a working GPU stack, which no ``try`` can catch. So
every open3d render runs in ``python -m mscn_viewers.mesh3d --render-spec spec.json``: the
parent writes the meshes (PLY with vertex colours) and a JSON spec to a temporary folder,
the child renders all panels/frames of one call in a single process (open3d startup is the
slow part) and saves raw images there; the parent composes captions, colour bar and stats
with matplotlib and writes the file. If the child fails (signal, non-zero exit, missing
output, no new panel for :data:`CHILD_TIMEOUT_S`) the same panels are drawn by a small
software renderer (depth-sorted polygons with Lambert shading in matplotlib) and ONE
:class:`RendererFallbackWarning` says why. ``MSCN_RENDERER=open3d|matplotlib`` forces a
backend (``open3d`` then raises instead of falling back). On Mesa llvmpipe the child pads
every mesh with unused vertices: without that, frames of small meshes took 5-90 s (see
:func:`_padded_o3d_mesh`).

Conventions: +Y is up (the Stanford/CGAL meshes are Y-up); the camera looks from the
front-right-above (:data:`VIEW_DIR`) at the truth's bounding-box centre, and both panels
of a comparison share one camera, so they are drawn at the same scale. Every output goes
through :func:`mscn_core.atomic.write_atomic`; with ``overwrite=False`` an existing path
raises :class:`FileExistsError` before any rendering work.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from mscn_core.atomic import write_atomic

__all__ = [
    "CHILD_TIMEOUT_S",
    "DEFAULT_UNITS",
    "RendererFallbackWarning",
    "VIEW_DIR",
    "error_colors",
    "export_glb",
    "format_stats",
    "render_comparison",
    "render_voxel_comparison",
    "renderer_available",
    "show_interactive",
    "turntable_gif",
    "voxel_surface_mesh",
]

PathLike = str | os.PathLike[str]

#: Direction from the look-at point towards the camera: front-right-above for Y-up shapes.
VIEW_DIR = np.array([1.0, 0.6, 1.6]) / np.linalg.norm([1.0, 0.6, 1.6])
UP = np.array([0.0, 1.0, 0.0])
FOV_DEG = 30.0  # vertical field of view; small enough to look natural, large enough to frame
#: Direction the light travels (from above, front-right), shared by both backends.
LIGHT_DIR = np.array([-0.4, -1.0, -0.6]) / np.linalg.norm([-0.4, -1.0, -0.6])
#: Seconds the open3d child may go without finishing a panel/frame before we fall back.
CHILD_TIMEOUT_S = 180.0
#: Unused vertices appended to every open3d mesh (see :func:`_padded_o3d_mesh`).
PAD_VERTICES = 20_000
#: The software renderer decimates meshes above this many faces (matplotlib is slow).
MAX_SOFT_FACES = 20_000
DEFAULT_UNITS = "fraction of the longest side"

TRUTH_RGB = (0.72, 0.72, 0.72)
CORRECT_RGB = TRUTH_RGB
FALSE_POS_RGB = (0.86, 0.12, 0.10)
FALSE_NEG_RGB = (0.13, 0.35, 0.92)
#: Error colour map: grey (= matches the truth) -> yellow -> orange -> red -> dark red.
ERROR_STOPS = ((0.0, "#bdbdbd"), (0.25, "#fee08b"), (0.5, "#fdae61"), (0.75, "#e8452c"),
               (1.0, "#8b0020"))

_BACKENDS = ("auto", "open3d", "matplotlib")
_DPI = 100


class RendererFallbackWarning(UserWarning):
    """The open3d offscreen renderer failed; the picture was drawn with matplotlib."""


# --------------------------------------------------------------------------- geometry + camera


@dataclass
class _Geom:
    """A triangle mesh with per-vertex RGBA uint8 colours (what both backends draw).

    ``quads``: triangles come in coplanar pairs (voxel faces), so the software renderer
    can draw them as quads and cull back faces (voxel surfaces are closed, outward).
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    quads: bool = False


@dataclass
class _Camera:
    eye: np.ndarray
    center: np.ndarray
    up: np.ndarray
    fov: float
    near: float
    far: float


@dataclass
class _Panel:
    items: list[tuple[int, np.ndarray]]  # (index into the geometry list, 4x4 transform)
    camera: _Camera


def _rgba_u8(colors: np.ndarray | Sequence[float], n: int) -> np.ndarray:
    """Colours as (n, 4) uint8; accepts one colour or (n, 3|4), floats in [0, 1] or uint8."""
    c = np.asarray(colors)
    if c.ndim == 1:
        c = np.broadcast_to(c, (n, c.shape[0]))
    if c.shape[0] != n or c.shape[1] not in (3, 4):
        raise ValueError(f"colours must have shape ({n}, 3|4), got {c.shape}")
    if np.issubdtype(c.dtype, np.floating):
        c = np.clip(np.round(c * 255.0), 0, 255)
    c = c.astype(np.uint8)
    if c.shape[1] == 3:
        c = np.concatenate([c, np.full((n, 1), 255, np.uint8)], axis=1)
    return np.ascontiguousarray(c)


def _geom_from_mesh(mesh: trimesh.Trimesh, colors) -> _Geom:
    v = np.asarray(mesh.vertices, dtype=np.float64)
    return _Geom(v, np.asarray(mesh.faces, dtype=np.int64), _rgba_u8(colors, len(v)))


def _basis(cam: _Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fwd = cam.center - cam.eye
    fwd = fwd / np.linalg.norm(fwd)
    right = np.cross(fwd, cam.up)
    right = right / np.linalg.norm(right)
    return right, np.cross(right, fwd), fwd


def _frame_camera(points: np.ndarray, center: np.ndarray, aspect: float,
                  view_dir: np.ndarray = VIEW_DIR, margin: float = 1.08) -> _Camera:
    """Perspective camera on ``center`` along ``view_dir``, just far enough that every point
    projects inside the image (with ``margin``): tight framing, same for all panels."""
    probe = _Camera(center + view_dir, center, UP, FOV_DEG, 0.0, 0.0)
    right, up, fwd = _basis(probe)
    rel = np.asarray(points, dtype=np.float64) - center
    x, y, z = rel @ right, rel @ up, rel @ fwd
    ty = np.tan(np.radians(FOV_DEG) / 2) / margin
    tx = ty * aspect
    dist = float(max(np.max(np.abs(x) / tx - z), np.max(np.abs(y) / ty - z), 1e-6))
    radius = float(np.sqrt((rel**2).sum(1).max())) if len(rel) else 1.0
    radius = max(radius, 1e-6)
    eye = center + view_dir * dist
    return _Camera(eye, center, UP.copy(), FOV_DEG, max(dist - 1.5 * radius, 1e-3 * dist),
                   dist + 1.5 * radius)


def _rotation_y(angle: float, center: np.ndarray) -> np.ndarray:
    """4x4 rotation about the up (Y) axis through ``center``."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    t = np.eye(4)
    t[:3, :3] = rot
    t[:3, 3] = center - rot @ center
    return t


def _apply(t: np.ndarray, v: np.ndarray) -> np.ndarray:
    return v @ t[:3, :3].T + t[:3, 3]


# --------------------------------------------------------------------------- error colours


def _error_cmap():
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("mscn_error", list(ERROR_STOPS))


def _nice_ceil(x: float) -> float:
    """Round up to a 1-1.5-2-2.5-3-4-5-6-8 x 10^k step: readable colour-bar ends."""
    if not np.isfinite(x) or x <= 0:
        return 1.0
    e = np.floor(np.log10(x))
    for m in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        if m * 10**e >= x * (1 - 1e-9):
            return float(m * 10**e)
    return float(10 ** (e + 1))


def _surface_distance(points: np.ndarray, truth: trimesh.Trimesh) -> np.ndarray:
    """Unsigned distance from each point to the truth surface.

    open3d's RaycastingScene (Embree, CPU only -- safe in-process, unlike its renderer) is
    ~30x faster than trimesh's exact closest-point query, which is the fallback.
    """
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        return np.zeros(0)
    try:
        import open3d as o3d

        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor(np.asarray(truth.vertices, np.float32)),
                            o3d.core.Tensor(np.asarray(truth.faces, np.uint32)))
        d = scene.compute_distance(o3d.core.Tensor(points.astype(np.float32))).numpy()
        return d.astype(np.float64)
    except Exception:  # no open3d: exact but slower
        _, d, _ = trimesh.proximity.closest_point(truth, points)
        return np.asarray(d, dtype=np.float64)


def error_colors(recon: trimesh.Trimesh, truth: trimesh.Trimesh,
                 error_max: float | None = None) -> tuple[np.ndarray, float]:
    """Per-vertex colours of ``recon`` by distance to the ``truth`` surface: ((V, 4) uint8, max).

    ``error_max`` (the distance shown as the darkest red) defaults to the 99th percentile
    of the distances, rounded up to a nice number and at least 1e-3 of the truth's longest
    side -- so a perfect reconstruction stays grey instead of amplifying float noise.
    Pass the same ``error_max`` to compare several reconstructions on one scale.
    """
    d = _surface_distance(recon.vertices, truth)
    if error_max is None:
        longest = float(np.max(np.ptp(truth.vertices, axis=0))) if len(truth.vertices) else 1.0
        p99 = float(np.percentile(d, 99)) if len(d) else 0.0
        error_max = _nice_ceil(max(p99, 1e-3 * longest))
    error_max = float(error_max)
    if not error_max > 0:
        raise ValueError(f"error_max must be > 0, got {error_max}")
    rgba = _error_cmap()(np.clip(d / error_max, 0.0, 1.0))
    return _rgba_u8(rgba, len(d)), error_max


# --------------------------------------------------------------------------- voxels


def _voxel_surface(occ: np.ndarray, labels: np.ndarray | None,
                   palette: np.ndarray) -> _Geom:
    """Exposed faces of the occupied voxels as quads (two triangles, own 4 vertices each).

    Own vertices per face keep normals flat (crisp cubes in open3d). Voxel [i,j,k] spans
    [i, i+1]/R x [j, j+1]/R x [k, k+1]/R, i.e. index order is (x, y, z).
    """
    occ = np.asarray(occ, dtype=bool)
    res = max(occ.shape)
    pad = np.pad(occ, 1)
    core = (slice(1, -1),) * 3
    tangents = {0: (1, 2), 1: (2, 0), 2: (0, 1)}  # u x v = +axis
    verts, cols = [], []
    for axis in range(3):
        e = np.eye(3, dtype=np.int64)
        u, v = e[tangents[axis][0]], e[tangents[axis][1]]
        for sign in (1, -1):
            shifted = np.roll(pad, -sign, axis=axis)[core]
            idx = np.argwhere(occ & ~shifted)
            if len(idx) == 0:
                continue
            base = idx + (e[axis] if sign > 0 else 0)
            if sign > 0:
                quad = np.stack([base, base + u, base + u + v, base + v], axis=1)
            else:
                quad = np.stack([base, base + v, base + u + v, base + u], axis=1)
            verts.append(quad.reshape(-1, 3))
            lab = labels[tuple(idx.T)] if labels is not None else np.zeros(len(idx), int)
            cols.append(np.repeat(palette[lab], 4, axis=0))
    if not verts:
        return _Geom(np.zeros((0, 3)), np.zeros((0, 3), np.int64), np.zeros((0, 4), np.uint8),
                     quads=True)
    vertices = np.concatenate(verts).astype(np.float64) / res
    nq = len(vertices) // 4
    q = np.arange(nq)[:, None] * 4
    faces = np.concatenate([q + [0, 1, 2], q + [0, 2, 3]], axis=1).reshape(-1, 3)
    return _Geom(vertices, faces, np.concatenate(cols), quads=True)


def voxel_surface_mesh(occ: np.ndarray, color=TRUTH_RGB) -> trimesh.Trimesh:
    """The cubes of a boolean (R, R, R) grid as a mesh of exposed faces (unit cube frame)."""
    g = _voxel_surface(occ, None, _rgba_u8(color, 1))
    return trimesh.Trimesh(g.vertices, g.faces, vertex_colors=g.colors, process=False)


# --------------------------------------------------------------------------- open3d child


def _child_command(spec_path: Path) -> list[str]:
    """Command that renders ``spec_path`` (a seam: tests replace it to simulate crashes)."""
    return [sys.executable, "-m", "mscn_viewers.mesh3d", "--render-spec", str(spec_path)]


_RENDERER_STATE: tuple[bool, str] | None = None  # (works, why not): one probe per process


def _write_ply(g: _Geom, path: Path) -> None:
    mesh = trimesh.Trimesh(g.vertices, g.faces, vertex_colors=g.colors, process=False)
    path.write_bytes(mesh.export(file_type="ply"))


def _describe_failure(rc: int | None, log: Path, timeout: float) -> str:
    if rc is None:
        return f"child made no progress for {timeout:.0f} s"
    if rc < 0:
        try:
            name = f" ({signal.Signals(-rc).name})"
        except ValueError:
            name = ""
        return f"child exited with signal {-rc}{name}"
    tail = ""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        tail = f": {lines[-1][:160]}" if lines else ""
    except OSError:
        pass
    return f"child exited with code {rc}{tail}"


def _wait_with_progress(proc: subprocess.Popen, tmpdir: Path, stall_s: float) -> int | None:
    """Wait for the child; ``None`` (after killing it) if no new panel appeared for
    ``stall_s`` seconds. A stall limit, not a total one: llvmpipe frames take 1-20 s each
    here (camera dependent), so a long turntable that keeps progressing is not a failure."""
    done, last = -1, time.monotonic()
    while True:
        try:
            return proc.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            pass
        n = sum(1 for _ in tmpdir.glob("panel*.npy"))
        now = time.monotonic()
        if n != done:
            done, last = n, now
        elif now - last > stall_s:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session only
            except OSError:
                proc.kill()
            proc.wait()
            return None


def _render_open3d(geoms: list[_Geom], panels: list[_Panel],
                   size: tuple[int, int]) -> tuple[list[np.ndarray] | None, str]:
    """Render ``panels`` in one child process; (images, "") or (None, why it failed)."""
    w, h = int(size[0]), int(size[1])
    with tempfile.TemporaryDirectory(prefix="mscn_render_") as tmp:
        tmpdir = Path(tmp)
        used = sorted({i for p in panels for i, _ in p.items})
        mesh_files = {}
        for i in used:
            mesh_files[i] = tmpdir / f"mesh{i}.ply"
            _write_ply(geoms[i], mesh_files[i])
        spec = {
            "width": w, "height": h, "light_dir": LIGHT_DIR.tolist(),
            "meshes": {str(i): str(p) for i, p in mesh_files.items()},
            "panels": [{
                "items": [[i, t.tolist()] for i, t in p.items],
                "eye": p.camera.eye.tolist(), "center": p.camera.center.tolist(),
                "up": p.camera.up.tolist(), "fov": p.camera.fov, "near": p.camera.near,
                "far": p.camera.far, "out": str(tmpdir / f"panel{k}.npy"),
            } for k, p in enumerate(panels)],
        }
        spec_path = tmpdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        log = tmpdir / "child.log"
        timeout = CHILD_TIMEOUT_S
        try:
            with open(log, "wb") as logf:
                proc = subprocess.Popen(_child_command(spec_path), stdout=logf,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=tmpdir, start_new_session=True)
                rc = _wait_with_progress(proc, tmpdir, timeout)
        except OSError as exc:
            return None, f"could not start the child: {exc}"
        if rc != 0:
            return None, _describe_failure(rc, log, timeout)
        images = []
        for k in range(len(panels)):
            out = tmpdir / f"panel{k}.npy"
            try:
                img = np.load(out)
            except (OSError, ValueError):
                return None, f"child wrote no image {out.name}"
            if img.shape[:2] != (h, w):
                return None, f"child image has shape {img.shape}, expected ({h}, {w}, 3)"
            images.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
        return images, ""


def _padded_o3d_mesh(o3d, path: str):
    """Read a PLY for open3d, with normals, plus unreferenced copies of vertex 0.

    Why the padding: on Mesa llvmpipe (lavapipe) with open3d 0.20, meshes of a few thousand
    vertices took 5-90 s per frame (the 6k-face vendored cow: 90 s) and larger ones 1-20 s
    depending on the camera; appending >= ~10k unused vertices made every measured case
    0.1-0.5 s per frame. Unreferenced vertices are never drawn, so the image is unchanged.
    """
    m = o3d.io.read_triangle_mesh(path)
    m.compute_vertex_normals()
    v = np.asarray(m.vertices)
    if len(v) == 0:
        return m
    pad = PAD_VERTICES + len(v) // 2
    out = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(np.concatenate([v, np.repeat(v[:1], pad, 0)])),
        o3d.utility.Vector3iVector(np.asarray(m.triangles)))
    n = np.asarray(m.vertex_normals)
    out.vertex_normals = o3d.utility.Vector3dVector(np.concatenate([n, np.repeat(n[:1], pad, 0)]))
    if m.has_vertex_colors():
        c = np.asarray(m.vertex_colors)
        out.vertex_colors = o3d.utility.Vector3dVector(
            np.concatenate([c, np.repeat(c[:1], pad, 0)]))
    return out


def _child_main(spec_path: str) -> int:
    """Entry point of the render child: all panels of one spec with one OffscreenRenderer."""
    import open3d as o3d
    import open3d.visualization.rendering as rendering

    spec = json.loads(Path(spec_path).read_text())
    w, h = int(spec["width"]), int(spec["height"])
    meshes = {key: _padded_o3d_mesh(o3d, path) for key, path in spec["meshes"].items()}
    meshes = {int(k): m for k, m in meshes.items()}
    ren = rendering.OffscreenRenderer(w, h)
    scene = ren.scene
    scene.set_background([1.0, 1.0, 1.0, 1.0])
    scene.view.set_post_processing(False)  # no tone mapping: true white, true colours
    scene.scene.set_sun_light(list(spec["light_dir"]), [1.0, 1.0, 1.0], 40000)
    scene.scene.enable_sun_light(True)
    scene.scene.set_indirect_light_intensity(25000)
    mat = rendering.MaterialRecord()
    mat.shader = "defaultLit"
    mat.base_color = [1.0, 1.0, 1.0, 1.0]
    # Every geometry is uploaded once and shown/hidden per panel: clear_geometry() followed
    # by a render hung Filament (llvmpipe Vulkan, open3d 0.20) in testing.
    needed: dict[int, int] = {}
    for panel in spec["panels"]:
        for i in {int(i) for i, _ in panel["items"]}:
            needed[i] = max(needed.get(i, 0), [int(j) for j, _ in panel["items"]].count(i))
    names = [f"m{i}_{k}" for i, n in needed.items() for k in range(n)]
    for i, n in needed.items():
        for k in range(n):
            scene.add_geometry(f"m{i}_{k}", meshes[i], mat)
    for panel in spec["panels"]:
        seen: dict[int, int] = {}
        visible = {}
        for i, t in panel["items"]:
            k = seen.get(int(i), 0)
            seen[int(i)] = k + 1
            visible[f"m{int(i)}_{k}"] = t
        for name in names:
            scene.show_geometry(name, name in visible)
        for name, t in visible.items():
            scene.set_geometry_transform(name, np.asarray(t, dtype=np.float64))
        cam = scene.camera
        cam.set_projection(float(panel["fov"]), w / h, float(panel["near"]), float(panel["far"]),
                           rendering.Camera.FovType.Vertical)
        cam.look_at(panel["center"], panel["eye"], panel["up"])
        img = np.asarray(ren.render_to_image())
        np.save(panel["out"], img)
    return 0


def renderer_available() -> tuple[bool, str]:
    """Whether open3d offscreen rendering works here, and why not (probed once, in a child)."""
    global _RENDERER_STATE
    if _RENDERER_STATE is None:
        tet = _Geom(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float),
                    np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]),
                    _rgba_u8(TRUTH_RGB, 4))
        cam = _frame_camera(tet.vertices, tet.vertices.mean(0), 1.0)
        images, why = _render_open3d([tet], [_Panel([(0, np.eye(4))], cam)], (32, 32))
        if images is not None and float(images[0].std()) == 0.0:
            images, why = None, "child rendered a blank image"
        _RENDERER_STATE = (images is not None, why)
    return _RENDERER_STATE


# --------------------------------------------------------------------------- software renderer


def _cluster_decimate(g: _Geom, max_faces: int) -> _Geom:
    """Vertex-clustering decimation (numpy only): merge vertices per grid cell until the
    face count fits. Crude, but robust on any mesh, and keeps per-vertex colours."""
    if len(g.faces) <= max_faces:
        return g
    lo = g.vertices.min(0)
    longest = float(np.ptp(g.vertices, axis=0).max()) or 1.0
    n = int(np.sqrt(max_faces) * 1.5)
    while n >= 2:
        cell = np.floor((g.vertices - lo) / (longest / n)).astype(np.int64)
        _, inv, counts = np.unique(cell, axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        f = inv[g.faces]
        f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
        _, keep = np.unique(np.sort(f, axis=1), axis=0, return_index=True)
        f = f[np.sort(keep)]
        if len(f) <= max_faces:
            v = np.zeros((len(counts), 3))
            np.add.at(v, inv, g.vertices)
            c = np.zeros((len(counts), 4))
            np.add.at(c, inv, g.colors.astype(np.float64))
            return _Geom(v / counts[:, None], f, (c / counts[:, None]).round().astype(np.uint8))
        n = int(n * 0.85)
    return g


def _render_soft(geoms: list[_Geom], panels: list[_Panel],
                 size: tuple[int, int]) -> list[np.ndarray]:
    """Depth-sorted (painter's algorithm) polygons with Lambert shading via matplotlib Agg.

    Same camera model as the open3d child (vertical FOV perspective), so both backends frame
    the shape identically; two-sided lighting because reconstructions may be open surfaces.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    w, h = int(size[0]), int(size[1])
    small = {}
    for i, g in enumerate(geoms):
        small[i] = g if g.quads else _cluster_decimate(g, MAX_SOFT_FACES)
    images = []
    for panel in panels:
        cam = panel.camera
        right, up, fwd = _basis(cam)
        focal = (h / 2) / np.tan(np.radians(cam.fov) / 2)
        polys, colors, depths = [], [], []
        for i, t in panel.items:
            g = small[i]
            if len(g.faces) == 0:
                continue
            v = _apply(t, g.vertices)
            tri = v[g.faces]
            normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
            normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-20)
            fcol = g.colors[g.faces].astype(np.float64).mean(1)[:, :3] / 255.0
            faces = g.faces
            if g.quads:  # (a,b,c),(a,c,d) pairs -> quads (a,b,c,d); closed: cull back faces
                faces = np.concatenate([g.faces[0::2], g.faces[1::2, 2:]], axis=1)
                normals, fcol = normals[0::2], fcol[0::2]
            pts = v[faces]
            centers = pts.mean(1)
            to_eye = cam.eye - centers
            facing = (normals * to_eye).sum(1) > 0
            if g.quads:
                pts, centers, normals, fcol = (pts[facing], centers[facing], normals[facing],
                                               fcol[facing])
            else:
                normals = np.where(facing[:, None], normals, -normals)
            diffuse = np.clip(normals @ -LIGHT_DIR, 0.0, 1.0)
            shade = 0.45 + 0.6 * diffuse
            rel = pts - cam.eye
            z = np.maximum(rel @ fwd, 1e-9)
            xy = np.stack([w / 2 + focal * (rel @ right) / z, h / 2 - focal * (rel @ up) / z],
                          axis=-1)
            polys.extend(list(xy))
            colors.append(np.clip(fcol * shade[:, None], 0, 1))
            depths.append((centers - cam.eye) @ fwd)
        fig = Figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI, facecolor="white")
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
        if polys:
            order = np.argsort(-np.concatenate(depths), kind="stable")  # far first
            cols = np.concatenate(colors)[order]
            ax.add_collection(PolyCollection([polys[j] for j in order], facecolors=cols,
                                             edgecolors=cols, linewidths=0.3,
                                             antialiaseds=True))
        canvas.draw()
        images.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    return images


# --------------------------------------------------------------------------- backend dispatch


def _backend() -> str:
    b = os.environ.get("MSCN_RENDERER", "").strip().lower() or "auto"
    if b not in _BACKENDS:
        raise ValueError(f"MSCN_RENDERER must be one of open3d, matplotlib (or unset), got {b!r}")
    return b


def _render_panels(geoms: list[_Geom], panels: list[_Panel],
                   size: tuple[int, int]) -> list[np.ndarray]:
    """open3d in a child if possible, else the software renderer with one warning."""
    global _RENDERER_STATE
    backend = _backend()
    if backend == "matplotlib":
        return _render_soft(geoms, panels, size)
    if backend == "auto" and _RENDERER_STATE is not None and not _RENDERER_STATE[0]:
        why = _RENDERER_STATE[1]  # failed before in this process: don't pay the timeout again
    else:
        images, why = _render_open3d(geoms, panels, size)
        if images is not None:
            _RENDERER_STATE = (True, "")
            return images
        if backend == "open3d":
            raise RuntimeError(f"open3d offscreen renderer failed ({why}); "
                               "MSCN_RENDERER=open3d disables the matplotlib fallback")
        _RENDERER_STATE = (False, why)
    warnings.warn(f"open3d offscreen renderer unavailable ({why}): drew with matplotlib",
                  RendererFallbackWarning, stacklevel=3)
    return _render_soft(geoms, panels, size)


# --------------------------------------------------------------------------- composition


def _fmt_value(v) -> str:
    if isinstance(v, bool | str) or not np.isscalar(v):
        return str(v)
    f = float(v)
    if isinstance(v, int | np.integer) or (f.is_integer() and abs(f) >= 1000):
        return f"{int(f):,}"
    return f"{f:.4g}"


_STAT_LABELS = {
    "chamfer_l1": "Chamfer-L1", "chamfer": "Chamfer-L1", "chamfer_l2": "Chamfer-L2",
    "iou": "IoU", "fscore": "F-score", "f_score": "F-score", "normal_consistency": "normal cons.",
    "accuracy": "accuracy", "bits": "bits", "bytes": "bytes", "bpv": "bits/value",
}


def format_stats(stats: Mapping[str, object] | None) -> str:
    """``Chamfer-L1 0.0041 | IoU 0.953 | bits 12,345``: known snake_case keys get their
    usual names (``fscore`` -> ``F-score``), others are shown as given; 4 significant digits."""
    if not stats:
        return ""
    return "  |  ".join(f"{_STAT_LABELS.get(str(k).strip().lower(), k)} {_fmt_value(v)}"
                        for k, v in stats.items())


@dataclass
class _Layout:
    """Pixel layout of a two-panel figure: title band, captions, panels, a footer band."""

    size: tuple[int, int]
    title: bool
    top: int = 0
    caption: int = 26
    footer: int = 104

    def __post_init__(self) -> None:
        self.top = 40 if self.title else 6
        w, h = self.size
        if h - self.top - self.caption - self.footer < 64 or w < 128:
            raise ValueError(f"size {self.size} is too small for a comparison figure")

    @property
    def panel(self) -> tuple[int, int]:
        w, h = self.size
        return w // 2, h - self.top - self.caption - self.footer

    def rect(self, x: float, y_top: float, wpx: float, hpx: float) -> tuple[float, ...]:
        """Figure-fraction rectangle from pixel coordinates measured from the top-left."""
        w, h = self.size
        return (x / w, 1 - (y_top + hpx) / h, wpx / w, hpx / h)


def _compose(layout: _Layout, images: list[np.ndarray], captions: list[str],
             title: str | None, footer: Callable) -> object:
    """Figure with two image panels; ``footer(fig, layout)`` draws colour bar / legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, h = layout.size
    fig = Figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    if title:
        fig.text(0.5, 1 - 22 / h, title, ha="center", va="center", fontsize=14)
    pw, ph = layout.panel
    for k, (img, cap) in enumerate(zip(images, captions, strict=True)):
        ax = fig.add_axes(layout.rect(k * pw, layout.top + layout.caption, pw, ph))
        ax.imshow(img, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        fig.text((k * pw + pw / 2) / w, 1 - (layout.top + layout.caption / 2) / h, cap,
                 ha="center", va="center", fontsize=11)
    footer(fig, layout)
    return fig


def _check_target(path: PathLike, overwrite: bool) -> Path:
    """Refuse an existing output before any work; create the folder (as the globe viewer)."""
    p = Path(path)
    if not overwrite and os.path.lexists(p):
        raise FileExistsError(f"refusing to overwrite existing file: {p} "
                              "(pass --overwrite / overwrite=True)")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _save_fig(fig, path: Path, overwrite: bool) -> Path:
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=_DPI, facecolor="white"),
                            overwrite=overwrite)
    finally:
        fig.clear()


def _faces_text(truth_faces: int, recon_faces: int) -> str:
    return f"faces: truth {truth_faces:,}, reconstruction {recon_faces:,}"


# --------------------------------------------------------------------------- public API


def render_comparison(truth: trimesh.Trimesh, recon: trimesh.Trimesh, path: PathLike, *,
                      title: str | None = None, stats: Mapping[str, float] | None = None,
                      overwrite: bool = False, error_max: float | None = None,
                      size: tuple[int, int] = (1200, 600),
                      units: str = DEFAULT_UNITS) -> Path:
    """Truth (grey) beside the reconstruction coloured by distance to the truth surface.

    One camera framed on the truth for both panels, so scale differences are real. The
    colour bar is in the meshes' units (callers pass the unit frame: longest side = 1).
    Returns the written path (PNG unless the suffix names another matplotlib format).
    """
    path = _check_target(path, overwrite)
    if len(truth.faces) == 0:
        raise ValueError("truth mesh has no faces")
    colors, emax = error_colors(recon, truth, error_max)
    geoms = [_geom_from_mesh(truth, TRUTH_RGB), _geom_from_mesh(recon, colors)]
    layout = _Layout(tuple(size), bool(title))
    pw, ph = layout.panel
    bounds = np.asarray(truth.bounds, dtype=np.float64)
    cam = _frame_camera(truth.vertices, bounds.mean(0), pw / ph)
    panels = [_Panel([(0, np.eye(4))], cam),
              _Panel([(1, np.eye(4))] if len(recon.faces) else [], cam)]
    images = _render_panels(geoms, panels, (pw, ph))

    def footer(fig, lay: _Layout) -> None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.ticker import MaxNLocator

        w, h = lay.size
        y0 = lay.top + lay.caption + ph + 14
        cax = fig.add_axes(lay.rect(pw + 0.15 * pw, y0, 0.7 * pw, 14))
        sm = ScalarMappable(Normalize(0.0, emax), _error_cmap())
        cb = fig.colorbar(sm, cax=cax, orientation="horizontal", extend="max")
        cb.set_label(f"distance to truth ({units})", fontsize=10)
        cb.ax.tick_params(labelsize=9)
        cb.ax.xaxis.set_major_locator(MaxNLocator(6))
        legend = "grey, lit: ground-truth surface"
        fig.text(0.25, 1 - (y0 + 7) / h, legend, ha="center", va="center", fontsize=10,
                 color="#444444")
        line = "  |  ".join(s for s in (format_stats(stats),
                                         _faces_text(len(truth.faces), len(recon.faces))) if s)
        fig.text(0.5, 12 / h, line, ha="center", va="center", fontsize=10)

    fig = _compose(layout, images, ["truth", "reconstruction (colour = distance to truth)"],
                   title, footer)
    return _save_fig(fig, path, overwrite)


def render_voxel_comparison(truth_occ: np.ndarray, recon_occ: np.ndarray, path: PathLike, *,
                            title: str | None = None, stats: Mapping[str, float] | None = None,
                            overwrite: bool = False,
                            size: tuple[int, int] = (1200, 600)) -> Path:
    """Truth voxels beside the reconstruction: correct grey, false positives red, misses blue.

    Grids are bool (R, R, R) with [i, j, k] <-> (x, y, z), Y up. The right panel shows the
    union of both grids so missing voxels are visible (as blue cubes) where they are on the
    surface; both panels share one camera framed on that union (false positives stay in view).
    """
    path = _check_target(path, overwrite)
    t = np.asarray(truth_occ, dtype=bool)
    r = np.asarray(recon_occ, dtype=bool)
    if t.ndim != 3 or t.shape != r.shape:
        raise ValueError(f"need two equal (R, R, R) grids, got {t.shape} and {r.shape}")
    labels = np.zeros(t.shape, np.int64)
    labels[r & ~t] = 1
    labels[t & ~r] = 2
    palette = _rgba_u8(np.array([CORRECT_RGB, FALSE_POS_RGB, FALSE_NEG_RGB]), 3)
    left = _voxel_surface(t, None, palette)
    right = _voxel_surface(t | r, labels, palette)
    layout = _Layout(tuple(size), bool(title))
    pw, ph = layout.panel
    pts = right.vertices if len(right.vertices) else np.array([[0.0, 0, 0], [1.0, 1, 1]])
    center = (pts.min(0) + pts.max(0)) / 2
    cam = _frame_camera(pts, center, pw / ph)
    panels = [_Panel([(0, np.eye(4))] if len(left.faces) else [], cam),
              _Panel([(1, np.eye(4))] if len(right.faces) else [], cam)]
    images = _render_panels([left, right], panels, (pw, ph))
    n_tp, n_fp, n_fn = int((t & r).sum()), int((r & ~t).sum()), int((t & ~r).sum())

    def footer(fig, lay: _Layout) -> None:
        from matplotlib.patches import Patch

        w, h = lay.size
        handles = [Patch(facecolor=CORRECT_RGB, edgecolor="k", label=f"correct ({n_tp:,})"),
                   Patch(facecolor=FALSE_POS_RGB, edgecolor="k",
                         label=f"false positive / extra ({n_fp:,})"),
                   Patch(facecolor=FALSE_NEG_RGB, edgecolor="k",
                         label=f"false negative / missing ({n_fn:,})")]
        y0 = lay.top + lay.caption + ph + 8
        fig.legend(handles=handles, loc="upper center", ncol=3, frameon=False, fontsize=10,
                   bbox_to_anchor=(0.5, 1 - y0 / h), handlelength=1.2, columnspacing=1.5)
        res = "x".join(str(s) for s in t.shape)
        line = "  |  ".join(s for s in (format_stats(stats), f"grid {res}") if s)
        fig.text(0.5, 12 / h, line, ha="center", va="center", fontsize=10)

    captions = [f"truth ({int(t.sum()):,} voxels)", "reconstruction vs truth"]
    fig = _compose(layout, images, captions, title, footer)
    return _save_fig(fig, path, overwrite)


def turntable_gif(mesh: trimesh.Trimesh, path: PathLike, *, frames: int = 36,
                  size: tuple[int, int] = (480, 480), overwrite: bool = False,
                  colors: np.ndarray | None = None, fps: float = 12.0) -> Path:
    """Looping GIF of ``mesh`` turning once about the up (Y) axis under a fixed light.

    ``colors``: per-vertex (V, 3|4), floats in [0, 1] or uint8 (e.g. from
    :func:`error_colors`); default neutral grey. All frames render in one child process.
    """
    from PIL import Image

    path = _check_target(path, overwrite)
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if len(mesh.faces) == 0:
        raise ValueError("mesh has no faces")
    g = _geom_from_mesh(mesh, TRUTH_RGB if colors is None else colors)
    center = np.asarray(mesh.bounds, dtype=np.float64).mean(0)
    turns = [_rotation_y(2 * np.pi * k / frames, center) for k in range(frames)]
    every = max(1, len(g.vertices) * frames // 2_000_000)  # framing: subsample huge meshes
    pts = np.concatenate([_apply(t, g.vertices[::every]) for t in turns])
    w, h = int(size[0]), int(size[1])
    cam = _frame_camera(pts, center, w / h)
    images = _render_panels([g], [_Panel([(0, t)], cam) for t in turns], (w, h))
    pics = [Image.fromarray(im).quantize(colors=255, method=Image.Quantize.MEDIANCUT)
            for im in images]

    def write(tmp: str) -> None:
        pics[0].save(tmp, format="GIF", save_all=True, append_images=pics[1:], loop=0,
                     duration=int(round(1000 / fps)), disposal=2, optimize=False)

    return write_atomic(path, write, overwrite=overwrite)


def export_glb(mesh: trimesh.Trimesh, path: PathLike, *, vertex_colors: np.ndarray | None = None,
               overwrite: bool = False) -> Path:
    """Binary glTF of ``mesh`` (optionally with per-vertex colours) for any web viewer."""
    path = _check_target(path, overwrite)
    out = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=False)
    if vertex_colors is not None:
        out.visual = trimesh.visual.ColorVisuals(
            out, vertex_colors=_rgba_u8(vertex_colors, len(out.vertices)))
    data = out.export(file_type="glb")
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite)


def show_interactive(meshes: list[trimesh.Trimesh], *, side_by_side: bool = True) -> None:
    """Open an open3d window on ``meshes`` (laid out left to right unless ``side_by_side``
    is False); RuntimeError at once when there is no display, instead of a crash."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise RuntimeError("no display: DISPLAY/WAYLAND_DISPLAY unset; use render_comparison, "
                           "turntable_gif or export_glb instead")
    import open3d as o3d

    geoms, x = [], 0.0
    for m in meshes:
        o = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(np.asarray(m.vertices)),
                                      o3d.utility.Vector3iVector(np.asarray(m.faces)))
        vc = getattr(m.visual, "vertex_colors", None)
        if m.visual.kind == "vertex" and vc is not None and len(vc) == len(m.vertices):
            o.vertex_colors = o3d.utility.Vector3dVector(np.asarray(vc)[:, :3] / 255.0)
        else:
            o.paint_uniform_color(TRUTH_RGB)
        if side_by_side and len(m.vertices):
            lo, hi = np.asarray(m.bounds)
            o.translate((x - lo[0], 0.0, 0.0))
            x += (hi[0] - lo[0]) * 1.1
        o.compute_vertex_normals()
        geoms.append(o)
    o3d.visualization.draw_geometries(geoms, window_name="mscn")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mscn open3d render child (internal)")
    parser.add_argument("--render-spec", required=True, help="JSON spec written by the parent")
    args = parser.parse_args(argv)
    rc = _child_main(args.render_spec)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter/Filament teardown: the images are saved, and a crash or hang while
    # destroying the GPU context would otherwise turn a good render into a "failure".
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(_main())
