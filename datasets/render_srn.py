"""Render SRN-format scenes from real meshes: ``python datasets/render_srn.py MESH… -o DIR``.

SRN Cars cannot be downloaded here, so the NeRF modality is built and tested on scenes
rendered by this script from real meshes (the shared truck, jeep and CGAL meshes, or any
mesh a user gives). **These are renders of real meshes, not SRN Cars.** The rig copies
SRN Cars so that functa's settings apply unchanged:

* the object is centred (bounding-box centre at the origin) and scaled so that its
  bounding sphere has radius 0.5 (``--radius``); cameras sit at distance 1.3
  (``--distance``) looking at the origin, so functa's near 0.8 / far 1.8 enclose it;
* 128×128 views (``--size``) with SRN Cars' focal length, 131.25 px at 128 px (scaled
  with the size), principal point at the centre, white background;
* ``--split train``: 50 views drawn area-uniformly on the upper hemisphere (+y up, 5°
  to 80° elevation); ``--split test``: 251 views on an Archimedean spiral over the upper
  hemisphere (elevation 5° → 75° in 4 turns), numbered 0…250 as SRN's test views, so
  functa's protocol (context 63 or 63 + 127, novel 23, 55, 82, 119) applies.

Shading: Lambert under two directional lights fixed in the world plus ambient light, so
a point looks the same from every camera (the radiance field has no view input, as in
functa). Smooth normals except across creases (> 35°), two-sided (open meshes), 2×2
supersampling (``--ss``). Colour (``--colour auto``): the mesh's own texture (bilinear at
the hit's UV), vertex, face or material colours when they vary; otherwise
("procedural") a seeded two-tone palette along the height, so scenes differ in colour
like SRN's cars. Ray casting: trimesh with Embree (embreex).

Output: ``DIR/<scene>/rgb/000000.png``, ``pose/000000.txt`` (4×4 camera-to-world, OpenCV
as SRN), ``intrinsics.txt``, and ``mscn.json`` recording the source mesh (sha256) and
every setting; ``--format transforms`` writes a NeRF-synthetic-style transforms.json
folder instead.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

try:
    from mscn_datasets import scenes
except ImportError:  # run as a script from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mscn_datasets import scenes  # type: ignore[no-redef]

SRN_FOCAL_128 = 131.25  # SRN Cars' focal length at 128×128
DISTANCE = 1.3
RADIUS = 0.5
UP = np.array([0.0, 1.0, 0.0])
#: (direction towards the light, intensity); fixed in the world: view-independent radiance
LIGHTS = ((np.array([0.4, 1.0, 0.6]) / np.linalg.norm([0.4, 1.0, 0.6]), 0.75),
          (np.array([-0.7, 0.2, -0.5]) / np.linalg.norm([-0.7, 0.2, -0.5]), 0.30))
AMBIENT = 0.25
CREASE_DEG = 35.0


class RenderError(ValueError):
    """A mesh that cannot be rendered (the message names the file)."""


@dataclass
class ColouredMesh:
    """One triangle mesh with an albedo per surface point.

    ``corner_rgb (F, 3, 3)``: colours at each face's corners (vertex/face/material/
    procedural colours); faces with a texture have ``face_texture >= 0`` and ``corner_uv``.
    """

    mesh: trimesh.Trimesh
    corner_rgb: np.ndarray
    face_texture: np.ndarray
    corner_uv: np.ndarray
    textures: list[np.ndarray]
    colour_source: str


def _part_colours(g: trimesh.Trimesh) -> tuple[np.ndarray | None, np.ndarray | None,
                                               np.ndarray | None, str]:
    """(corner colours, corner uv, texture image, source) of one geometry."""
    f = np.asarray(g.faces)
    vis = g.visual
    kind = getattr(vis, "kind", None)
    if kind == "texture":
        mat = getattr(vis, "material", None)
        img = getattr(mat, "image", None) or getattr(mat, "baseColorTexture", None)
        uv = getattr(vis, "uv", None)
        if img is not None and uv is not None and len(uv) == len(g.vertices):
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            return None, np.asarray(uv, dtype=np.float64)[f], arr, "texture"
        main = getattr(mat, "main_color", None)
        if main is not None:
            c = np.asarray(main[:3], dtype=np.float32) / 255.0
            return np.broadcast_to(c, (len(f), 3, 3)).copy(), None, None, "material"
        return None, None, None, "none"
    if kind == "vertex":
        c = np.asarray(vis.vertex_colors[:, :3], dtype=np.float32) / 255.0
        return c[f], None, None, "vertex"
    if kind == "face":
        c = np.asarray(vis.face_colors[:, :3], dtype=np.float32) / 255.0
        return np.repeat(c[:, None], 3, 1), None, None, "face"
    return None, None, None, "none"


def load_coloured(path: str | Path) -> ColouredMesh:
    """A mesh file (OBJ+MTL, GLB, PLY, OFF…) as one mesh with its colours, if any."""
    path = Path(path)
    try:
        loaded = trimesh.load(str(path))
    except Exception as err:  # noqa: BLE001 - trimesh raises many kinds for bad files
        raise RenderError(f"{path}: cannot read as a mesh ({err})") from None
    parts = (list(loaded.dump()) if isinstance(loaded, trimesh.Scene) else [loaded])
    parts = [g for g in parts if isinstance(g, trimesh.Trimesh) and len(g.faces)]
    if not parts:
        raise RenderError(f"{path}: no triangle faces")
    meshes, rgbs, uvs, tex_ids, textures, sources = [], [], [], [], [], set()
    for g in parts:
        rgb, uv, img, src = _part_colours(g)
        nf = len(g.faces)
        sources.add(src)
        meshes.append(trimesh.Trimesh(np.asarray(g.vertices), np.asarray(g.faces),
                                      process=False))
        rgbs.append(rgb if rgb is not None else np.full((nf, 3, 3), np.nan, np.float32))
        uvs.append(uv if uv is not None else np.zeros((nf, 3, 2)))
        if img is not None:
            textures.append(img)
            tex_ids.append(np.full(nf, len(textures) - 1))
        else:
            tex_ids.append(np.full(nf, -1))
    mesh = trimesh.util.concatenate(meshes)
    if not np.isfinite(mesh.vertices).all():
        raise RenderError(f"{path}: NaN or infinite vertices")
    if float(np.ptp(mesh.vertices, axis=0).max()) <= 0:
        raise RenderError(f"{path}: zero extent")
    corner_rgb = np.concatenate(rgbs).astype(np.float32)
    face_tex = np.concatenate(tex_ids)
    # colours that do not vary carry no information: treat them as none (auto colour)
    known = corner_rgb[~np.isnan(corner_rgb).any(axis=(1, 2))]
    varies = bool(textures) or (len(known) and float(np.ptp(known.reshape(-1, 3), 0).max())
                                > 0.02)
    source = "+".join(sorted(sources - {"none"})) if varies else "none"
    return ColouredMesh(mesh, corner_rgb, face_tex, np.concatenate(uvs), textures, source)


def procedural_corner_colours(mesh: trimesh.Trimesh, seed: int) -> np.ndarray:
    """A seeded two-tone palette blended along the height (+y): per-corner colours."""
    rng = np.random.default_rng(seed)
    h1 = rng.uniform()
    h2 = (h1 + rng.uniform(0.15, 0.5)) % 1.0
    c1 = np.array(colorsys.hsv_to_rgb(h1, rng.uniform(0.45, 0.85), rng.uniform(0.55, 0.95)))
    c2 = np.array(colorsys.hsv_to_rgb(h2, rng.uniform(0.45, 0.85), rng.uniform(0.55, 0.95)))
    y = mesh.vertices[:, 1]
    t = (y - y.min()) / max(float(np.ptp(y)), 1e-9)
    t = np.clip((t - 0.3) / 0.4, 0, 1)
    t = t * t * (3 - 2 * t)
    vc = (1 - t)[:, None] * c1 + t[:, None] * c2
    return vc[mesh.faces].astype(np.float32)


def random_rotation(rng: np.random.Generator, mode: str) -> np.ndarray:
    if mode == "none":
        return np.eye(3)
    if mode == "yaw":
        a = rng.uniform(0, 2 * math.pi)
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    return trimesh.transformations.quaternion_matrix(q)[:3, :3]


def normalise(cm: ColouredMesh, rotation: np.ndarray, radius: float) -> ColouredMesh:
    """Rotate, centre the bounding box at the origin, scale the bounding sphere to
    ``radius``."""
    v = np.asarray(cm.mesh.vertices, dtype=np.float64) @ rotation.T
    v -= (v.min(0) + v.max(0)) / 2
    v *= radius / float(np.linalg.norm(v, axis=1).max())
    mesh = trimesh.Trimesh(v, np.asarray(cm.mesh.faces), process=False)
    return ColouredMesh(mesh, cm.corner_rgb, cm.face_texture, cm.corner_uv, cm.textures,
                        cm.colour_source)


def _bilinear(img: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Texture lookup with wrap-around; uv (N, 2) with v up (OBJ/glTF after trimesh)."""
    h, w = img.shape[:2]
    x = (uv[:, 0] % 1.0) * w - 0.5
    y = (1.0 - uv[:, 1] % 1.0) * h - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, x1, y0, y1 = x0 % w, (x0 + 1) % w, y0 % h, (y0 + 1) % h
    return ((img[y0, x0] * (1 - fx) + img[y0, x1] * fx) * (1 - fy)
            + (img[y1, x0] * (1 - fx) + img[y1, x1] * fx) * fy)


class Renderer:
    """Ray-cast views of one coloured mesh (Embree via trimesh)."""

    def __init__(self, cm: ColouredMesh):
        self.cm = cm
        self.mesh = cm.mesh
        self.face_normals = np.asarray(self.mesh.face_normals)
        self.vertex_normals = np.asarray(self.mesh.vertex_normals)
        try:
            from trimesh.ray.ray_pyembree import RayMeshIntersector

            self.ray = RayMeshIntersector(self.mesh)
        except ImportError:  # pragma: no cover - embreex missing: slower, same pictures
            self.ray = self.mesh.ray

    def render(self, pose: np.ndarray, intr: scenes.Intrinsics, ss: int = 2
               ) -> tuple[np.ndarray, np.ndarray]:
        """RGB ``(H, W, 3)`` on white and depth ``(H, W)`` (camera z, inf = background)."""
        h, w = intr.height, intr.width
        fine = scenes.Intrinsics(intr.fx * ss, intr.fy * ss, intr.cx * ss, intr.cy * ss,
                                 h * ss, w * ss)
        o, d = scenes.pixel_rays(pose, fine)
        o, d = o.reshape(-1, 3), d.reshape(-1, 3)
        tri, ray, loc = self.ray.intersects_id(o, d, multiple_hits=False,
                                               return_locations=True)
        rgb = np.ones((len(o), 3))
        depth = np.full(len(o), np.inf)
        if len(tri):
            rgb[ray] = self._shade(tri, loc, d[ray])
            depth[ray] = np.einsum("ij,j->i", loc - pose[:3, 3], pose[:3, 2])
        rgb = rgb.reshape(h, ss, w, ss, 3).mean(axis=(1, 3))
        dep = depth.reshape(h, ss, w, ss)
        hit = np.isfinite(dep)
        with np.errstate(invalid="ignore"):
            dmean = np.where(hit, dep, 0).sum(axis=(1, 3)) / hit.sum(axis=(1, 3))
        dmean[hit.sum(axis=(1, 3)) == 0] = np.inf
        return rgb.astype(np.float32), dmean.astype(np.float32)

    def _shade(self, tri: np.ndarray, loc: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        bary = trimesh.triangles.points_to_barycentric(self.mesh.triangles[tri], loc)
        bary = np.clip(bary, 0, 1)
        bary /= bary.sum(1, keepdims=True)
        fn = self.face_normals[tri]
        vn = np.einsum("ij,ijk->ik", bary, self.vertex_normals[self.mesh.faces[tri]])
        vn /= np.linalg.norm(vn, axis=1, keepdims=True).clip(1e-12)
        crease = np.einsum("ij,ij->i", vn, fn) < math.cos(math.radians(CREASE_DEG))
        n = np.where(crease[:, None], fn, vn)
        n = np.where((np.einsum("ij,ij->i", n, dirs) > 0)[:, None], -n, n)  # two-sided
        shade = np.full(len(tri), AMBIENT)
        for ldir, intensity in LIGHTS:
            shade += intensity * np.clip(n @ ldir, 0, None)
        albedo = np.einsum("ij,ijk->ik", bary, self.cm.corner_rgb[tri])
        tex = self.cm.face_texture[tri]
        for t in np.unique(tex[tex >= 0]):
            sel = tex == t
            uv = np.einsum("ij,ijk->ik", bary[sel], self.cm.corner_uv[tri[sel]])
            albedo[sel] = _bilinear(self.cm.textures[t], uv)
        albedo = np.nan_to_num(albedo, nan=0.7)
        return np.clip(albedo * shade[:, None], 0, 1)


# -- camera rigs -----------------------------------------------------------------------------
def srn_intrinsics(size: int) -> scenes.Intrinsics:
    f = SRN_FOCAL_128 * size / 128
    return scenes.Intrinsics(f, f, size / 2, size / 2, size, size)


def hemisphere_poses(n: int, distance: float, rng: np.random.Generator) -> np.ndarray:
    """Training cameras, area-uniform on the upper hemisphere between 5° and 80°."""
    lo, hi = math.sin(math.radians(5)), math.sin(math.radians(80))
    y = rng.uniform(lo, hi, n)
    az = rng.uniform(0, 2 * math.pi, n)
    r = np.sqrt(1 - y**2)
    eyes = distance * np.stack([r * np.cos(az), y, r * np.sin(az)], 1)
    return np.stack([scenes.look_at(e, (0, 0, 0), UP) for e in eyes])


def spiral_poses(n: int, distance: float, turns: float = 4.0, el_lo: float = 5.0,
                 el_hi: float = 75.0) -> np.ndarray:
    """Test cameras on an Archimedean spiral over the upper hemisphere (SRN's test rig)."""
    out = []
    for k in range(n):
        t = k / max(n - 1, 1)
        el = math.radians(el_lo + (el_hi - el_lo) * t)
        az = 2 * math.pi * turns * t
        eye = distance * np.array([math.cos(el) * math.cos(az), math.sin(el),
                                   math.cos(el) * math.sin(az)])
        out.append(scenes.look_at(eye, (0, 0, 0), UP))
    return np.stack(out)


@dataclass
class RenderSettings:
    split: str = "train"  # train: random upper-hemisphere views; test: a spiral
    size: int = 128
    views: int | None = None  # None: 50 (train) or 251 (test)
    keep: list[int] | None = None  # keep only these view ids (smaller vendored copies)
    rotate: str = "none"  # none, yaw or random (seeded per scene)
    colour: str = "auto"  # auto, mesh or procedural
    seed: int = 0
    ss: int = 2
    distance: float = DISTANCE
    radius: float = RADIUS
    depth: bool = False  # also write the true depth maps


def render_scene(mesh_path: str | Path, settings: RenderSettings, variant: int = 0,
                 name: str | None = None) -> scenes.Scene:
    """One scene of ``mesh_path``; ``variant`` reseeds rotation, palette and views."""
    mesh_path = Path(mesh_path)
    cm = load_coloured(mesh_path)
    s = settings
    key = [s.seed, zlib.crc32(mesh_path.stem.encode()), variant]
    rng = np.random.default_rng(key)
    cm = normalise(cm, random_rotation(rng, s.rotate), s.radius)
    use_mesh = s.colour == "mesh" or (s.colour == "auto" and cm.colour_source != "none")
    if s.colour == "mesh" and cm.colour_source == "none":
        raise RenderError(f"{mesh_path}: has no colours of its own (use --colour auto)")
    if not use_mesh:
        cm.corner_rgb = procedural_corner_colours(cm.mesh, int(rng.integers(2**31)))
        cm.face_texture = np.full(len(cm.mesh.faces), -1)
    intr = srn_intrinsics(s.size)
    n = s.views or (50 if s.split == "train" else 251)
    poses = (hemisphere_poses(n, s.distance, rng) if s.split == "train"
             else spiral_poses(n, s.distance))
    ids = list(range(n)) if s.keep is None else [i for i in s.keep if 0 <= i < n]
    renderer = Renderer(cm)
    imgs, deps = zip(*(renderer.render(poses[i], intr, s.ss) for i in ids), strict=True)
    digest = hashlib.sha256(mesh_path.read_bytes()).hexdigest()
    info = {"rendered_by": "mscn datasets/render_srn.py",
            "note": "a render of a real mesh, not SRN Cars",
            "source_mesh": mesh_path.name, "source_sha256": digest,
            "colour": "mesh (" + cm.colour_source + ")" if use_mesh else "procedural",
            "split": s.split, "size": s.size, "views": n, "kept_views": len(ids),
            "rotate": s.rotate, "seed": s.seed, "variant": variant, "supersampling": s.ss,
            "distance": s.distance, "radius": s.radius, "focal_at_128": SRN_FOCAL_128,
            "up": "+y"}
    scene_name = name or (mesh_path.stem if variant == 0 else f"{mesh_path.stem}_{variant:02d}")
    return scenes.Scene(scene_name, np.stack(imgs), poses[ids], intr, ids,
                        source=str(mesh_path), depths=np.stack(deps) if s.depth else None,
                        info=info)


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("meshes", nargs="+", help="mesh files (OBJ+MTL, GLB, PLY, OFF, STL…)")
    p.add_argument("-o", "--output", required=True, help="folder of scenes (created)")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--size", type=int, default=128, help="views are SIZE×SIZE (default 128)")
    p.add_argument("--views", type=int, default=None, help="default 50 (train), 251 (test)")
    p.add_argument("--keep", type=int, nargs="+", default=None,
                   help="write only these view ids (the others are not rendered)")
    p.add_argument("--variants", type=int, default=1,
                   help="scenes per mesh (another rotation, palette and views each)")
    p.add_argument("--rotate", choices=("none", "yaw", "random"), default="none")
    p.add_argument("--colour", choices=("auto", "mesh", "procedural"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ss", type=int, default=2, help="supersampling per axis (default 2)")
    p.add_argument("--depth", action="store_true", help="also write true depth maps")
    p.add_argument("--format", choices=("srn", "transforms"), default="srn")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = RenderSettings(a.split, a.size, a.views, a.keep, a.rotate, a.colour, a.seed,
                              a.ss, depth=a.depth)
    jobs = [(m, k) for m in a.meshes for k in range(a.variants)]
    try:
        for mesh, k in tqdm(jobs, desc=f"render {a.split} scenes", unit="scene"):
            scene = render_scene(mesh, settings, k)
            write = scenes.write_srn if a.format == "srn" else scenes.write_transforms
            write(scene, out / scene.name, overwrite=a.overwrite)
    except (ValueError, OSError) as err:
        print(f"render_srn: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
