"""Posed-view readers and ray geometry (datasets/scenes.py, datasets/render_srn.py).

The scenes are **renders of real meshes made by datasets/render_srn.py, not SRN Cars**
(SRN Cars cannot be downloaded here); they are written and read in the real SRN format.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from mscn_datasets import render_srn, scenes
from mscn_datasets.scenes import Intrinsics, SceneDataError

VENDORED = Path(scenes.__file__).resolve().parent / "data" / "scenes"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _pose(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    eye = rng.normal(size=3)
    eye *= 1.3 / np.linalg.norm(eye)
    return scenes.look_at(eye, rng.normal(size=3) * 0.1, (0, 1, 0))


# -- geometry -----------------------------------------------------------------------------

def test_a_point_on_a_pixel_ray_projects_back_to_that_pixel_centre():
    intr = Intrinsics(70.0, 72.0, 31.0, 33.5, 64, 60)
    pose = _pose(0)
    o, d = scenes.pixel_rays(pose, intr)
    rng = np.random.default_rng(1)
    i, j = rng.integers(64, size=20), rng.integers(60, size=20)
    t = rng.uniform(0.5, 2.0, size=20)
    pts = o[i, j] + t[:, None] * d[i, j]
    uv, depth = scenes.project(pts, pose, intr)
    assert np.allclose(uv, np.stack([j + 0.5, i + 0.5], 1), atol=1e-9)
    assert np.allclose(depth, t)  # unnormalised directions: t is depth along the axis
    # and the optical axis through the principal point is the camera's +z (OpenCV)
    uv0, _ = scenes.project(pose[:3, 3] + pose[:3, 2][None], pose, intr)
    assert np.allclose(uv0, [[31.0, 33.5]])


def test_srn_opencv_and_opengl_conventions_give_the_same_rays():
    intr = Intrinsics(40.0, 40.0, 16.0, 16.0, 32, 32)
    pose_cv = _pose(2)
    pose_gl = scenes.cv_to_gl(pose_cv)  # functa: SRN pose · diag(1, −1, −1, 1)
    assert np.allclose(pose_gl, pose_cv @ np.diag([1.0, -1, -1, 1]))
    assert np.allclose(scenes.gl_to_cv(pose_gl), pose_cv)
    o1, d1 = scenes.pixel_rays(pose_cv, intr, "opencv")
    o2, d2 = scenes.pixel_rays(pose_gl, intr, "opengl")
    assert np.allclose(o1, o2) and np.allclose(d1, d2)
    # functa's get_rays, written out: pixel centres, y up, looking along −z
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="xy")
    dirs = np.stack([(i - 16 + 0.5) / 40, -(j - 16 + 0.5) / 40, -np.ones_like(i)], -1)
    assert np.allclose(dirs @ pose_gl[:3, :3].T, d1)
    # the camera looks at what look_at aimed it at: the centre pixel's ray
    c = d1[15:17, 15:17].mean(axis=(0, 1))
    assert np.dot(c / np.linalg.norm(c), pose_cv[:3, 2]) > 0.9999


def _marker_mesh(tmp_path: Path) -> Path:
    """A red ball and a larger green ball, face-coloured, in a PLY."""
    red = trimesh.creation.icosphere(2, radius=0.08)
    red.apply_translation([0.5, 0.25, 0.0])
    green = trimesh.creation.icosphere(2, radius=0.25)
    green.apply_translation([-0.3, -0.1, 0.2])
    red.visual.face_colors = [230, 20, 20, 255]
    green.visual.face_colors = [20, 200, 40, 255]
    path = tmp_path / "markers.ply"
    trimesh.util.concatenate([red, green]).export(path)
    return path


def _normalised(points: np.ndarray, mesh_path: Path) -> np.ndarray:
    """Where render_srn puts ``points`` (its rotation is off: centre and scale only)."""
    v = np.asarray(trimesh.load(mesh_path).vertices)
    c = (v.min(0) + v.max(0)) / 2
    return (points - c) * (render_srn.RADIUS / np.linalg.norm(v - c, axis=1).max())


def test_a_rendered_marker_lands_on_its_projected_pixel_through_the_srn_files(tmp_path):
    """render_srn → SRN files → read_srn → project: the red ball is red and the green
    ball green where the read poses say they are (no flipped or mirrored images)."""
    mesh = _marker_mesh(tmp_path)
    s = render_srn.RenderSettings(split="test", size=48, keep=[0, 23, 63, 200],
                                  rotate="none")
    scene = render_srn.render_scene(mesh, s)
    scenes.write_srn(scene, tmp_path / "markers")
    back = scenes.read_srn(tmp_path / "markers")
    assert back.view_ids == [0, 23, 63, 200] and back.images.shape == (4, 48, 48, 3)
    assert np.allclose(back.poses, scene.poses, atol=1e-6)
    assert back.intrinsics.fx == pytest.approx(131.25 * 48 / 128)
    centres = _normalised(np.array([[0.5, 0.25, 0.0], [-0.3, -0.1, 0.2]]), mesh)
    for v in range(4):
        uv, _ = scenes.project(centres, back.poses[v], back.intrinsics)
        (ur, vr), (ug, vg) = np.floor(uv).astype(int)
        red, green = back.images[v, vr, ur], back.images[v, vg, ug]
        assert red[0] > 0.3 and red[0] > 2 * red[1], (v, red)
        assert green[1] > 0.3 and green[1] > 2 * green[0], (v, green)
    assert back.images[:, 0, 0].min() == 1.0  # white background
    # resampled on reading: same cameras, fewer pixels, the markers stay put
    small = scenes.read_srn(tmp_path / "markers", size=24)
    uv, _ = scenes.project(centres[:1], small.poses[2], small.intrinsics)
    u, v_ = np.floor(uv[0]).astype(int)
    assert small.images[2, v_, u, 0] > 2 * small.images[2, v_, u, 1]


def test_transforms_json_reads_the_same_scene_as_srn(tmp_path):
    scene = scenes.read_srn(VENDORED / "test" / "cow")
    scenes.write_transforms(scene, tmp_path / "cow_nerfstudio")
    meta = json.loads((tmp_path / "cow_nerfstudio" / "transforms.json").read_text())
    gl = np.asarray(meta["frames"][3]["transform_matrix"])
    assert np.allclose(gl, scene.poses[3] @ np.diag([1.0, -1, -1, 1]))  # stored OpenGL
    back = scenes.read_transforms(tmp_path / "cow_nerfstudio" / "transforms.json")
    assert np.allclose(back.poses, scene.poses, atol=1e-9)
    assert np.array_equal(back.images, scene.images)
    o1, d1 = scenes.pixel_rays(scene.poses[5], scene.intrinsics)
    o2, d2 = scenes.pixel_rays(back.poses[5], back.intrinsics)
    assert np.allclose(o1, o2) and np.allclose(d1, d2)


def test_nerf_synthetic_rgba_views_are_composited_on_white(tmp_path):
    """camera_angle_x, file paths without .png, RGBA: NeRF-synthetic's own layout."""
    (tmp_path / "train").mkdir()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # transparent: white
    rgba[2:6, 2:6, 3] = 255  # opaque red square
    rgba[0, 0, 3] = 128  # half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "train" / "r_0.png")
    pose = scenes.cv_to_gl(scenes.look_at([0, 0, 4.0]))
    angle = 0.6911112070083618  # NeRF-synthetic lego
    (tmp_path / "transforms_train.json").write_text(json.dumps({
        "camera_angle_x": angle,
        "frames": [{"file_path": "./train/r_0", "transform_matrix": pose.tolist()}]}))
    s = scenes.read_transforms(tmp_path / "transforms_train.json")
    assert s.intrinsics.fx == pytest.approx(4 / math.tan(angle / 2))
    assert s.intrinsics.cx == 4 and s.intrinsics.height == 8
    assert np.allclose(s.images[0, 4, 4], [200 / 255, 0, 0])
    assert np.allclose(s.images[0, 7, 7], [1, 1, 1])
    a = 128 / 255
    assert np.allclose(s.images[0, 0, 0], [200 / 255 * a + 1 - a, 1 - a, 1 - a], atol=1e-6)
    assert np.allclose(s.poses[0], scenes.look_at([0, 0, 4.0]))
    # a folder holding only transforms_*.json asks which one
    with pytest.raises(SceneDataError, match="transforms_train.json"):
        scenes.read_scenes(tmp_path)


def test_vendored_scenes_follow_the_srn_rig():
    """Vendored test scenes: SRN's spiral ids, focal 131.25 px at 128 (65.625 at 64)."""
    found = scenes.read_scenes(VENDORED / "test")
    assert {s.name for s in found} >= {"CesiumMilkTruck", "jeep1", "bunny00"}
    for s in found:
        assert {23, 55, 63, 82, 119, 127} <= set(s.view_ids)
        assert s.intrinsics.fx == pytest.approx(65.625) and s.intrinsics.cx == 32
        assert np.allclose(np.linalg.norm(s.poses[:, :3, 3], axis=1), 1.3)
        assert s.info["note"] == "a render of a real mesh, not SRN Cars"
        fg = (s.images < 0.98).any(-1).mean()
        assert 0.03 < fg < 0.7, (s.name, fg)  # an object on a white background
    train = scenes.read_scenes(VENDORED / "train")
    assert all(len(s) == 50 for s in train)
    up = train[0].poses[:, :3, 3][:, 1]
    assert (up > 0).all()  # upper hemisphere


def test_one_view_at_the_issues_128_px_follows_the_srn_rig():
    """render_srn at its default 128×128 (the issue's size) of a small vendored mesh:
    SRN Cars' focal 131.25 px at 128 (principal point at the centre), white background,
    the object in the middle."""
    mesh = VENDORED.parent / "meshes" / "eight.ply"
    s = render_srn.RenderSettings(split="test", views=1, ss=1, depth=True)
    assert s.size == 128
    scene = render_srn.render_scene(mesh, s)
    assert scene.images.shape == (1, 128, 128, 3) and scene.view_ids == [0]
    k = scene.intrinsics
    assert (k.fx, k.fy, k.cx, k.cy, k.height, k.width) == (131.25, 131.25, 64, 64, 128, 128)
    img = scene.images[0]
    corners = img[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 1.0).all()  # white background, nothing hit at the corners
    assert (img[60:68, 60:68] < 0.95).any(-1).any()  # the object covers the centre
    fg = (img < 0.98).any(-1)
    assert 0.02 < fg.mean() < 0.8 and np.isfinite(scene.depths[0][fg]).any()
    # the bounding sphere (radius 0.5 at distance 1.3) projects inside the frame
    half = 131.25 * math.tan(math.asin(0.5 / 1.3))
    rows, cols = np.nonzero(fg)
    assert rows.min() >= 64 - half - 1 and rows.max() <= 64 + half + 1
    assert cols.min() >= 64 - half - 1 and cols.max() <= 64 + half + 1


def test_textures_are_sampled_at_the_hit_uv(tmp_path):
    """A textured quad facing the camera: left half red, right half blue in the texture."""
    tex = np.zeros((4, 4, 3), np.uint8)
    tex[:, :2] = [255, 0, 0]
    tex[:, 2:] = [0, 0, 255]
    quad = trimesh.Trimesh([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]],
                           [[0, 1, 2], [0, 2, 3]], process=False)
    quad.visual = trimesh.visual.TextureVisuals(
        uv=[[0, 0], [1, 0], [1, 1], [0, 1]], image=Image.fromarray(tex))
    path = tmp_path / "quad.glb"
    quad.export(path)
    cm = render_srn.load_coloured(path)
    assert cm.colour_source == "texture"
    r = render_srn.Renderer(render_srn.normalise(cm, np.eye(3), 0.5))
    img, depth = r.render(scenes.look_at([0, 0, 1.3]), Intrinsics(40, 40, 16, 16, 32, 32))
    # the camera at +z looks down −z: world +x is image right
    assert img[16, 10, 0] > 2 * img[16, 10, 2] and img[16, 22, 2] > 2 * img[16, 22, 0]
    assert depth[16, 16] == pytest.approx(1.3, abs=1e-3)


# -- bad input: one clear error naming the file -------------------------------------------

def _copy_scene(tmp_path: Path, name: str = "cow") -> Path:
    import shutil

    dst = tmp_path / name
    shutil.copytree(VENDORED / "test" / name, dst)
    return dst


@pytest.mark.parametrize("break_it,message", [
    (lambda d: (d / "intrinsics.txt").unlink(), "intrinsics.txt: missing"),
    (lambda d: (d / "pose" / "000023.txt").unlink(), "000023.png"),
    (lambda d: (d / "pose" / "000999.txt").write_text(" ".join(["0"] * 16)), "000999.txt"),
    (lambda d: Image.new("RGB", (64, 48), "white").save(d / "rgb" / "000023.png"),
     "000023.png: 64×48 is not square"),
    (lambda d: Image.new("RGBA", (64, 64), (9, 9, 9, 100)).save(d / "rgb" / "000055.png"),
     "000055.png: an RGBA image with transparent pixels"),
    (lambda d: (d / "pose" / "000063.txt").write_text(
        " ".join(map(str, (2 * np.eye(4)).ravel()))), "000063.txt: not a rigid transform"),
    (lambda d: (d / "pose" / "000063.txt").write_text(
        " ".join(map(str, np.diag([1.0, 1, -1, 1]).ravel()))), "000063.txt: not a rigid"),
    (lambda d: (d / "pose" / "000082.txt").write_text("1 0 0 x"), "000082.txt: expected"),
    (lambda d: (d / "rgb" / "000119.png").write_bytes(b"not a png"), "000119.png: not a"),
])
def test_broken_srn_scenes_are_refused_naming_the_file(tmp_path, break_it, message):
    d = _copy_scene(tmp_path)
    break_it(d)
    with pytest.raises(SceneDataError) as err:
        scenes.read_srn(d)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_opaque_rgba_srn_view_is_fine(tmp_path):
    d = _copy_scene(tmp_path)
    rgb = np.asarray(Image.open(d / "rgb" / "000023.png"))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA").save(
        d / "rgb" / "000023.png")
    assert np.array_equal(scenes.read_srn(d).images, scenes.read_srn(VENDORED / "test" /
                                                                      "cow").images)


def test_bad_transforms_json_is_refused_naming_it(tmp_path):
    p = tmp_path / "transforms.json"
    p.write_text("{not json")
    with pytest.raises(SceneDataError, match="transforms.json: not JSON"):
        scenes.read_transforms(p)
    p.write_text(json.dumps({"camera_angle_x": 0.7, "frames": [
        {"file_path": "missing.png", "transform_matrix": np.eye(4).tolist()}]}))
    with pytest.raises(SceneDataError, match="missing.png not found"):
        scenes.read_transforms(p)


def _one_view_transforms(tmp_path: Path, meta: dict, matrix: np.ndarray) -> Path:
    Image.new("RGB", (8, 8), "white").save(tmp_path / "r_0.png")
    p = tmp_path / "transforms.json"
    p.write_text(json.dumps({**meta, "frames": [
        {"file_path": "r_0.png", "transform_matrix": np.asarray(matrix).tolist()}]}))
    return p


@pytest.mark.parametrize("meta,matrix,message", [
    ({}, np.eye(4), "no camera: needs camera_angle_x or fl_x"),
    ({"camera_angle_y": 0.7, "w": 8, "h": 8}, np.eye(4), "no camera"),
    ({"camera_angle_x": 0.7}, 2 * np.eye(4), "frame 0 (r_0.png): not a rigid transform"),
    ({"fl_x": 10.0}, np.diag([1.0, 1, -1, 1]), "frame 0 (r_0.png): not a rigid transform"),
    ({"camera_angle_x": 0.7}, np.vstack([np.eye(4)[:3], [0, 0, 1, 1]]), "not a rigid"),
])
def test_transforms_json_without_a_camera_or_with_a_non_rigid_pose_is_refused(
        tmp_path, meta, matrix, message):
    """No camera_angle_x / fl_x, or a scaled, mirrored or projective transform_matrix:
    one line naming the file (and the frame), never a scene with wrong rays."""
    p = _one_view_transforms(tmp_path, meta, matrix)
    with pytest.raises(SceneDataError) as err:
        scenes.read_transforms(p)
    text = str(err.value)
    assert text.startswith(f"{p}: ") and message in text and "\n" not in text
    # read through the folder (what the CLI does): the same refusal
    with pytest.raises(SceneDataError, match="transforms.json"):
        scenes.read_scenes(tmp_path)


def test_the_cli_reports_a_bad_scene_in_one_line_before_any_work(tmp_path):
    d = _copy_scene(tmp_path, "jeep1")
    (d / "pose" / "000055.txt").write_text(" ".join(map(str, (1.5 * np.eye(4)).ravel())))
    out = tmp_path / "ck.safetensors"
    r = subprocess.run([sys.executable, "-m", "mscn_core", "meta-train", "--modality", "nerf",
                        "--data", str(d), "-o", str(out)], capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mscn ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "000055.txt: not a rigid transform" in lines[0] and not out.exists()


def test_render_srn_command_line_writes_an_srn_scene_folder(tmp_path):
    mesh = _marker_mesh(tmp_path)
    r = subprocess.run([sys.executable, str(Path(render_srn.__file__)), str(mesh), "-o",
                        str(tmp_path / "out"), "--split", "train", "--views", "5",
                        "--size", "16"], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    s = scenes.read_srn(tmp_path / "out" / "markers")
    assert len(s) == 5 and s.info["colour"] == "mesh (face)"
    bad = tmp_path / "bad.obj"
    bad.write_text("v 0 0 0\n")
    r = subprocess.run([sys.executable, str(Path(render_srn.__file__)), str(bad), "-o",
                        str(tmp_path / "out2")], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 2 and "bad.obj" in r.stderr.splitlines()[-1]
