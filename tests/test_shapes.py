"""The sdf and voxel modalities end to end on real vendored meshes, through the CLI.

Tiny checkpoints are meta-trained for real (a few seconds) on meshes of the "train"
split; everything is judged on meshes of the "test" split, which no checkpoint saw.
The viewers run with the matplotlib backend here (the open3d path is tested in
test_mesh_viewer.py) to keep the suite fast.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import trimesh
from clirun import mscn
from clirun import ok as _ok
from PIL import Image

from mscn_core.registry import get_modality
from mscn_core.testing import assert_modality
from mscn_datasets import meshes
from mscn_datasets.shape_metrics import mesh_metrics
from mscn_plugins.sdf import SdfOptions
from mscn_plugins.voxel import VoxelOptions

SPLIT = meshes.load_split()
TRAIN = [str(meshes.vendored_mesh(n)) for n in SPLIT["train"][:6]]
VAL = [str(meshes.vendored_mesh(n)) for n in SPLIT["val"][:1]]
BUNNY = meshes.vendored_mesh("bunny00")  # test split: never trained on
PINION = meshes.vendored_mesh("pinion")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MSCN_RENDERER": "matplotlib"}
TINY = ["--depth", "4", "--width", "64", "--w0", "10", "--w0-first", "10", "--budget", "64",
        "--lr-init-low", "0.05", "--lr-init-high", "0.5", "--outer-lr", "3e-4",
        "--batch-size", "4", "--points-per-item", "2048", "--val-every", "20",
        "--val-points", "2048", "--progress", "false"]
SDF_SMALL = ["--near-samples", "20000", "--metric-grid", "32"]


def _mscn(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    return mscn(*args, timeout=timeout, env=ENV)


def _error_line(r: subprocess.CompletedProcess) -> str:
    """The one line a failing command prints (open3d's own chatter aside)."""
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mscn ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def sdf_ckpt(tmp_path_factory) -> Path:
    ck = tmp_path_factory.mktemp("sdf") / "sdf.safetensors"
    _ok(_mscn("meta-train", "--modality", "sdf", "--data", *TRAIN, "--val-data", *VAL, *TINY,
              *SDF_SMALL, "--outer-steps", "60", "-o", ck))
    return ck


@pytest.fixture(scope="module")
def voxel_ckpt(tmp_path_factory) -> Path:
    ck = tmp_path_factory.mktemp("vox") / "voxel.safetensors"
    _ok(_mscn("meta-train", "--modality", "voxel", "--data", *TRAIN, "--val-data", *VAL, *TINY,
              "--resolution", "32", "--outer-steps", "60", "-o", ck))
    return ck


def _sphere_file(tmp_path: Path, radius: float = 0.7, center=(3.0, -1.0, 2.0)) -> Path:
    m = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    m.apply_translation(center)
    path = tmp_path / "sphere.ply"
    m.export(path)
    return path


# -- the contract, conventions, sampling ---------------------------------------------------

def test_both_modalities_pass_the_contract_checker(tmp_path, monkeypatch):
    monkeypatch.setenv("MSCN_RENDERER", "matplotlib")
    sdf = get_modality("sdf")
    opts = SdfOptions(near_samples=3000, metric_grid=16, resolution=24)
    items = sdf.read(BUNNY, opts) + sdf.read(PINION, opts)
    assert_modality(sdf, items, tmp_dir=tmp_path / "sdf", options=opts)
    vox = get_modality("voxel")
    vopts = VoxelOptions(resolution=16)
    items = vox.read(BUNNY, vopts) + vox.read(PINION, vopts)
    assert_modality(vox, items, tmp_dir=tmp_path / "vox", options=vopts)


def test_sdf_targets_are_negative_inside_in_network_units(tmp_path):
    """A sphere normalises to radius 0.5 in the unit cube = radius 1 in network units."""
    m = get_modality("sdf")
    (item,) = m.read(_sphere_file(tmp_path), SdfOptions())
    s = m.to_signal(item, SdfOptions(near_samples=5000, metric_grid=16))
    r = s.coords.norm(dim=1)
    expected = r - 1.0
    assert torch.all(s.targets[r < 0.9, 0] < 0) and torch.all(s.targets[r > 1.1, 0] > 0)
    assert float((s.targets[:, 0] - expected).abs().max()) < 0.01  # icosphere facets
    assert s.n_lattice == 16**3 and m.n_values(s) == len(item.mesh.vertices)
    assert set(s.meta) == {"name", "frame"}  # only what a decoder needs goes in a stream


def test_voxel_sampling_is_balanced_and_mesh_files_go_to_sdf_by_default(tmp_path):
    vox = get_modality("voxel")
    (item,) = vox.read(BUNNY, VoxelOptions(resolution=32))
    s = vox.to_signal(item)
    occupied = float(s.targets.mean())
    assert 0.05 < occupied < 0.4
    _, t, _ = vox.sample(s, 20000, torch.Generator().manual_seed(0))
    assert abs(float(t.mean()) - 0.5) < 0.02  # half occupied although the grid is not
    assert get_modality("sdf").guess_can_open(BUNNY) and not vox.guess_can_open(BUNNY)
    meshes.write_binvox(item.occupancy, tmp_path / "b.binvox", item.frame)
    assert vox.guess_can_open(tmp_path / "b.binvox")
    assert not get_modality("sdf").guess_can_open(tmp_path / "b.binvox")


# -- meta-learned fits of held-out meshes ---------------------------------------------------

def test_sdf_fit_of_a_held_out_mesh_returns_to_the_original_frame(sdf_ckpt, tmp_path):
    out = tmp_path / "bunny.obj"
    rep = _ok(_mscn("fit", BUNNY, "--checkpoint", sdf_ckpt, *SDF_SMALL, "--resolution", "64",
                    "-o", out))["mean"]
    zero = _ok(_mscn("evaluate", BUNNY, "--checkpoint", sdf_ckpt, *SDF_SMALL,
                     "--steps", "0"))["mean"]
    # the 3 meta-learned steps adapt the shared network to this mesh
    assert rep["chamfer_l1"] < zero["chamfer_l1"] and rep["iou"] > zero["iou"]
    assert rep["iou"] > 0.3 and rep["chamfer_l1"] < 0.1, rep
    truth = meshes.load_mesh(BUNNY)
    recon = trimesh.load(out, force="mesh")
    assert len(recon.faces) > 100
    # the file's frame (the sphere test below moves it far from the unit cube): judged
    # in the truth's unit frame, the written mesh is the reported reconstruction
    truth_unit, frame = meshes.normalise(truth)
    recon.vertices = frame.to_unit(recon.vertices)
    assert mesh_metrics(recon, truth_unit, n_points=20000)["chamfer_l1"] < 0.1


def test_sdf_encode_decode_matches_fit_at_the_same_bits(sdf_ckpt, tmp_path):
    stream = tmp_path / "bunny.mscn"
    enc = _ok(_mscn("encode", BUNNY, "--modality", "sdf", "--checkpoint", sdf_ckpt,
                    *SDF_SMALL, "--bits", "6", "-o", stream))
    n_vertices = len(meshes.load_mesh(BUNNY).vertices)
    assert enc["values"] == n_vertices  # bits per value = bits per vertex
    assert enc["bits_per_value"] == pytest.approx(8 * stream.stat().st_size / n_vertices)
    # 64 modulations at 6 bits (48 bytes raw) plus a ~150-byte header (sha256, name, frame)
    assert stream.stat().st_size < 300
    dec = _ok(_mscn("decode", stream, "--checkpoint", sdf_ckpt, "--resolution", "48",
                    "-o", tmp_path / "dec.ply"))
    assert dec["modality"] == "sdf" and dec["items"] == 1
    _ok(_mscn("fit", BUNNY, "--checkpoint", sdf_ckpt, *SDF_SMALL, "--bits", "6",
              "--resolution", "48", "-o", tmp_path / "fit.ply"))
    a = trimesh.load(tmp_path / "dec.ply", force="mesh")
    b = trimesh.load(tmp_path / "fit.ply", force="mesh")
    assert a.vertices.shape == b.vertices.shape
    assert np.abs(a.vertices - b.vertices).max() < 1e-4 * b.extents.max()


def test_shipped_sdf_checkpoint_codes_a_held_out_mesh_in_a_few_hundred_bytes(tmp_path):
    """The shipped checkpoint's codec is fitted on refined codes, and encode refines by
    default: the never-seen bunny through a 6-bit stream of under 400 bytes decodes to a
    mesh within Chamfer-L1 0.012 of the truth (3 meta-learned steps alone: ~0.07)."""
    from mscn_core.checkpoint import load_checkpoint
    from mscn_core.pipeline import refine_settings

    shipped = Path(__file__).resolve().parents[1] / "plugins/checkpoints/shapes_sdf.safetensors"
    assert refine_settings(load_checkpoint(shipped)) == (300, True)
    stream = tmp_path / "bunny.mscn"
    enc = _ok(_mscn("encode", BUNNY, "--modality", "sdf", "--checkpoint", shipped,
                    "--bits", "6", "-o", stream))
    assert stream.stat().st_size == enc["bytes"] < 400
    assert enc["mean"]["chamfer_l1"] < 0.012, enc["mean"]
    _ok(_mscn("decode", stream, "--checkpoint", shipped, "--resolution", "96",
              "-o", tmp_path / "dec.ply"))
    truth_unit, frame = meshes.normalise(meshes.load_mesh(BUNNY))
    recon = trimesh.load(tmp_path / "dec.ply", force="mesh")
    recon.vertices = frame.to_unit(recon.vertices)  # written in the file's own frame
    assert mesh_metrics(recon, truth_unit, n_points=20000)["chamfer_l1"] < 0.012


def test_sdf_fit_from_scratch_without_a_checkpoint(tmp_path):
    """COIN-style: a fresh small SIREN per item, Adam; a sphere is easy for it."""
    out = tmp_path / "scratch.glb"
    rep = _ok(_mscn("fit", _sphere_file(tmp_path), "--modality", "sdf", "--depth", "3",
                    "--width", "32", "--w0", "10", "--coin-steps", "150", "--coin-lr", "1e-3",
                    "--near-samples", "5000", "--metric-grid", "32", "--resolution", "32",
                    "-o", out))["mean"]
    assert rep["chamfer_l1"] < 0.01 and rep["iou"] > 0.97, rep  # measured 0.0032, 0.995
    scene = trimesh.load(out)
    assert np.allclose(scene.bounds.mean(0), [3.0, -1.0, 2.0], atol=0.05)  # original frame
    r = _mscn("fit", _sphere_file(tmp_path), "--modality", "sdf", "--bits", "6", "-o",
              tmp_path / "x.obj")
    assert "--bits needs a --checkpoint" in _error_line(r)


def test_mesh_view_renders_truth_beside_the_reconstruction(sdf_ckpt, tmp_path):
    recon = tmp_path / "bunny.obj"
    _ok(_mscn("fit", BUNNY, "--checkpoint", sdf_ckpt, *SDF_SMALL, "--resolution", "48",
              "-o", recon))
    png, glb = tmp_path / "bunny.png", tmp_path / "bunny_err.glb"
    r = _mscn("view", "mesh", BUNNY, recon, "-o", png)
    assert r.returncode == 0, r.stderr[-2000:]
    with Image.open(png) as im:
        px = np.asarray(im.convert("RGB")).astype(float)
    assert px.std() > 10  # not blank
    assert _mscn("view", "mesh", BUNNY, recon, "-o", glb).returncode == 0
    colours = trimesh.load(glb, force="mesh").visual.vertex_colors
    assert len(np.unique(colours[:, :3], axis=0)) > 10  # coloured by error distance


# -- voxels -------------------------------------------------------------------------------

def test_voxel_binvox_fit_round_trip_and_view(voxel_ckpt, tmp_path):
    vox = get_modality("voxel")
    (item,) = vox.read(BUNNY, VoxelOptions(resolution=32))
    src = tmp_path / "bunny.binvox"
    meshes.write_binvox(item.occupancy, src, item.frame)
    out = tmp_path / "recon.binvox"
    rep = _ok(_mscn("fit", src, "--checkpoint", voxel_ckpt, "-o", out))["mean"]
    zero = _ok(_mscn("evaluate", src, "--checkpoint", voxel_ckpt, "--steps", "0"))["mean"]
    assert rep["iou"] > zero["iou"] and rep["iou"] > 0.3, (rep, zero)
    assert rep["accuracy"] > 1 - rep["occupied_fraction"]  # beats "all empty"
    (back,) = meshes.read_shapes(out)
    assert back.occupancy.shape == (32, 32, 32)
    assert np.allclose(back.frame.center, item.frame.center, atol=1e-3 * item.frame.scale)
    # the reconstruction as a mesh, at another resolution, in the original frame
    _ok(_mscn("fit", src, "--checkpoint", voxel_ckpt, "--output-resolution", "48",
              "-o", tmp_path / "recon.obj"))
    mesh = trimesh.load(tmp_path / "recon.obj", force="mesh")
    truth_unit, frame = meshes.normalise(meshes.load_mesh(BUNNY))
    mesh.vertices = frame.to_unit(mesh.vertices)
    assert mesh_metrics(mesh, truth_unit, n_points=20000)["chamfer_l1"] < 0.1
    png = tmp_path / "vox.png"
    r = _mscn("view", "voxels", src, out, "-o", png)
    assert r.returncode == 0 and png.stat().st_size > 1000, r.stderr[-2000:]


def test_voxel_imnet_hdf5_of_several_grids_encodes_and_decodes(voxel_ckpt, tmp_path):
    vox = get_modality("voxel")
    grids = [vox.read(meshes.vendored_mesh(n), VoxelOptions(resolution=32))[0].occupancy
             for n in ("bunny00", "pinion", "knot1")]
    src = tmp_path / "three.h5"
    meshes.write_voxels_hdf5(np.stack(grids), src)
    stream = tmp_path / "three.mscn"
    enc = _ok(_mscn("encode", src, "--checkpoint", voxel_ckpt, "-o", stream))
    assert enc["items"] == 3 and enc["values"] == 3 * 32**3
    _ok(_mscn("decode", stream, "--checkpoint", voxel_ckpt, "-o", tmp_path / "out.h5"))
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["voxels"].shape[:4] == (3, 32, 32, 32)
    _ok(_mscn("decode", stream, "--checkpoint", voxel_ckpt, "-o", tmp_path / "out.npz"))
    back = vox.read(tmp_path / "out.npz")
    assert [b.name for b in back] == ["three#0", "three#1", "three#2"]


# -- the CLI on folders and on bad input ----------------------------------------------------

def test_meta_train_takes_a_folder_of_meshes(tmp_path):
    folder = tmp_path / "shapes" / "nested"
    folder.mkdir(parents=True)
    for p in TRAIN[:3]:
        (folder / Path(p).name).write_bytes(Path(p).read_bytes())
    (folder / "notes.txt").write_text("not a mesh")
    rep = _ok(_mscn("meta-train", "--modality", "sdf", "--data", tmp_path / "shapes", *TINY,
                    "--near-samples", "2000", "--metric-grid", "16", "--outer-steps", "2",
                    "-o", tmp_path / "c.safetensors"))
    assert rep["steps_run"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a mesh")
    line = _error_line(_mscn("meta-train", "--modality", "sdf", "--data", empty,
                             "-o", tmp_path / "d.safetensors"))
    assert "no files" in line and "empty" in line


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"\x00\x01garbage\xff" * 50, "bad.obj"),
    (b"v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n", "NaN"),
    (b"v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n", "degenerate"),
])
def test_bad_mesh_files_give_one_line_errors_and_no_output(sdf_ckpt, tmp_path, content,
                                                           message):
    bad = tmp_path / "bad.obj"
    bad.write_bytes(content)
    out = tmp_path / "out.obj"
    line = _error_line(_mscn("fit", bad, "--checkpoint", sdf_ckpt, "-o", out))
    assert message.lower() in line.lower() and "bad.obj" in line
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_an_open_mesh_with_an_ambiguous_inside_is_refused_by_sdf(sdf_ckpt, tmp_path):
    line = _error_line(_mscn("fit", meshes.vendored_mesh("mushroom"), "--checkpoint",
                             sdf_ckpt, "-o", tmp_path / "m.obj"))
    assert "mushroom" in line and "ambiguous" in line
    assert not (tmp_path / "m.obj").exists()


def test_existing_output_is_kept_without_overwrite(sdf_ckpt, tmp_path):
    out = tmp_path / "keep.obj"
    out.write_text("precious")
    line = _error_line(_mscn("fit", BUNNY, "--checkpoint", sdf_ckpt, "-o", out))
    assert "overwrite" in line and out.read_text() == "precious"


@pytest.mark.skipif(meshes.PYTORCH3D_AVAILABLE, reason="checks the message without pytorch3d")
def test_pytorch3d_interop_says_it_is_not_installed():
    """pytorch3d has no wheel here: the conversion refuses in one clear line."""
    with pytest.raises(ImportError, match="pytorch3d is not installed"):
        meshes.to_pytorch3d([])


def test_voxel_decision_level_undoes_the_balanced_prior():
    """Balanced sampling trains at a prior of ``balance``; the decision level moves to the
    item's occupied fraction (Bayes), capped so the occupied target always counts, and
    stays ½ for streams without it. On the held-out bunny, refined with the shipped
    checkpoint, the corrected IoU is higher than at ½."""
    from mscn_core import pipeline as P
    from mscn_core.checkpoint import load_checkpoint
    from mscn_plugins.voxel import LOGIT_SCALE, MAX_SHIFT, occupied_level

    assert occupied_level({}, 0.5) == 0.5
    assert occupied_level({"occupied": 0.5}, 0.5) == pytest.approx(0.5)
    assert occupied_level({"occupied": 0.2}, 0.5) == pytest.approx(0.8)  # odds 4
    cap = 1 / (1 + np.exp(-LOGIT_SCALE * MAX_SHIFT))
    assert occupied_level({"occupied": 1e-6}, 0.5) == pytest.approx(cap) and cap < 1 / (
        1 + np.exp(-LOGIT_SCALE * 0.5))  # below the occupied target's probability
    shipped = Path(__file__).resolve().parents[1] / "plugins/checkpoints/shapes_voxel.safetensors"
    ck = load_checkpoint(shipped)
    m = get_modality("voxel")
    m.load_state(ck.modality_state)
    sig = m.to_signal(m.read(BUNNY)[0])
    assert sig.meta["occupied"] == pytest.approx(0.2005, abs=1e-3)
    codes = P.adapt_codes(ck, m, [sig], points_per_step=16384)
    codes = P.refine_codes(ck, m, [sig], codes, 100, points_per_step=16384)
    pred = P.predictor(ck, m, codes[0])(sig.coords)
    corrected = m.metrics(sig, pred)["iou"]
    sig.meta.pop("occupied")
    assert corrected > m.metrics(sig, pred)["iou"] + 0.01
