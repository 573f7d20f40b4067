"""mscn_viewers.mesh3d: comparison PNGs, voxel diffs, turntables and GLB on vendored meshes.

Both backends are exercised (MSCN_RENDERER=open3d / matplotlib); the open3d ones are skipped
where its offscreen renderer does not work, the forced-crash fallback runs everywhere.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageSequence

from mscn_datasets import vendored_path
from mscn_viewers import mesh3d

ROWS = slice(40, 440)  # panel rows of a (1200, 600) figure without title: no captions/colour bar


@pytest.fixture(scope="module")
def bunny() -> trimesh.Trimesh:
    return trimesh.load(vendored_path("meshes/bunny00.ply"), process=False)


@pytest.fixture(scope="module")
def noisy(bunny) -> trimesh.Trimesh:
    rng = np.random.default_rng(0)
    out = bunny.copy()
    out.vertices = bunny.vertices + rng.normal(0.0, 0.01, bunny.vertices.shape)
    return out


@pytest.fixture
def open3d_backend(monkeypatch):
    ok, why = mesh3d.renderer_available()
    if not ok:
        pytest.skip(f"open3d offscreen renderer unavailable here: {why}")
    monkeypatch.setenv("MSCN_RENDERER", "open3d")


@pytest.fixture
def mpl_backend(monkeypatch):
    monkeypatch.setenv("MSCN_RENDERER", "matplotlib")


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _halves(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = img.shape[1] // 2
    return img[ROWS, :w], img[ROWS, w:2 * w]


def _warm(img: np.ndarray) -> np.ndarray:
    """Yellow/orange/red pixels of the error colour map (the lit greys have r ~ b)."""
    return (img[..., 0] - img[..., 2]) > 60


def _shape(img: np.ndarray) -> np.ndarray:
    return (img < 245).any(-1)


def _check_comparison(tmp_path, bunny, noisy, tag: str) -> None:
    bad = mesh3d.render_comparison(bunny, noisy, tmp_path / f"noisy_{tag}.png",
                                   stats={"chamfer_l1": 0.008, "IoU": 0.9, "bits": 24576})
    img = _rgb(bad)
    assert img.shape == (600, 1200, 3)
    assert img.std() > 20
    left, right = _halves(img)
    assert _warm(left).mean() < 1e-3
    assert _warm(right).sum() > 0.3 * _shape(right).sum()
    assert np.abs(left - right).mean() > 5

    same = mesh3d.render_comparison(bunny, bunny.copy(), tmp_path / f"same_{tag}.png")
    left, right = _halves(_rgb(same))
    assert _warm(right).mean() < 1e-3  # perfect reconstruction: all at the grey low end
    a, b = _shape(left), _shape(right)
    assert (a & b).sum() / (a | b).sum() > 0.97  # same camera, same scale, same silhouette


def test_comparison_matplotlib(tmp_path, bunny, noisy, mpl_backend):
    _check_comparison(tmp_path, bunny, noisy, "mpl")


def test_comparison_open3d(tmp_path, bunny, noisy, open3d_backend):
    _check_comparison(tmp_path, bunny, noisy, "o3d")


def test_child_crash_falls_back_with_one_warning(tmp_path, bunny, noisy, monkeypatch):
    monkeypatch.delenv("MSCN_RENDERER", raising=False)
    monkeypatch.setattr(mesh3d, "_RENDERER_STATE", None)
    monkeypatch.setattr(mesh3d, "_child_command",
                        lambda spec: [sys.executable, "-c", "import os; os.abort()"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mesh3d.render_comparison(bunny, noisy, tmp_path / "fallback.png")
    fallback = mesh3d.RendererFallbackWarning
    msgs = [str(w.message) for w in caught if issubclass(w.category, fallback)]
    assert len(msgs) == 1 and "signal 6" in msgs[0] and "matplotlib" in msgs[0]
    assert _rgb(out).std() > 20
    assert mesh3d.renderer_available()[0] is False  # remembered: later calls skip the child


def test_forced_open3d_failure_raises(tmp_path, bunny, monkeypatch):
    monkeypatch.setenv("MSCN_RENDERER", "open3d")
    monkeypatch.setattr(mesh3d, "_RENDERER_STATE", None)
    monkeypatch.setattr(mesh3d, "_child_command",
                        lambda spec: [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="code 3"):
        mesh3d.render_comparison(bunny, bunny, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("backend", ["matplotlib", "open3d"])
def test_voxel_comparison_shows_fp_red_and_fn_blue(tmp_path, backend, monkeypatch, request):
    request.getfixturevalue("open3d_backend" if backend == "open3d" else "mpl_backend")
    r = 24
    i, j, k = np.indices((r, r, r))
    truth = (i - 11.5) ** 2 + (j - 11.5) ** 2 + (k - 11.5) ** 2 < 8.5**2
    recon = truth.copy()
    recon[(i > 14) & (j < 8)] = False  # missing: the lower +x part (faces the camera)
    recon[14:19, 18:22, 14:19] = True  # extra: a block on top towards the camera
    img = _rgb(mesh3d.render_voxel_comparison(truth, recon, tmp_path / "vox.png",
                                              stats={"IoU": 0.9}))
    left, right = _halves(img)
    red = (right[..., 0] > 150) & (right[..., 1] < 90) & (right[..., 2] < 90)
    blue = (right[..., 2] > 150) & (right[..., 0] < 90)
    assert red.sum() > 200 and blue.sum() > 200
    assert not ((left[..., 0] > 150) & (left[..., 1] < 90)).any()  # truth: grey only
    assert not ((left[..., 2] > 150) & (left[..., 0] < 90)).any()


@pytest.mark.parametrize("backend", ["matplotlib", "open3d"])
def test_turntable_gif(tmp_path, bunny, backend, request):
    request.getfixturevalue("open3d_backend" if backend == "open3d" else "mpl_backend")
    out = mesh3d.turntable_gif(bunny, tmp_path / "turn.gif", frames=10, size=(160, 160))
    with Image.open(out) as im:
        frames = [np.asarray(f.convert("RGB")).astype(np.int16)
                  for f in ImageSequence.Iterator(im)]
        assert im.info.get("loop") == 0
    assert len(frames) == 10
    assert frames[0].shape == (160, 160, 3) and frames[0].std() > 10
    assert np.abs(frames[0] - frames[9]).mean() > 2


def test_glb_round_trip(tmp_path, bunny):
    colors, emax = mesh3d.error_colors(bunny, bunny, error_max=0.05)
    assert emax == 0.05 and colors.shape == (len(bunny.vertices), 4)
    out = mesh3d.export_glb(bunny, tmp_path / "b.glb", vertex_colors=colors)
    back = trimesh.load(out, force="mesh", process=False)
    assert len(back.vertices) == len(bunny.vertices)
    assert np.array_equal(np.asarray(back.visual.vertex_colors), colors)


def test_error_colors_scale(bunny, noisy):
    same, emax = mesh3d.error_colors(bunny, bunny)
    assert emax <= 2e-3  # floor, not float noise blown up to full scale
    assert np.all(same[:, :3] == same[0, :3])  # all the low-end grey
    cols, emax = mesh3d.error_colors(noisy, bunny)
    assert 0.005 < emax < 0.1
    assert (cols[:, 0].astype(int) - cols[:, 2] > 60).mean() > 0.5


def test_existing_output_refused_before_rendering(tmp_path, bunny, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("rendered although the output exists")

    monkeypatch.setattr(mesh3d, "_render_panels", boom)
    occ = np.ones((4, 4, 4), bool)
    calls = {
        "c.png": lambda p: mesh3d.render_comparison(bunny, bunny, p),
        "v.png": lambda p: mesh3d.render_voxel_comparison(occ, occ, p),
        "t.gif": lambda p: mesh3d.turntable_gif(bunny, p),
        "m.glb": lambda p: mesh3d.export_glb(bunny, p),
    }
    for name, call in calls.items():
        p = tmp_path / name
        p.write_bytes(b"keep me")
        with pytest.raises(FileExistsError):
            call(p)
        assert p.read_bytes() == b"keep me"


def test_show_interactive_needs_a_display(bunny, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(RuntimeError, match="^no display: "):
        mesh3d.show_interactive([bunny])


def test_bad_backend_name(tmp_path, bunny, monkeypatch):
    monkeypatch.setenv("MSCN_RENDERER", "vulkan")
    with pytest.raises(ValueError, match="MSCN_RENDERER"):
        mesh3d.render_comparison(bunny, bunny, tmp_path / "x.png")
