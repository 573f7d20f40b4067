"""Lazy reading (``scan``/``load``) of the sdf, voxel and nerf plugins.

Over folders of vendored meshes and scenes, ``scan`` + ``load`` give exactly what ``read``
gives file by file (names, meshes, grids, views and poses, in order), every reference's
label is the loaded item's, and ``scan`` parses nothing (the readers are patched to fail
while it runs). The contract checker's C19 passes for the three plugins, and a tiny
``meta-train`` trains on a folder through the lazy path.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import trimesh
from clirun import mscn
from clirun import ok as _ok

from mscn_core.cli import _read_items
from mscn_core.registry import get_modality
from mscn_core.streaming import ItemRef, LazySequence
from mscn_core.testing import check_modality
from mscn_datasets import meshes, scenes, shape_metrics
from mscn_plugins import voxel as voxel_plugin
from mscn_plugins.nerf import NerfOptions
from mscn_plugins.sdf import SdfOptions
from mscn_plugins.voxel import VoxelOptions

# Small closed meshes (1000-1700 faces) and one open mesh whose inside test passes
# (CesiumMilkTruck, 0.00 % ambiguous): load must run the same check as read.
MESHES = ["cube-meshed", "CesiumMilkTruck", "pinion"]
SCENES = Path(scenes.__file__).resolve().parent / "data" / "scenes"
SDF_TINY = SdfOptions(near_samples=3000, metric_grid=16, resolution=24, rotations=2)


def _no_parsing():
    """Every reader that decodes a mesh, grid or view fails if called."""
    stack = ExitStack()
    for obj, name in [(meshes, "read_shapes"), (meshes, "load_mesh"), (meshes, "read_binvox"),
                      (meshes, "read_voxels_hdf5"), (trimesh, "load"),
                      (voxel_plugin, "read_npz"), (np, "load"), (scenes, "read_scenes"),
                      (scenes, "read_srn"), (scenes, "read_transforms"),
                      (scenes, "_stack_views")]:
        stack.enter_context(mock.patch.object(obj, name, side_effect=AssertionError(name)))
    return stack


def _mesh_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "meshes" / "nested"
    folder.mkdir(parents=True)
    for n in MESHES:
        shutil.copy(meshes.vendored_mesh(n), folder)
    return tmp_path / "meshes"


def _lazy_and_eager(m, paths, opts) -> tuple[LazySequence, list]:
    """What meta-train reads (lazy, scan parsing nothing) and what read gives per file."""
    with _no_parsing():
        lazy = _read_items(m, paths, opts, lazy=True)
    assert isinstance(lazy, LazySequence) and lazy.loads == 0
    return lazy, _read_items(m, paths, opts, lazy=False)


def _same_shapes(m, lazy: LazySequence, eager: list) -> None:
    assert [r.label for r in lazy.refs] == [s.name for s in eager]
    for ref, got, want in zip(lazy.refs, lazy, eager, strict=True):
        assert ref.label == m.item_label(got) == got.name == want.name
        assert got.source == want.source and got.watertight == want.watertight
        np.testing.assert_array_equal(got.frame.center, want.frame.center)
        assert got.frame.scale == want.frame.scale
        if want.mesh is None:
            assert got.mesh is None
        else:
            np.testing.assert_array_equal(got.mesh.vertices, want.mesh.vertices)
            np.testing.assert_array_equal(got.mesh.faces, want.mesh.faces)
        if want.occupancy is None:
            assert got.occupancy is None
        else:
            assert got.occupancy.dtype == bool
            np.testing.assert_array_equal(got.occupancy, want.occupancy)


def test_sdf_scan_and_load_give_what_read_gives(tmp_path):
    sdf = get_modality("sdf")
    folder = _mesh_folder(tmp_path)
    t0 = time.perf_counter()
    lazy, eager = _lazy_and_eager(sdf, [folder], SDF_TINY)
    assert [r.label for r in lazy.refs] == [  # files sorted, each then its rotations
        f"{n}{s}" for n in sorted(MESHES) for s in ("", "@rot0", "@rot1")]
    _same_shapes(sdf, lazy, eager)
    assert lazy.loads == len(eager)
    assert time.perf_counter() - t0 < 20


def test_sdf_load_refuses_what_read_refuses_and_scan_refuses_voxel_files(tmp_path):
    sdf = get_modality("sdf")
    mushroom = meshes.vendored_mesh("mushroom")  # open, ambiguous inside: refused
    with pytest.raises(meshes.MeshDataError) as eager:
        sdf.read(mushroom, SDF_TINY)
    refs = sdf.scan(mushroom, SDF_TINY)  # listed without parsing...
    for ref in refs:  # ...refused on loading, rotated copies too, with read's message
        with pytest.raises(meshes.MeshDataError) as lazy:
            sdf.load(ref, SDF_TINY)
        assert str(lazy.value) == str(eager.value)
    grid = meshes.write_binvox(np.ones((4, 4, 4), bool), tmp_path / "g.binvox")
    with pytest.raises(meshes.MeshDataError) as eager:
        sdf.read(grid)
    with _no_parsing(), pytest.raises(meshes.MeshDataError) as lazy:
        sdf.scan(grid)
    assert str(lazy.value) == str(eager.value) and "--modality voxel" in str(lazy.value)
    for bad in (tmp_path, tmp_path / "missing.ply"):
        with pytest.raises(meshes.MeshDataError) as eager:
            sdf.read(bad)
        with pytest.raises(meshes.MeshDataError) as lazy:
            sdf.scan(bad)
        assert str(lazy.value) == str(eager.value)


def test_a_rotated_copy_alone_equals_the_one_rotated_copies_makes():
    shape = meshes.read_shapes(meshes.vendored_mesh("pinion"))[0]
    for k, want in enumerate(meshes.rotated_copies(shape, 3)):
        got = meshes.rotated_copy(shape, k)
        assert got.name == want.name == meshes.rotated_name(shape.name, k)
        np.testing.assert_array_equal(got.mesh.vertices, want.mesh.vertices)
        np.testing.assert_array_equal(got.frame.center, want.frame.center)


def test_voxel_scan_and_load_give_what_read_gives_for_every_format(tmp_path):
    vox = get_modality("voxel")
    opts = VoxelOptions(resolution=12, rotations=1)
    folder = _mesh_folder(tmp_path)
    rng = np.random.default_rng(0)
    grids = rng.random((3, 8, 8, 8)) < 0.3
    meshes.write_voxels_hdf5(grids, folder / "three.h5")
    meshes.write_binvox(grids[0], folder / "one.binvox",
                        meshes.Frame(center=[1.0, 2.0, 3.0], scale=2.0))
    shapes = [meshes.Shape(f"s{i}", "x", meshes.Frame(center=[i, 0, 0], scale=1.0 + i),
                           occupancy=g) for i, g in enumerate(grids)]
    vox.save(shapes, folder / "saved.npz")  # compressed: a later grid is found by seeking
    # meshes are the sdf modality's unless named: a quoted glob names them
    paths = [folder, str(folder / "**" / "*.ply")]
    lazy, eager = _lazy_and_eager(vox, paths, opts)
    labels = [r.label for r in lazy.refs]
    assert labels[:6] == ["one", "s0", "s1", "s2", "three#0", "three#1"]
    assert labels[7:] == [f"{n}{s}" for n in sorted(MESHES) for s in ("", "@rot0")]
    _same_shapes(vox, lazy, eager)
    assert lazy.loads == len(eager) == 7 + 2 * len(MESHES)


def test_nerf_scan_and_load_give_what_read_gives(tmp_path):
    nerf = get_modality("nerf")
    opts = NerfOptions(size=16)
    cow = scenes.read_srn(SCENES / "test" / "cow")
    synth = scenes.write_transforms(cow.subset(cow.view_ids[:3]), tmp_path / "synth")
    (synth / "transforms.json").rename(synth / "transforms_train.json")
    # a folder of scene folders, one scene folder, an intrinsics.txt, a transforms*.json
    paths = [SCENES / "val", SCENES / "test" / "elk", SCENES / "test" / "pinion" /
             "intrinsics.txt", synth / "transforms_train.json"]
    lazy, eager = _lazy_and_eager(nerf, paths, opts)
    assert [r.label for r in lazy.refs] == ["camel", "spool", "elk", "pinion",
                                            "synth_transforms_train"]
    for ref, got, want in zip(lazy.refs, lazy, eager, strict=True):
        assert ref.label == nerf.item_label(got) == want.name
        assert got.view_ids == want.view_ids and got.source == want.source
        assert got.intrinsics == want.intrinsics
        np.testing.assert_array_equal(got.images, want.images)
        np.testing.assert_array_equal(got.poses, want.poses)
    for bad in (tmp_path / "nothing", synth, SCENES / "README.md"):
        with pytest.raises(scenes.SceneDataError) as eager_err:
            nerf.read(bad, opts)
        with pytest.raises(scenes.SceneDataError) as lazy_err:
            nerf.scan(bad, opts)
        assert str(lazy_err.value) == str(eager_err.value)
    with _no_parsing(), pytest.raises(ValueError, match="--size"):
        nerf.scan(SCENES / "val", NerfOptions(size=0))


@pytest.mark.parametrize("name", ["sdf", "voxel", "nerf"])
def test_the_contract_checker_scans_and_loads_the_saved_output(name, tmp_path, monkeypatch):
    """C19 runs (scan and load are called on the plugin's own output) and passes; the
    options are those of the plugins' own contract tests (test_shapes, test_nerf), which
    run the whole check with full-size mesh metrics (here 2,000 points: 2 s, not 14 s)."""
    monkeypatch.setenv("MSCN_RENDERER", "matplotlib")
    monkeypatch.setattr(shape_metrics, "mesh_metrics",
                        functools.partial(shape_metrics.mesh_metrics, n_points=2000))
    m = get_modality(name)
    if name == "nerf":
        opts = NerfOptions(size=16, samples=8, orbit_views=2)
        items = m.read(SCENES / "test" / "cow", opts) + m.read(SCENES / "test" / "jeep1", opts)
    else:
        opts = (SdfOptions(near_samples=3000, metric_grid=16, resolution=24) if name == "sdf"
                else VoxelOptions(resolution=16))
        items = (m.read(meshes.vendored_mesh("bunny00"), opts)
                 + m.read(meshes.vendored_mesh("pinion"), opts))
    calls: list[ItemRef] = []
    scan, load = m.scan, m.load

    def loading(ref, options=None):
        calls.append(ref)
        return load(ref, options)

    with mock.patch.object(m, "scan", side_effect=scan), \
            mock.patch.object(m, "load", side_effect=loading):
        found = check_modality(m, items, tmp_dir=tmp_path, options=opts)
    assert found == [], "\n".join(map(str, found))
    assert len(calls) == 1 and isinstance(calls[0], ItemRef)


def test_meta_train_streams_a_folder_of_meshes(tmp_path):
    folder = _mesh_folder(tmp_path)
    rep = _ok(mscn("meta-train", "--modality", "sdf", "--data", folder, "--rotations", "1",
                   "--depth", "3", "--width", "32", "--budget", "64", "--batch-size", "2",
                   "--points-per-item", "512", "--near-samples", "2000", "--metric-grid",
                   "16", "--val-every", "2", "--val-points", "512", "--progress", "false",
                   "--outer-steps", "2", "-o", tmp_path / "c.safetensors",
                   env={**os.environ, "OMP_NUM_THREADS": "1"}))
    assert rep["steps_run"] == 2
    assert (tmp_path / "c.safetensors").stat().st_size > 0
