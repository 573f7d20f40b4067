"""Error-bounded streams, per-item decoding, skill scores and provenance (issue 13).

Real components throughout: the example image plugin (imported from the example's source,
registered for the CLI through a throw-away ``.dist-info`` on ``PYTHONPATH``, not pip),
a tiny meta-learned checkpoint trained here, real PNG crops from the repository, the
real ``mscn`` command in child processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mscn-image-plugin"
TEST_PNGS = sorted((EXAMPLE / "data" / "test").glob("*.png"))
TRAIN_PNGS = sorted((EXAMPLE / "data" / "train").glob("*.png"))
NAME = "image_bounded_test"  # not "image": an installed example plugin must not clash
sys.path.insert(0, str(EXAMPLE))

from mscn_image_plugin import ImageModality  # noqa: E402

from mscn_core import bitstream as bs  # noqa: E402
from mscn_core import pipeline as P  # noqa: E402
from mscn_core import residual as R  # noqa: E402
from mscn_core.signals import Signal  # noqa: E402


class Img(ImageModality):
    name = NAME


@pytest.fixture(scope="module")
def modality() -> Img:
    return Img()


@pytest.fixture(scope="module")
def ckpt(modality, tmp_path_factory):
    """A tiny real checkpoint (3x32 SIREN, 80 outer steps: ~2 s on one thread)."""
    from mscn_core.checkpoint import save_checkpoint
    from mscn_core.meta import TrainConfig
    from mscn_core.methods import MethodConfig
    from mscn_core.siren import SirenConfig

    torch.set_num_threads(1)
    train = [modality.read(p)[0] for p in TRAIN_PNGS[:12]]
    val = [modality.read(p)[0] for p in TRAIN_PNGS[12:14]]
    ck = P.train_checkpoint(
        modality, train, val, SirenConfig(depth=3, width=32, w0=10.0, w0_first=10.0),
        MethodConfig(budget=64, lr_init_low=0.3, lr_init_high=0.9),
        TrainConfig(outer_steps=80, outer_lr=3e-3, batch_size=4, points_per_item=256,
                    val_every=40, progress=False))
    path = tmp_path_factory.mktemp("bounded") / "image.safetensors"
    save_checkpoint(ck, path)
    from mscn_core.checkpoint import load_checkpoint

    return load_checkpoint(path), path


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """PYTHONPATH with the example's source and an entry point for ``Img`` (no pip)."""
    site = tmp_path_factory.mktemp("site")
    (site / "bounded_test_image.py").write_text(
        "from mscn_image_plugin import ImageModality\n\n\n"
        f"class Img(ImageModality):\n    name = {NAME!r}\n")
    info = site / "mscn_bounded_test_image-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mscn-bounded-test-image\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[mscn.modalities]\n{NAME} = bounded_test_image:Img\n")
    path = os.pathsep.join([str(site), str(EXAMPLE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _mscn(env: dict, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mscn_core", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int64)


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


# -- the bound, through the CLI, on real PNGs ------------------------------------------
def test_cli_bound_holds_at_every_pixel_and_provenance(ckpt, env, tmp_path):
    _, path = ckpt
    png = TEST_PNGS[0]
    stream, out = tmp_path / "a.mscn", tmp_path / "a.png"
    enc = _mscn(env, "encode", png, "--checkpoint", path, "--max-abs-error", 3,
                "-o", stream)
    assert enc.returncode == 0, enc.stderr
    report = json.loads(enc.stdout)
    assert report["error_bound"] == 3 and report["max_abs_error"] <= 3 - 0.5
    assert 0 < report["residual_bytes"] < report["bytes"]
    dec = _mscn(env, "decode", stream, "--checkpoint", path, "-o", out)
    assert dec.returncode == 0, dec.stderr
    err = np.abs(_pixels(out) - _pixels(png))
    assert err.max() <= 3, err.max()
    with Image.open(out) as im:  # provenance: the plugin keeps it as PNG text
        text = dict(im.text)
    assert text["mscn_max_abs_error"] == "3.0"
    assert text["mscn_command"].startswith("mscn decode ") and str(stream) in \
        text["mscn_command"]
    assert float(text["mscn_bits_per_value"]) == pytest.approx(8 * stream.stat().st_size /
                                                               (32 * 32))
    # relative: E = R x (max - min) of the item's values, in pixel levels
    enc = _mscn(env, "encode", png, "--checkpoint", path, "--max-rel-error", 0.02,
                "-o", tmp_path / "r.mscn")
    assert enc.returncode == 0, enc.stderr
    x = _pixels(png)
    bound = 0.02 * (x.max() - x.min())
    assert json.loads(enc.stdout)["error_bound"] == pytest.approx(bound)
    assert _mscn(env, "decode", tmp_path / "r.mscn", "--checkpoint", path, "-o",
                 tmp_path / "r.png").returncode == 0
    assert np.abs(_pixels(tmp_path / "r.png") - x).max() <= bound


def test_cli_refusals_are_one_line(ckpt, env, tmp_path):
    _, path = ckpt
    png, stream = TEST_PNGS[1], tmp_path / "b.mscn"
    for bad in (["--max-abs-error", "0"], ["--max-abs-error", "nan"],
                ["--max-rel-error", "-1"], ["--max-abs-error", "1", "--max-rel-error", "1"]):
        r = _mscn(env, "encode", png, "--checkpoint", path, *bad, "-o", stream)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    # below what 8-bit output can guarantee (half a level plus float slack)
    _one_line_error(_mscn(env, "encode", png, "--checkpoint", path, "--max-abs-error",
                          0.5, "-o", stream), "below what this output can guarantee")
    assert not stream.exists()
    assert _mscn(env, "encode", png, "--checkpoint", path, "--max-abs-error", 2,
                 "-o", stream).returncode == 0
    _one_line_error(_mscn(env, "decode", stream, "--checkpoint", path, "--size", 16,
                          "-o", tmp_path / "c.png"), "on its own 1024 points")


def test_modality_without_value_scale_refuses(ckpt, modality):
    ck, _ = ckpt

    class Plain(Img):
        value_scale = None

    with pytest.raises(R.BoundError, match="has no value_scale"):
        P.encode_items(ck, Plain(), [modality.read(TEST_PNGS[0])[0]], max_abs_error=1.0)


# -- library: several items, decode_item, forged residuals ---------------------------------
@pytest.fixture(scope="module")
def bounded(ckpt, modality):
    ck, _ = ckpt
    items = [modality.read(p)[0] for p in TEST_PNGS[:3]]
    data, rep = P.encode_items(ck, modality, items, max_abs_error=4.0)
    return ck, items, data, rep


def test_bound_and_decode_item(bounded, modality):
    ck, items, data, rep = bounded
    assert data[4:6] == (2).to_bytes(2, "little")  # format 2: old readers refuse it cleanly
    assert len(rep.bounds) == 3 and all(b["max_abs_error"] <= 3.5 for b in rep.bounds)
    decoded = P.decode_stream(data, ck, modality=modality)
    assert decoded.max_abs_error == 4.0
    for i, (item, art) in enumerate(zip(items, decoded.artifacts, strict=True)):
        assert np.abs(art.astype(int) - item.pixels.astype(int)).max() <= 4
        again = P.decode_item(decoded.stream, i, ck, modality)
        assert np.array_equal(again, art)
    plain, _ = P.encode_items(ck, modality, items, with_metrics=False)
    assert plain[4:6] == (1).to_bytes(2, "little") and len(plain) < len(data)
    stream = bs.read_bitstream(plain)
    dec = P.decode_stream(plain, ck, modality=modality).artifacts
    assert all(np.array_equal(P.decode_item(stream, i, ck, modality), a)
               for i, a in enumerate(dec))


def _forge(data: bytes, change, version: int = 2) -> bytes:
    s = bs.read_bitstream(data)
    common = s.extra.get("common", {})
    metas = [P.merge_common(common, m) for m in s.items_meta]
    payloads = list(s.payloads)
    change(metas[0], payloads)
    return bs.write_bitstream(checkpoint_hash=s.checkpoint_hash, modality=s.modality,
                              bits=s.bits, items_meta=metas, payloads=payloads, version=version)


def _res(key, value):
    return lambda meta, payloads: meta["residual"].__setitem__(key, value)


FORGED = {
    # a histogram's counts no longer add up; a Laplace's symbols run out of words
    "count mismatch": (_res("points", 1025), ("residual counts add up to",
                                              "trailing data", "decoding failed")),
    "huge points": (_res("points", 1 << 40), "residual points must be"),
    "bytes beyond payload": (_res("bytes", 1 << 20), "residual bytes must be"),
    "bytes not words": (_res("bytes", 6), "multiple of 4"),
    "nan step": (_res("step", float("nan")), "residual step must be a finite"),
    "negative step": (_res("step", -1.0), "residual step must be in"),
    "unknown model": (_res("model", "zip"), "residual model must be one of"),
    "not an object": (lambda m, p: m.__setitem__("residual", [1, 2]), "residual must be"),
    "table too long": (lambda m, p: m["residual"].update(model="hist", max=1 << 21),
                       "residual counts must be a list"),
    "delta not a bool": (_res("delta", 2), "residual delta must be"),
    "laplace scale": (lambda m, p: m["residual"].update(model="laplace", mean=0.0,
                                                        scale=0.0), "scale"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_residual_metadata_is_refused_in_one_line(bounded, modality, case):
    ck, _, data, _ = bounded
    change, words = FORGED[case]
    forged = _forge(data, change)
    with pytest.raises(bs.BitstreamError) as err:
        P.decode_stream(forged, ck, modality=modality)
    msg = str(err.value)
    words = (words,) if isinstance(words, str) else words
    assert "\n" not in msg and msg.startswith("item 0: ") and any(w in msg for w in words), msg


def test_residual_in_a_version_1_stream_and_corrupt_words(bounded, modality):
    ck, _, data, _ = bounded
    with pytest.raises(bs.BitstreamError, match="a residual in a format-1 stream"):
        P.decode_stream(_forge(data, lambda m, p: None, version=1), ck, modality=modality)

    def flip(meta, payloads):  # residual words replaced: decoding must fail, one line
        n = meta["residual"]["bytes"]
        payloads[0] = payloads[0][:-n] + b"\xff" * n

    with pytest.raises(bs.BitstreamError, match=r"^item 0: [^\n]*$"):
        P.decode_stream(_forge(data, flip), ck, modality=modality)


def test_residual_coder_round_trips_and_picks_the_cheaper_model():
    rng = np.random.default_rng(0)
    for q in (np.zeros(50, int), rng.laplace(0, 3, 5000).round().astype(int),
              np.array([-(1 << 22), 1 << 22, 0, 0])):
        meta, data = R.encode_residual(q)
        meta.update(points=q.size, channels=1)
        assert np.array_equal(R.decode_residual(meta, data), q)
    meta, _ = R.encode_residual(rng.laplace(0, 3, 5000).round().astype(int))
    assert meta["model"] == "laplace"  # 2 parameters beat a table on Laplace data


def test_quantize_meets_the_bound_and_refuses_tiny_ones():
    rng = np.random.default_rng(1)
    t = rng.random((1000, 2)).astype(np.float32).astype(np.float64)
    p = t + rng.normal(0, 0.05, t.shape)
    valid = np.ones(1000, bool)
    valid[::7] = False
    q, step, err = R.quantize(t, p, valid, 300.0, 0.3, 0.0)
    dec = p + q * step
    assert np.abs(dec - t)[valid].max() * 300 <= 0.3 and err <= 0.3
    assert (q[~valid] == 0).all()
    with pytest.raises(R.BoundError, match="below what this output can guarantee"):
        R.quantize(t, p, valid, 300.0, 0.3, 1.0)  # 8-bit-like output: half a unit lost


# -- skill scores ------------------------------------------------------------------------------
def test_skill_against_climatology_of_a_group():
    coords = torch.zeros(4, 2)
    sig = [Signal(coords, torch.full((4, 1), v)) for v in (1.0, 3.0, 5.0)]
    clim = P.group_mean_mse(sig, ["a", "a", None])
    assert clim == [1.0, 1.0, None]  # climatology 2: each item 1 away; no group: none
    assert P.group_mean_mse(sig[:1], ["a"]) == [None]  # a group of one
    perfect = P.skill(P.target_mse(sig[0], sig[0].targets), clim[0])
    as_clim = P.skill(P.target_mse(sig[0], torch.full((4, 1), 2.0)), clim[0])
    assert (perfect, as_clim) == (1.0, 0.0)
    same = [Signal(coords, torch.full((4, 1), 2.0)) for _ in range(2)]
    assert P.group_mean_mse(same, [0, 0]) == [0.0, 0.0]
    assert P.skill(0.1, 0.0) is None  # a constant group: climatology is perfect, no score
    masked = Signal(coords, torch.tensor([[1.0], [9.0], [1.0], [1.0]]),
                    torch.tensor([True, False, True, True]))
    assert P.group_mean_mse([masked, sig[0]], [1, 1]) == [0.0, 0.0]  # masked value unused


def test_evaluate_reports_skill(ckpt, env, tmp_path):
    _, path = ckpt
    r = _mscn(env, "evaluate", *TEST_PNGS[:4], "--checkpoint", path, "-v")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    for row in report["per_item"]:
        assert 0 < row["skill_vs_training_mean"] <= 1  # adaptation beats the mean image
        assert row["skill_vs_climatology"] <= 1
    mean = report["mean"]
    assert mean["skill_vs_training_mean"] == pytest.approx(
        np.mean([row["skill_vs_training_mean"] for row in report["per_item"]]))
    assert "skill_vs_climatology" in mean


def test_contract_checker_covers_the_capabilities(modality, tmp_path):
    from mscn_core.testing import check_modality

    items = [modality.read(p)[0] for p in TEST_PNGS[:2]]
    assert [v for v in check_modality(modality, items, tmp_dir=tmp_path)
            if v.severity == "error"] == []

    class Regrids(Img):
        def reconstruct(self, meta, predict, options=None, template=None):
            return super().reconstruct(meta, predict, replace(options or self.options(),
                                                              size=8), template)

    found = check_modality(Regrids(), items, tmp_dir=tmp_path / "r")
    assert any(v.clause == "C18" and "signal's 1024 points" in v.message for v in found)
