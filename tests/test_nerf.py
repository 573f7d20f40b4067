"""The nerf modality: volume rendering, the held-out-view protocol, and the CLI end to end.

The scenes are the vendored SRN-format **renders of real meshes (datasets/render_srn.py),
not SRN Cars**. Tiny checkpoints are meta-trained for real through the CLI on the
"train" scenes; everything is judged on held-out views of "test" scenes (other meshes),
read at 32×32 to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import mscn
from clirun import ok as _ok
from PIL import Image

from mscn_core.registry import get_modality
from mscn_core.signals import whole_signal
from mscn_core.testing import assert_modality
from mscn_datasets import scenes
from mscn_plugins.nerf import NerfModality, NerfOptions, encode_poses, view_layout, view_rays

VENDORED = Path(scenes.__file__).resolve().parent / "data" / "scenes"
TRAIN, VAL, TEST = VENDORED / "train", VENDORED / "val", VENDORED / "test"
COW, JEEP = TEST / "cow", TEST / "jeep1"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--size", "32", "--orbit-views", "4"]
TINY = ["--depth", "4", "--width", "64", "--budget", "64", "--samples", "16",
        "--batch-size", "4", "--points-per-item", "512", "--rays-per-step", "1024",
        "--outer-lr", "1e-3", "--lr-init-low", "0.05", "--lr-init-high", "0.2",
        "--val-every", "20", "--val-points", "512", "--progress", "false", *SMALL]


def _mscn(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    return mscn(*args, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[int, Path]:
    """The untrained init (0 outer steps) and the same run after 40 outer steps."""
    d = tmp_path_factory.mktemp("nerf")
    out = {}
    for steps in (0, 40):
        out[steps] = d / f"nerf{steps}.safetensors"
        _ok(_mscn("meta-train", "--modality", "nerf", "--data", TRAIN, "--val-data", VAL,
                  *TINY, "--outer-steps", steps, "-o", out[steps]))
    return out


# -- rendering ----------------------------------------------------------------------------

R, SIGMA, COLOUR = 0.4, 4.0, torch.tensor([0.2, 0.4, 0.8])


def _sphere_field(sigma: float):
    """A ball of radius R at the origin: density ``sigma`` inside, none outside."""
    def field(p: torch.Tensor) -> torch.Tensor:
        inside = p.norm(dim=-1, keepdim=True) < R
        raw = torch.where(inside, torch.full_like(p[..., :1], sigma - 0.1),  # elu(x)+0.1
                          torch.full_like(p[..., :1], -1e3))
        return torch.cat([COLOUR.to(p.dtype).expand(*p.shape[:-1], 3), raw], -1)
    return field


def _view(samples: int) -> tuple[NerfModality, torch.Tensor, torch.Tensor]:
    m = NerfModality()
    m.render_cfg["samples"] = samples
    pose = scenes.look_at([0.0, 0.39, 1.24])  # 1.3 from the ball's centre
    rays = torch.from_numpy(view_rays(pose, scenes.Intrinsics(40, 40, 16, 16, 32, 32)))
    o, d = rays[:, :3], rays[:, 3:]
    u = d / d.norm(dim=1, keepdim=True)
    miss2 = (o - (o * u).sum(1, keepdim=True) * u).pow(2).sum(1)  # closest approach²
    chord = 2 * (R**2 - miss2).clamp_min(0).sqrt()
    return m, rays.float(), chord


def test_volume_rendering_of_a_ball_matches_the_analytic_image():
    """Colour c with transmittance exp(−σ·chord) over white: the emission–absorption
    integral in closed form; the quadrature error falls like 1/samples."""
    errors = {}
    for s in (32, 128, 512):
        m, rays, chord = _view(s)
        with torch.no_grad():
            out = m.render(_sphere_field(SIGMA), rays[None])[0].double()
        trans = torch.exp(-SIGMA * chord)[:, None]
        expected = COLOUR.double() * (1 - trans) + trans
        errors[s] = (out - expected).abs()
    assert float(errors[512].max()) < 0.004  # measured 0.0020
    assert float(errors[32].mean()) < 0.005  # measured 0.0022 (functa's 32 samples)
    assert float(errors[512].mean()) < float(errors[128].mean()) < float(errors[32].mean())
    assert 0.1 < float((chord > 0).double().mean()) < 0.6  # the ball fills part of the view


def test_an_opaque_ball_has_an_exact_silhouette_and_the_right_depth():
    m, rays, chord = _view(512)
    coords = torch.cat([rays, torch.ones(len(rays), 1)], 1)[None]  # 7th column: depth too
    with torch.no_grad():
        out = m.render(_sphere_field(10.0), coords)[0].double()  # functa's max density
    rgb, depth, acc = out[:, :3], out[:, 3], out[:, 4]
    outside = chord == 0
    assert torch.allclose(rgb[outside], torch.ones_like(rgb[outside]), atol=1e-6)
    assert float(acc[outside].max()) < 1e-6
    deep = chord > 0.6
    assert torch.allclose(rgb[deep], COLOUR.double().expand_as(rgb[deep]), atol=0.01)
    # the central ray meets the ball 0.9 away; density 10 adds a mean free path of 0.1;
    # depth is t, distance / |d| (|d| = 1 on the optical axis)
    centre = 16 * 32 + 16
    expect = (1.3 - R + 0.1) / float(rays[centre, 3:].double().norm())
    assert abs(float(depth[centre]) - expect) < 0.005


def test_stratified_samples_stay_in_their_bins_and_are_seeded_by_the_batch():
    m, rays, _ = _view(32)
    m.render_cfg["stratified"] = True
    seen = []

    def field(p: torch.Tensor) -> torch.Tensor:
        seen.append(p.detach().clone())
        return _sphere_field(SIGMA)(p)

    with torch.enable_grad():  # jitter happens while adapting only
        a = m.render(field, rays[None, :64])
        b = m.render(field, rays[None, :64])
    with torch.no_grad():
        c = m.render(field, rays[None, :64])
    assert torch.equal(a, b)  # the same batch, the same jitter
    o, d = rays[:64, :3], rays[:64, 3:]
    t = [((p.reshape(64, 32, 3) - o[:, None]) / d[:, None]).mean(-1) for p in seen]
    edges = torch.linspace(0.8, 1.8, 32)
    mids = (edges[1:] + edges[:-1]) / 2
    lo, hi = torch.cat([edges[:1], mids]), torch.cat([mids, edges[-1:]])
    assert bool(((t[0] >= lo - 1e-5) & (t[0] <= hi + 1e-5)).all())
    assert float((t[0] - edges).abs().max()) > 1e-3  # jittered
    assert torch.allclose(t[2], edges.expand(64, 32), atol=1e-5)  # evaluation: even
    assert float((a - c).abs().mean()) < 0.02


# -- the protocol ------------------------------------------------------------------------

def test_only_context_rays_are_sampled_and_held_out_views_are_scored():
    m = get_modality("nerf")
    o = NerfOptions(size=16, samples=8)
    (cow,) = m.read(COW, o)
    s = m.to_signal(cow, o)
    assert view_layout(s.meta)[1:] == ([63], [23, 55, 82, 119], True)
    hw = 16 * 16
    assert s.coords.shape == (5 * hw, 6) and int(s.mask.sum()) == hw and bool(s.mask[:hw].all())
    assert m.n_values(s) == hw  # bits per value count the context pixels
    coords, targets, w = m.sample(s, 400, torch.Generator().manual_seed(3))
    ctx = {tuple(r) for r in s.coords[:hw].tolist()}
    assert all(tuple(r) in ctx for r in coords.tolist())
    assert torch.equal(coords, m.sample(s, 400, torch.Generator().manual_seed(3))[0])
    # a whole-signal batch gives the held-out rays no weight
    assert float(whole_signal(s).weights[0, hw:].sum()) == 0
    # a training scene: all 50 views are context; a step draws V = 8 views, n/V rays each
    (bull,) = m.read(TRAIN / "bull", o)
    t = m.to_signal(bull, o)
    _, ctx, scored, heldout = view_layout(t.meta)
    assert len(ctx) == 50 and scored == ctx and not heldout and "context" not in t.meta
    coords, _, _ = m.sample(t, 800, torch.Generator().manual_seed(0))
    centres, counts = torch.unique(coords[:, :3].round(decimals=4), dim=0, return_counts=True)
    assert len(centres) == 8 and set(counts.tolist()) == {100}
    # functa's second protocol: context 63 and 127
    o2 = NerfOptions(size=16, context_views=[63, 127])
    s2 = m.to_signal(cow, o2)
    assert view_layout(s2.meta)[1] == [63, 127] and m.n_values(s2) == 2 * hw
    with pytest.raises(ValueError, match="missing"):
        m.to_signal(bull, NerfOptions(protocol="heldout"))


def test_the_modality_passes_the_contract_checker(tmp_path):
    m = get_modality("nerf")
    o = NerfOptions(size=16, samples=8, orbit_views=2)
    assert_modality(m, m.read(COW, o) + m.read(JEEP, o), tmp_dir=tmp_path, options=o)


# -- meta-learning, fitting, the codec and the viewer through the CLI ----------------------

def test_meta_training_lowers_the_novel_view_error_of_unseen_scenes(ckpts):
    held = [TEST / n for n in ("cow", "jeep1", "bunny00")]
    before = _ok(_mscn("evaluate", *held, "--checkpoint", ckpts[0], *SMALL, "-v"))
    after = _ok(_mscn("evaluate", *held, "--checkpoint", ckpts[40], *SMALL, "-v"))
    assert after["mean"]["heldout"] == 1.0 and after["mean"]["views_scored"] == 4.0
    # measured: 10.8 dB -> 14.5 dB mean novel-view PSNR
    assert after["mean"]["psnr"] > before["mean"]["psnr"] + 2.0, (before["mean"],
                                                                 after["mean"])
    for a, b in zip(after["per_item"], before["per_item"], strict=True):
        assert a["mse"] < b["mse"], (a, b)


def test_fit_renders_held_out_views_and_the_viewer_shows_them(ckpts, tmp_path):
    out = tmp_path / "jeep_views"
    rep = _ok(_mscn("fit", JEEP, "--checkpoint", ckpts[40], *SMALL, "-o", out))["mean"]
    assert rep["heldout"] == 1.0 and 8 < rep["psnr"] < 40
    rendered = scenes.read_srn(out)
    assert rendered.view_ids == [23, 55, 82, 119] and rendered.depths is not None
    assert rendered.orbit is not None and len(rendered.orbit) == 4
    assert rendered.info["context_views"] == [63]
    truth = scenes.read_srn(JEEP, size=32)
    mse = np.mean((rendered.images - truth.images[[truth.index(v) for v in
                                                   rendered.view_ids]]) ** 2, axis=(1, 2, 3))
    # the PSNR fit printed is the PSNR of the written views (8-bit PNGs)
    assert np.mean(-10 * np.log10(mse)) == pytest.approx(rep["psnr"], abs=0.1)
    png, gif = tmp_path / "jeep.png", tmp_path / "jeep.gif"
    r = _mscn("view", JEEP, out, "--size", "32", "-o", png, "--gif", gif)
    assert r.returncode == 0, r.stderr[-2000:]
    with Image.open(png) as im:
        px = np.asarray(im.convert("RGB")).astype(float)
    assert px.std() > 20 and min(px.shape[:2]) > 300
    with Image.open(gif) as im:
        assert im.n_frames == 4
    # outputs are never clobbered unasked
    r = _mscn("fit", JEEP, "--checkpoint", ckpts[40], *SMALL, "-o", out)
    assert r.returncode == 2 and "jeep_views" in r.stderr.splitlines()[-1]
    assert scenes.read_srn(out).view_ids == [23, 55, 82, 119]


def test_encode_decode_round_trip_matches_fit_at_the_same_bits(ckpts, tmp_path):
    stream = tmp_path / "cow.mscn"
    enc = _ok(_mscn("encode", COW, "--checkpoint", ckpts[40], *SMALL, "--bits", "6",
                    "-o", stream))
    assert enc["values"] == 32 * 32  # one context view's pixels
    assert enc["bits_per_value"] == pytest.approx(8 * stream.stat().st_size / 1024)
    # 64 modulations at 6 bits are 48 bytes raw; the entropy model of this 40-step toy
    # checkpoint is poor (60-68 bytes, depending on the batches drawn), never 1.5x raw
    assert enc["payload_bytes"] <= 72
    dec = _ok(_mscn("decode", stream, "--checkpoint", ckpts[40], "--orbit-views", "4",
                    "-o", tmp_path / "dec"))
    assert dec["modality"] == "nerf"
    _ok(_mscn("fit", COW, "--checkpoint", ckpts[40], *SMALL, "--bits", "6",
              "-o", tmp_path / "fit"))
    a, b = scenes.read_srn(tmp_path / "dec"), scenes.read_srn(tmp_path / "fit")
    assert a.view_ids == b.view_ids == [23, 55, 82, 119]
    assert np.allclose(a.poses, b.poses, atol=1e-6)
    assert np.abs(a.images - b.images).max() <= 1 / 255 + 1e-6
    assert np.abs(a.orbit.images - b.orbit.images).max() <= 1 / 255 + 1e-6


def test_the_orbit_circles_the_scene_around_its_up_axis():
    """From one context view (SRN's 63 at 22.6° on the spiral) or two: +y up, radius
    1.3 around the origin, the context camera's elevation, every camera aimed at it."""
    from mscn_plugins.nerf import orbit_frame

    (jeep,) = get_modality("nerf").read(JEEP)
    for ctx in ([63], [63, 127]):
        f = orbit_frame(jeep.poses[[jeep.index(v) for v in ctx]], 0.8, 1.8)
        assert np.allclose(f["up"], [0, 1, 0], atol=1e-6)
        assert np.allclose(f["target"], 0, atol=1e-6) and f["radius"] == pytest.approx(1.3)
    f = orbit_frame(jeep.poses[[jeep.index(63)]], 0.8, 1.8)
    assert f["elevation"] == pytest.approx(5 + 70 * 63 / 250, abs=1e-3)
    poses = scenes.orbit_poses(6, f["radius"], f["elevation"], f["up"], f["target"],
                               f["start"])
    assert np.allclose(poses[0], jeep.poses[jeep.index(63)], atol=1e-6)  # starts there
    assert np.allclose(poses[:, 1, 3], poses[0, 1, 3])  # level: constant height
    assert np.allclose(np.linalg.norm(poses[:, :3, 3], axis=1), 1.3)


def test_forged_stream_metadata_is_refused_before_rendering():
    """check_meta sees every claim a stream makes (poses, sizes, orbit) and says which."""
    m = get_modality("nerf")
    o = NerfOptions(size=16, orbit_views=2)
    (cow,) = m.read(COW, o)
    s = m.to_signal(cow, o)
    good = json.loads(json.dumps(dict(s.meta, template=m.item_template(cow, o),
                                      n_values=m.n_values(s))))
    assert m.check_meta(good, o) == 4 * (4 * 16 * 16 + 2 * 16 * 16)

    def forged(path: str, value: object) -> dict:
        meta = json.loads(json.dumps(good))
        *keys, last = path.split(".")
        d = meta
        for k in keys:
            d = d[int(k)] if isinstance(d, list) else d[k]
        d[int(last) if isinstance(d, list) else last] = value
        return meta

    cases = {"template.poses": ("AAAA", "poses must be 3"),
             "intrinsics.0": (10**6, "height"),
             "intrinsics.2": (float("nan"), "fx"),
             "intrinsics": ([64, 64], "intrinsics must be"),
             "views": (list(range(5000)), "views"),
             "context": ("63", "context"),
             "orbit.9": (0.0, "radius"),
             "orbit.4": (0, "up"),
             "orbit.0": (float("inf"), "orbit"),
             "name": (7, "name")}
    for path, (value, word) in cases.items():
        with pytest.raises(ValueError, match=word):
            m.check_meta(forged(path, value), o)
    scaled = np.tile(np.diag([2.0, 2, 2, 1]), (4, 1, 1))  # not a rigid pose
    scaled[:, :3, 3] = [0.0, 0.0, 1.3]
    assert len(encode_poses(scaled, [0, 0, 0], [0, 1, 0])) == 4 * 12
    with pytest.raises(ValueError, match="not a rigid"):
        m.check_meta(forged("template.poses", encode_poses(scaled, [0, 0, 0], [0, 1, 0])), o)
    # a look-at camera at the target has no direction
    with pytest.raises(ValueError, match="no direction"):
        m.check_meta(forged("template.poses", [0] * 12), o)
    # streams of the first layout are refused in one line, not misread
    old = dict(good, intrinsics={"fx": 16.4, "fy": 16.4, "cx": 8.0, "cy": 8.0, "height": 16,
                                 "width": 16}, scored_views=[23, 55, 82, 119])
    with pytest.raises(ValueError, match="earlier header layout"):
        m.check_meta(old, o)


def test_scored_poses_travel_as_camera_centres_and_decode_to_the_same_poses():
    """SRN cameras are look-at cameras of the orbit's target: 3 numbers per view at
    float32 precision (the base64 of float32 3×4 matrices was 48 bytes), decoding to the
    file's poses within 1e-7; a rolled camera falls back to its 12 numbers."""
    from mscn_plugins.nerf import decode_orbit, decode_poses

    m = get_modality("nerf")
    (cow,) = m.read(COW)
    s, t = m.to_signal(cow), m.item_template(cow)
    meta = json.loads(json.dumps(dict(s.meta, template=t)))
    assert meta["intrinsics"] == [64, 64, 65.625] and len(meta["orbit"]) == 11
    assert len(meta["template"]["poses"]) == 4 * 3
    orbit = decode_orbit(meta["orbit"])
    poses = decode_poses(meta["template"]["poses"], 4, orbit["target"], orbit["up"])
    truth = cow.poses[[cow.index(v) for v in (23, 55, 82, 119)]]
    assert np.abs(poses - truth).max() < 1e-7
    rolled = truth.copy()
    rolled[0, :3, :3] = rolled[0, :3, :3] @ np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    flat = encode_poses(rolled, orbit["target"], orbit["up"])
    assert len(flat) == 4 * 12
    assert np.abs(decode_poses(flat, 4, orbit["target"], orbit["up"]) - rolled).max() < 1e-7


@pytest.mark.parametrize("n, expect", [
    (6, [0, 1, 2, 3, 4, 5]),                       # fits in the row
    (12, [0, 2, 4, 6, 8, 10]),                     # every 60°
    (24, [0, 3, 6, 9, 12, 15, 18, 21]),            # every 45°
    (11, [0, 1, 3, 4, 6, 7, 8, 10]),               # no divisor: nearest of even angles
])
def test_orbit_row_shows_evenly_spaced_views(n, expect):
    from mscn_viewers.nerf_views import orbit_indices

    got = orbit_indices(n, 8)
    assert got == expect
    steps = np.diff(got + [got[0] + n])
    assert steps.max() - steps.min() <= 1  # never a gap twice another
