"""Shape readers, ground truth, marching cubes and metrics (mscn_datasets.meshes / shape_metrics).

Analytic shapes (sphere, box, torus) check values and signs; vendored real meshes check the
readers, the frame and the inside test. All fast (the whole file runs in well under a minute
on one thread).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import trimesh

from mscn_datasets import vendored_path
from mscn_datasets.meshes import (
    MESH_EXTENSIONS,
    Frame,
    MeshDataError,
    check_inside_test,
    grid_points,
    is_shape_file,
    load_mesh,
    load_split,
    marching_cubes,
    normalise,
    occupancy,
    read_binvox,
    read_shapes,
    read_voxels_hdf5,
    sdf_samples,
    signed_distance,
    surface_points,
    vendored_mesh,
    voxelize,
    write_binvox,
    write_voxels_hdf5,
)
from mscn_datasets.shape_metrics import mesh_metrics, volumetric_iou, voxel_accuracy

METHODS = ["auto", "open3d", "winding", "igl", "trimesh"]
RNG = np.random.default_rng(1234)


def _query(n: int = 3000, shell: trimesh.Trimesh | None = None) -> np.ndarray:
    """Uniform points in the unit-frame box plus points near ``shell``'s surface."""
    pts = [RNG.uniform(-0.55, 0.55, (n, 3))]
    if shell is not None:
        s, _ = surface_points(shell, n, seed=3)
        pts.append(s + RNG.normal(0, 0.01, s.shape))
    return np.concatenate(pts)


def _sdf(mesh, p, method):
    if method == "trimesh":  # slow (pure numpy closest points): a subsample is enough
        p = p[:300]
    return p, signed_distance(mesh, p, method)


# --------------------------------------------------------------------------- analytic SDFs


def _sagitta(mesh: trimesh.Trimesh, radius: float) -> float:
    """Largest gap between a tessellated sphere and the true sphere (its face planes)."""
    d = np.abs(np.sum(mesh.face_normals * mesh.triangles_center, axis=1))
    return float(radius - d.min())


@pytest.mark.parametrize("method", METHODS)
def test_sphere_sdf_negative_inside(method):
    r = 0.3
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=r)
    tol = _sagitta(sphere, r) + 1e-5  # tessellation + open3d's float32
    p, sdf = _sdf(sphere, _query(2000, sphere), method)
    exact = np.linalg.norm(p, axis=1) - r
    assert sdf.dtype == np.float64 and sdf.shape == (len(p),)
    assert np.abs(sdf - exact).max() < tol
    clear = np.abs(exact) > tol
    assert np.array_equal(sdf[clear] < 0, exact[clear] < 0)
    assert signed_distance(sphere, np.zeros((1, 3)), method)[0] == pytest.approx(-r, abs=tol)


def _box_sdf(p: np.ndarray, half: np.ndarray) -> np.ndarray:
    q = np.abs(p) - half
    return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)


@pytest.mark.parametrize("method", METHODS)
def test_box_sdf_exact(method):
    ext = np.array([0.6, 0.4, 0.2])
    box = trimesh.creation.box(extents=ext)
    p, sdf = _sdf(box, _query(2000, box), method)
    # a box is represented exactly: only open3d's float32 is left
    assert np.abs(sdf - _box_sdf(p, ext / 2)).max() < 2e-6


@pytest.mark.parametrize("method", METHODS)
def test_torus_sdf(method):
    big, small = 0.3, 0.1
    torus = trimesh.creation.torus(big, small, major_sections=96, minor_sections=48)
    assert torus.is_watertight
    p, sdf = _sdf(torus, _query(2000, torus), method)
    exact = np.hypot(np.hypot(p[:, 0], p[:, 1]) - big, p[:, 2]) - small
    # polygon sagitta of both circles: (R+r)(1-cos(pi/96)) + r(1-cos(pi/48)) ≈ 0.0004
    tol = (big + small) * (1 - np.cos(np.pi / 96)) + small * (1 - np.cos(np.pi / 48)) + 1e-5
    assert np.abs(sdf - exact).max() < tol
    clear = np.abs(exact) > tol
    assert np.array_equal(sdf[clear] < 0, exact[clear] < 0)
    assert sdf[np.argmin(np.linalg.norm(p, axis=1))] > 0  # the hole is outside


def test_occupancy_matches_sign_and_trimesh_convention_handled():
    torus = trimesh.creation.torus(0.3, 0.1, major_sections=64, minor_sections=32)
    p = _query(3000, torus)
    occ = occupancy(torus, p)
    sdf = signed_distance(torus, p)
    clear = np.abs(sdf) > 1e-6
    assert occ.dtype == bool and np.array_equal(occ[clear], sdf[clear] < 0)
    centre_of_tube = np.array([[0.3, 0.0, 0.0]])
    assert trimesh.proximity.signed_distance(torus, centre_of_tube)[0] > 0  # trimesh: + inside
    assert signed_distance(torus, centre_of_tube, "trimesh")[0] < 0  # ours: − inside


def test_inside_out_and_small_hole_keep_their_signs():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    p = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.45]])
    inverted = sphere.copy()
    inverted.invert()
    assert signed_distance(inverted, p)[0] < 0 < signed_distance(inverted, p)[1]
    holed = sphere.copy()
    holed.update_faces(np.arange(1, len(holed.faces)))  # one face missing: a small hole
    assert not holed.is_watertight
    check_inside_test(holed, "holed")  # small holes pass
    assert signed_distance(holed, p)[0] < 0 < signed_distance(holed, p)[1]
    assert occupancy(holed, p).tolist() == [True, False]


# --------------------------------------------------------------------------- frame, readers


def test_normalise_and_frame_roundtrip():
    mesh = load_mesh(vendored_mesh("elk"))
    unit, frame = normalise(mesh)
    lo, hi = unit.bounds
    assert np.allclose(lo + hi, 0, atol=1e-12) and np.max(hi - lo) == pytest.approx(1.0)
    assert np.allclose(frame.to_original(unit.vertices), mesh.vertices, atol=1e-9)
    assert np.allclose(frame.to_unit(mesh.vertices), unit.vertices, atol=1e-12)
    back = Frame.from_dict(json.loads(json.dumps(frame.as_dict())))
    assert np.array_equal(back.center, frame.center) and back.scale == frame.scale
    [shape] = read_shapes(vendored_mesh("elk"))
    assert shape.name == "elk" and shape.watertight and shape.occupancy is None
    assert np.allclose(shape.original_mesh().vertices, mesh.vertices, atol=1e-9)


@pytest.mark.parametrize("ext", [".obj", ".ply", ".off", ".stl", ".glb"])
def test_every_mesh_format_reads_back_the_same_geometry(tmp_path, ext):
    ref = load_mesh(vendored_mesh("cow"))
    path = tmp_path / f"cow{ext}"
    ref.export(path)
    [shape] = read_shapes(path)
    got = shape.original_mesh()
    assert shape.name == "cow" and shape.watertight
    assert len(got.faces) == len(ref.faces) and len(got.vertices) == len(ref.vertices)
    assert np.allclose(got.bounds, ref.bounds, atol=1e-6)
    assert got.volume == pytest.approx(ref.volume, rel=1e-6)
    assert got.area == pytest.approx(ref.area, rel=1e-6)
    assert is_shape_file(path)


def test_glb_scene_with_two_transformed_nodes_is_flattened(tmp_path):
    box = trimesh.creation.box((1.0, 1.0, 1.0))
    ball = trimesh.creation.icosphere(2, 0.5)
    t1 = trimesh.transformations.translation_matrix([3.0, 0.0, 0.0])
    t2 = (trimesh.transformations.rotation_matrix(0.5, [0, 0, 1])
          @ trimesh.transformations.translation_matrix([0.0, 2.0, 0.0]))
    scene = trimesh.Scene()
    scene.add_geometry(box, node_name="box", transform=t1)
    scene.add_geometry(ball, node_name="ball", transform=t2)
    path = tmp_path / "scene.glb"
    scene.export(path)
    got = load_mesh(path)
    want = trimesh.util.concatenate([box.copy().apply_transform(t1),
                                     ball.copy().apply_transform(t2)])
    assert len(got.faces) == len(want.faces)
    assert np.allclose(got.bounds, want.bounds, atol=1e-6)
    assert got.volume == pytest.approx(want.volume, rel=1e-6)


def _asymmetric_grid(r: int = 16) -> np.ndarray:
    g = np.zeros((r, r, r), dtype=bool)
    g[1:4, 2:9, 3:14] = True  # different extent along every axis
    g[10, 0, 5] = True
    return g


def test_binvox_roundtrip_axis_order_and_frame(tmp_path):
    grid = _asymmetric_grid()
    frame = Frame(center=np.array([1.5, -2.0, 0.25]), scale=3.0)
    path = write_binvox(grid, tmp_path / "a.binvox", frame=frame)
    with pytest.raises(FileExistsError):
        write_binvox(grid, path)
    shape = read_binvox(path)
    assert shape.occupancy.dtype == bool and np.array_equal(shape.occupancy, grid)
    assert np.allclose(shape.frame.center, frame.center) and shape.frame.scale == frame.scale
    # trimesh's own binvox reader agrees on the axis order (its transform differs, see read_binvox)
    assert np.array_equal(trimesh.load(path).matrix, grid)
    assert is_shape_file(path) and read_shapes(path)[0].name == "a"


def test_voxelised_mesh_lands_in_place_after_binvox(tmp_path):
    [shape] = read_shapes(vendored_mesh("cow"))
    r = 32
    occ = voxelize(shape.mesh, r)
    assert occ.shape == (r, r, r) and occ.any()
    back = read_binvox(write_binvox(occ, tmp_path / "cow.binvox", frame=shape.frame))
    assert np.array_equal(back.occupancy, occ)
    centres = grid_points(r).reshape(r, r, r, 3)[back.occupancy]
    orig = back.frame.to_original(centres)
    assert occupancy(shape.original_mesh(), orig).all()
    voxel = shape.frame.scale / r
    assert np.allclose(orig.mean(axis=0), shape.original_mesh().center_mass, atol=voxel)


def test_imnet_hdf5_roundtrip_and_content_dispatch(tmp_path):
    grids = np.stack([_asymmetric_grid(), _asymmetric_grid().transpose(2, 0, 1),
                      np.zeros((16, 16, 16), bool)])
    path = write_voxels_hdf5(grids, tmp_path / "vox.h5")
    with h5py.File(path, "r") as f:
        assert f["voxels"].shape == (3, 16, 16, 16, 1) and f["voxels"].dtype == np.uint8
    shapes = read_voxels_hdf5(path)
    assert [s.name for s in shapes] == ["vox#0", "vox#1", "vox#2"]
    for s, g in zip(shapes, grids, strict=True):
        assert np.array_equal(s.occupancy, g) and s.mesh is None and not s.watertight
    odd = tmp_path / "vox.data"  # content first: the extension does not matter
    odd.write_bytes(path.read_bytes())
    assert len(read_shapes(odd)) == 3 and is_shape_file(odd)
    bv = tmp_path / "grid.obj"
    bv.write_bytes(write_binvox(grids[0], tmp_path / "g.binvox").read_bytes())
    assert np.array_equal(read_shapes(bv)[0].occupancy, grids[0])


def test_hdf5_without_voxels_and_netcdf_are_refused(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["points"] = np.zeros((4, 3))
    assert not is_shape_file(path)
    with pytest.raises(MeshDataError, match=r"^other\.h5: .*'points'"):
        read_shapes(path)
    nc = vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")  # NetCDF4 is HDF5 too
    assert not is_shape_file(nc)
    assert not is_shape_file(tmp_path)


def _bad_files(tmp: Path) -> dict[str, Path]:
    files = {"empty.obj": b"", "garbage.obj": bytes(range(256)) * 40,
             "nan.off": b"OFF\n4 2 0\n0 0 0\nnan 0 0\n0 1 0\n1 1 1\n3 0 2 3\n3 0 1 2\n",
             "flat.off": b"OFF\n3 2 0\n0 0 0\n1 0 0\n2 0 0\n3 0 1 2\n3 0 2 1\n"}
    out = {}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        out[name] = tmp / name
    return out


@pytest.mark.parametrize("name,what", [("empty.obj", "empty"), ("garbage.obj", "face"),
                                       ("nan.off", "NaN"), ("flat.off", "degenerate")])
def test_bad_mesh_files_raise_one_line_errors(tmp_path, name, what):
    path = _bad_files(tmp_path)[name]
    with pytest.raises(MeshDataError) as err:
        read_shapes(path)
    msg = str(err.value)
    assert msg.startswith(f"{name}: ") and what in msg and "\n" not in msg
    with pytest.raises(MeshDataError, match="directory"):
        read_shapes(tmp_path)


def test_open_vendored_meshes_documented_behaviour():
    """mushroom: 37 % of its box has |w| in (0.2, 0.8) → refused; the truck (8 boundary
    edges) passes; closed meshes pass."""
    split = load_split()
    assert split["open"] == ["mushroom", "CesiumMilkTruck"]
    [mush] = read_shapes(vendored_mesh("mushroom"))
    assert not mush.watertight
    with pytest.raises(MeshDataError, match=r"^mushroom: not watertight .*ambiguous"):
        check_inside_test(mush.mesh, "mushroom")
    [truck] = read_shapes(vendored_mesh("CesiumMilkTruck"))
    assert not truck.watertight
    check_inside_test(truck.mesh, "CesiumMilkTruck")
    check_inside_test(read_shapes(vendored_mesh("bunny00"))[0].mesh, "bunny00")


def test_split_and_vendored_meshes():
    split = load_split()
    held = set(split["test"]) | set(split["val"])
    assert not held & set(split["train"]) and not set(split["test"]) & set(split["val"])
    assert set(split["test"]) == {"bunny00", "cow", "elk", "pinion", "knot1"}
    for name in split["train"] + split["val"] + split["test"]:
        mesh = load_mesh(vendored_mesh(name))
        assert mesh.is_watertight and mesh.volume > 0 and len(mesh.faces) <= 6000, name
    with pytest.raises(FileNotFoundError, match="available"):
        vendored_mesh("no-such-mesh")


def test_large_mesh_is_decimated_with_a_warning(tmp_path):
    """200k faces → 20k in ~1.5 s here; the 2M-face timing is in the module docstring."""
    big = trimesh.creation.torus(0.35, 0.12, major_sections=500, minor_sections=200)
    assert len(big.faces) == 200_000
    path = tmp_path / "big.ply"
    big.export(path)
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match=r"big\.ply: 200000 faces > max_faces=20000"):
        mesh = load_mesh(path, max_faces=20_000)
    assert time.perf_counter() - t0 < 20
    assert len(mesh.faces) <= 20_000 and mesh.is_watertight
    assert mesh.volume == pytest.approx(big.volume, rel=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_mesh(path, max_faces=None).faces) == 200_000


# --------------------------------------------------------------------------- sampling, grids


def test_sdf_samples_and_surface_points():
    r = 0.3
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=r)
    pts, sdf = sdf_samples(sphere, 1001, 500, np.random.default_rng(0))
    assert pts.shape == (1501, 3) and sdf.shape == (1501,)
    assert pts.dtype == np.float32 and sdf.dtype == np.float32
    rad = np.linalg.norm(pts, axis=1)
    assert np.abs(sdf - (rad - r)).max() < _sagitta(sphere, r) + 1e-5
    near_fine, near_coarse = rad[:501] - r, rad[501:1001] - r
    assert np.std(near_fine) < 0.01 < np.std(near_coarse) < 0.1
    assert np.abs(pts[1001:]).max() <= 0.55
    again = sdf_samples(sphere, 1001, 500, np.random.default_rng(0))
    assert np.array_equal(again[0], pts)
    s, n = surface_points(sphere, 500, seed=1)
    assert s.shape == n.shape == (500, 3)
    assert np.allclose(np.sum(n * s / np.linalg.norm(s, axis=1, keepdims=True), axis=1), 1,
                       atol=0.01)  # outward face normals


def test_grid_points_conventions():
    g = grid_points(4)
    assert g.shape == (64, 3) and g.dtype == np.float32
    assert np.allclose(g[0], [-0.375, -0.375, -0.375])
    assert np.allclose(g[1], [-0.375, -0.375, -0.125])
    assert np.allclose(g[16], [-0.125, -0.375, -0.375])  # i (x) is the slowest index
    lat = grid_points(5, bound=0.55, centres=False)
    assert np.allclose(lat[0], -0.55) and np.allclose(lat[-1], 0.55)
    occ = voxelize(trimesh.creation.icosphere(4, radius=0.4), 32)
    assert occ.sum() / 32**3 == pytest.approx(4 / 3 * np.pi * 0.4**3, rel=0.03)


# --------------------------------------------------------------------------- marching cubes


def test_marching_cubes_sphere_is_closed_outward_and_round():
    r, n, bound = 0.3, 48, 0.55
    lat = grid_points(n, bound, centres=False)
    mesh = marching_cubes((np.linalg.norm(lat, axis=1) - r).reshape(n, n, n), bound=bound)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # outward normals
    h = 2 * bound / (n - 1)
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - r).max() < 0.1 * h
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * r**3, rel=0.02)
    # occupancy-style input (inside positive) gives the same surface
    occ_mesh = marching_cubes(-(np.linalg.norm(lat, axis=1) - r).reshape(n, n, n),
                              bound=bound, inside_negative=False)
    assert occ_mesh.volume == pytest.approx(mesh.volume, rel=1e-9)


def test_marching_cubes_touching_the_box_and_empty():
    n = 16
    lat = grid_points(n, 0.55, centres=False)
    full = marching_cubes((np.linalg.norm(lat, axis=1) - 5).reshape(n, n, n))
    assert full.is_watertight and full.volume > 0  # closed by the padding layer
    empty = marching_cubes(np.ones((n, n, n)))
    assert isinstance(empty, trimesh.Trimesh) and len(empty.faces) == 0


# --------------------------------------------------------------------------- metrics


def test_mesh_metrics_identical_and_offset_spheres():
    a = trimesh.creation.icosphere(subdivisions=5, radius=0.4)
    same = mesh_metrics(a, a.copy())
    assert same["chamfer_l1"] < 0.004  # sampling floor ≈ 0.5*sqrt(area/n) ≈ 0.0022
    assert same["fscore"] == pytest.approx(1.0, abs=1e-3) and same["empty"] == 0.0
    assert same["normal_consistency"] > 0.99
    b = trimesh.creation.icosphere(subdivisions=5, radius=0.42)
    off = mesh_metrics(a, b)
    # every nearest neighbour is ≥ 0.02 away radially; the tangential part adds about
    # E[t²]/(2·0.02) with E[t²] = area/(π n) ≈ 7e-6, i.e. +0.0002: 0.02 ± 0.001 is generous
    assert off["chamfer_l1"] == pytest.approx(0.02, abs=0.001)
    assert off["accuracy"] == pytest.approx(off["completeness"], abs=0.001)
    assert off["fscore"] == 0.0 and off["normal_consistency"] > 0.99
    assert mesh_metrics(a, b, fscore_threshold=0.03)["fscore"] == pytest.approx(1.0, abs=1e-3)
    empty = mesh_metrics(trimesh.Trimesh(), a)
    assert empty["empty"] == 1.0 and np.isnan(empty["chamfer_l1"]) and empty["fscore"] == 0.0


def test_volumetric_iou_and_accuracy_of_cubes():
    a = np.zeros((20, 20, 20), bool)
    b = np.zeros((20, 20, 20), bool)
    a[0:10, 0:10, 0:10] = True
    b[5:15, 0:10, 0:10] = True
    assert volumetric_iou(a, b) == pytest.approx(500 / 1500)
    assert volumetric_iou(a, a) == 1.0 and volumetric_iou(~a & a, ~a & a) == 1.0
    assert voxel_accuracy(a, b) == pytest.approx(1 - 1000 / 8000)
    with pytest.raises(ValueError):
        volumetric_iou(a, b[:10])


def test_extension_tuples():
    assert MESH_EXTENSIONS == (".obj", ".ply", ".off", ".stl", ".glb", ".gltf")
