"""Encode-time refinement (issue 8 part 4): more Adam steps on the same coded positions.

Real components: the tiny sphere checkpoint meta-trained on ERA5 t 850 hPa
(``tiny_sphere_checkpoint``), real ERA5 fields it never saw (t 500 hPa: unlike its
training set, so refinement has something to do), the real ``mscn`` command.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from clirun import mscn, ok, refused

from mscn_core import pipeline as P
from mscn_core.checkpoint import load_checkpoint
from mscn_core.entropy import estimate_bits
from mscn_core.meta import item_losses
from mscn_core.registry import get_modality
from mscn_core.signals import whole_signal
from mscn_datasets import vendored_path

ERA5 = vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")
T500 = ["--var", "t", "--sel", "isobaricInhPa=500", "--sel", "number=8"]


# t 500 hPa is unlike the tiny checkpoint's training set: the point here, not a surprise
pytestmark = [pytest.mark.filterwarnings("ignore:.*outside the checkpoint's training range"),
              pytest.mark.filterwarnings("ignore:.*far outside this checkpoint's experience")]


@pytest.fixture(scope="module")
def setup(tiny_sphere_checkpoint):
    ck = load_checkpoint(tiny_sphere_checkpoint)
    m = get_modality("sphere")
    m.load_state(ck.modality_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "outside the training range": the point here
        fields = m.read(ERA5, var="t", sel=["isobaricInhPa=500", "number=8"])[:2]
        signals = [m.to_signal(f) for f in fields]
    return ck, m, fields, signals, P.adapt_codes(ck, m, signals)


def _loss(ck, m, signal, code) -> float:
    """The item's own objective on all its points (what keep-best compares)."""
    state = ck.rep.state_from_code(code.reshape(1, -1))
    with torch.no_grad():
        return float(item_losses(ck.rep, m, state, ck.rep.context(1, False),
                                 whole_signal(signal))[0])


@pytest.mark.parametrize("lr", [None, 10.0])  # 10: a rate that diverges; keep-best holds
def test_refinement_never_increases_the_loss_and_keeps_the_support(setup, lr):
    ck, m, _, signals, codes = setup
    refined = P.refine_codes(ck, m, signals, codes, 15, lr)
    assert refined.shape == codes.shape
    for s, c0, c1 in zip(signals, codes, refined, strict=True):
        assert _loss(ck, m, s, c1) <= _loss(ck, m, s, c0)
    if lr is None:  # t 500 hPa is unlike the training set: the default rate improves it
        assert _loss(ck, m, signals[0], refined[0]) < 0.9 * _loss(ck, m, signals[0], codes[0])
    # the support: positions outside the code mask keep the init state's values (zeros)
    mask = ck.rep.code_mask()
    state = ck.rep.state_from_code(refined)
    flat = torch.cat([v.reshape(v.shape[0], -1) for v in state.values()], dim=1)
    init = torch.cat([v.detach().reshape(v.shape[0], -1)
                      for v in ck.rep.init_state(2).values()], dim=1)
    assert torch.equal(flat[:, ~mask], init[:, ~mask])
    assert int(mask.sum()) == refined.shape[1] == ck.rep.code_size()


def test_quantisation_aware_refinement_is_never_worse_nor_bigger(setup):
    ck, m, _, signals, codes = setup
    q, model = P.quantizer(ck, 4)
    refined = P.refine_codes(ck, m, signals, codes, 15, bits=4)
    _, before = P.quantize_codes(ck, codes, 4)
    sym, after = P.quantize_codes(ck, refined, 4)
    sym0, _ = P.quantize_codes(ck, codes, 4)
    for i, s in enumerate(signals):
        assert _loss(ck, m, s, after[i]) <= _loss(ck, m, s, before[i])
        assert estimate_bits(sym[i], model) <= estimate_bits(sym0[i], model) + 1e-6
    lo = q.stats.mean - q.clip_sigma * q.stats.std
    hi = q.stats.mean + q.clip_sigma * q.stats.std
    moved = (refined != codes).numpy()  # what refinement changed lies in the clip range
    r = refined.double().numpy()
    assert np.all((r[moved] >= np.broadcast_to(lo, r.shape)[moved] - 1e-6)
                  & (r[moved] <= np.broadcast_to(hi, r.shape)[moved] + 1e-6))


def test_uncapped_refinement_may_grow_the_payload_but_is_never_worse(setup, tmp_path,
                                                                     tiny_sphere_checkpoint):
    """Without the rate cap (--refine-grow) the kept quantised iterate is at least as good
    as the capped one's (both keep the best, the capped one among fewer candidates);
    the stream still decodes with the unmodified decoder."""
    ck, m, fields, signals, codes = setup
    capped = P.refine_codes(ck, m, signals, codes, 15, bits=4)
    grown = P.refine_codes(ck, m, signals, codes, 15, bits=4, rate_cap=False)
    _, qc = P.quantize_codes(ck, capped, 4)
    _, qg = P.quantize_codes(ck, grown, 4)
    for i, s in enumerate(signals):
        assert _loss(ck, m, s, qg[i]) <= _loss(ck, m, s, qc[i]) + 1e-9
    enc = ok(mscn("encode", ERA5, *T500, "--checkpoint", tiny_sphere_checkpoint, "--bits",
                  4, "--refine-steps", 5, "--refine-grow", "-o", tmp_path / "g.mscn"))
    assert enc["items"] == 4
    assert len(P.decode_stream((tmp_path / "g.mscn").read_bytes(), ck).artifacts) == 4


def test_large_items_refine_on_samples(setup):
    """Items above points_per_step: a seeded draw per step, keep-best on a fixed draw."""
    ck, m, _, signals, codes = setup
    a = P.refine_codes(ck, m, signals, codes, 8, points_per_step=500)
    b = P.refine_codes(ck, m, signals[:1], codes[:1], 8, points_per_step=500)
    assert torch.equal(a[0], b[0])  # reproducible and independent of its neighbours
    assert not torch.equal(a, codes)


def test_stream_decodes_with_the_unmodified_decoder_and_composes_with_a_bound(setup):
    ck, m, fields, signals, _ = setup
    base, _ = P.encode_items(ck, m, fields, bits=6)
    data, rep = P.encode_items(ck, m, fields, bits=6, refine_steps=10)
    dec = P.decode_stream(data, ck)
    assert len(dec.artifacts) == 2 and dec.stream.bits == 6
    assert len(data) <= len(base) + 8  # the rate cap: no bigger (range-coder words aside)
    bound = 0.5
    data, rep = P.encode_items(ck, m, fields, bits=6, refine_steps=10, max_abs_error=bound)
    dec = P.decode_stream(data, ck)
    for f, out in zip(fields, dec.artifacts, strict=True):
        assert float(np.nanmax(np.abs(out.values - f.values))) <= bound
    assert max(b["max_abs_error"] for b in rep.bounds) <= bound


def test_refusals(setup):
    ck, m, fields, signals, codes = setup
    with pytest.raises(ValueError, match="refine_steps"):
        P.encode_items(ck, m, fields, refine_steps=-1)
    with pytest.raises(ValueError, match="refine_lr"):
        P.refine_codes(ck, m, signals, codes, 3, float("nan"))
    coin = P.Checkpoint.__new__(P.Checkpoint)
    from mscn_core.methods import MethodConfig, build_representation
    from mscn_core.siren import SirenConfig

    coin.rep = build_representation(SirenConfig(in_dim=3, out_dim=1, width=8, depth=2),
                                    MethodConfig(method="coin"))
    with pytest.raises(ValueError, match="'coin' has no meta-learned"):
        P.refine_codes(coin, m, signals, codes, 3)
    assert P.refine_codes(coin, m, signals, codes, 0) is codes  # 0: the paper's, any method


def test_cli_fit_and_encode(setup, tiny_sphere_checkpoint, tmp_path):
    ck, m, *_ = setup
    path = tiny_sphere_checkpoint
    fields = m.read(ERA5, var="t", sel=["isobaricInhPa=500", "number=8"])
    signals = [m.to_signal(f) for f in fields]
    codes = P.adapt_codes(ck, m, signals)  # what `fit` without the flag scores
    base = np.mean([m.metrics(s, P.predictor(ck, m, c)(s.coords))["rmse"]
                    for s, c in zip(signals, codes, strict=True)])
    fit = ok(mscn("fit", ERA5, *T500, "--checkpoint", path, "--refine-steps", 20,
                  "--refine-lr", 0.01, "-o", tmp_path / "b.nc"))
    assert fit["mean"]["rmse"] < base
    enc = ok(mscn("encode", ERA5, *T500, "--checkpoint", path, "--refine-steps", 5,
                  "-o", tmp_path / "b.mscn"))
    assert enc["items"] == 4
    assert len(P.decode_stream((tmp_path / "b.mscn").read_bytes(), ck).artifacts) == 4
    line = refused(mscn("fit", ERA5, *T500, "--from-scratch", "--refine-steps", 3,
                        "-o", tmp_path / "c.nc"))
    assert "--checkpoint" in line and "--refine-steps" in line


@pytest.mark.parametrize("command", ["fit", "evaluate", "encode"])
@pytest.mark.parametrize("flag,value", [("--refine-steps", "-1"), ("--refine-steps", "x"),
                                        ("--refine-lr", "0"), ("--refine-lr", "nan"),
                                        ("--refine-lr", "inf")])
def test_bad_values_are_refused_at_parse(command, flag, value, capsys):
    from mscn_core.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser(light=True).parse_args([command, "f.nc", "--checkpoint", "c", "-o",
                                             "o", flag, value])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("method", ["mscn", "metasgd-dense", "functa", "mscn-grad",
                                    "metasparseinr"])
def test_every_meta_learned_method_refines(setup, method):
    """Untrained tiny representations of each method: the code moves, the loss does not rise."""
    from mscn_core.methods import MethodConfig, build_representation
    from mscn_core.siren import SirenConfig

    _, m, _, signals, _ = setup
    ck = P.Checkpoint.__new__(P.Checkpoint)
    ck.rep = build_representation(SirenConfig(in_dim=3, out_dim=1, width=16, depth=3),
                                  MethodConfig(method=method, budget=8, latent_dim=8),
                                  torch.Generator().manual_seed(0))
    codes = P.adapt_codes(ck, m, signals[:1])
    refined = P.refine_codes(ck, m, signals[:1], codes, 10)
    assert refined.shape == codes.shape and not torch.equal(refined, codes)
    assert _loss(ck, m, signals[0], refined[0]) < _loss(ck, m, signals[0], codes[0])


def test_help_states_the_default_rate():
    from mscn_core.cli import build_parser

    sub = next(a for a in build_parser(light=True)._actions if a.dest == "command")
    text = sub.choices["encode"].format_help()
    assert f"default {P.REFINE_LR:g}" in " ".join(text.split())


@pytest.fixture(scope="module")
def refined_codec(setup, tiny_sphere_checkpoint, tmp_path_factory):
    """The tiny checkpoint with its codec refitted on codes after 20 refine steps."""
    from mscn_core.checkpoint import save_checkpoint

    ck, m, *_ = setup
    ck2 = load_checkpoint(tiny_sphere_checkpoint)
    train = [m.to_signal(f) for f in
             m.read(ERA5, var="t", sel=["isobaricInhPa=850", "number=0,1,2,3"])]
    P.fit_codec(ck2, m, train, refine_steps=20)
    path = tmp_path_factory.mktemp("codec") / "refined.safetensors"
    save_checkpoint(ck2, path)
    return load_checkpoint(path), path


def test_codec_fitted_on_refined_codes(setup, refined_codec):
    """Refined codes spread wider than the meta-learned ones: a codec fitted on them has a
    wider clip range, records its steps, and makes them encode's default (rate cap lifted)."""
    ck, *_ = setup
    ck2, _ = refined_codec
    assert ck2.info["codec"]["refine_steps"] == 20 and "refine_steps" not in ck.info["codec"]
    q0, _ = P.quantizer(ck, 6)
    q1, _ = P.quantizer(ck2, 6)
    assert float(np.mean(q1.stats.std)) > float(np.mean(q0.stats.std))
    assert P.refine_settings(ck) == (0, False)
    assert P.refine_settings(ck2) == (20, True)
    assert P.refine_settings(ck2, 0, None) == (0, True)
    assert P.refine_settings(ck2, 5, False) == (5, False)


def test_encode_defaults_to_the_codecs_refinement(setup, refined_codec, tmp_path):
    """`encode` with no refine flags writes the same bytes as the explicit flags, the
    stream decodes, and `--refine-steps 0` is the meta-learned codes' stream."""
    ck2, path = refined_codec
    _, m, fields, *_ = setup
    explicit, _ = P.encode_items(ck2, m, fields, bits=6, refine_steps=20, refine_grow=True)
    default, rep = P.encode_items(ck2, m, fields, bits=6)
    assert default == explicit
    plain, rep0 = P.encode_items(ck2, m, fields, bits=6, refine_steps=0)
    assert plain != default and rep.metrics[0]["rmse"] < rep0.metrics[0]["rmse"]
    enc = ok(mscn("encode", ERA5, *T500, "--checkpoint", path, "-o", tmp_path / "d.mscn"))
    assert enc["items"] == 4
    assert len(P.decode_stream((tmp_path / "d.mscn").read_bytes(), ck2).artifacts) == 4
    off = ok(mscn("encode", ERA5, *T500, "--checkpoint", path, "--refine-steps", 0,
                  "--no-refine-grow", "-o", tmp_path / "z.mscn"))
    assert off["bytes"] != enc["bytes"] or (tmp_path / "z.mscn").read_bytes() != \
        (tmp_path / "d.mscn").read_bytes()
    shown = mscn("inspect", path)
    assert "after 20 refine steps" in shown.stdout



def test_meta_train_fits_the_codec_on_refined_codes(tmp_path):
    """`meta-train --codec-refine-steps N` (a tiny real run): the checkpoint says N, inspect
    shows it, and encode with no refine flag refines N steps (same bytes as explicit)."""
    out = tmp_path / "r.safetensors"
    ok(mscn("meta-train", "--data", ERA5, "--modality", "sphere", "--var", "t", "--sel",
            "isobaricInhPa=850", "--sel", "number=0,1,2,3", "--depth", "3", "--width", "16",
            "--budget", "8", "--outer-steps", "4", "--batch-size", "4", "--points-per-item",
            "128", "--val-every", "2", "--val-points", "256", "--progress", "false",
            "--codec-refine-steps", "4", "-o", out))
    ck = load_checkpoint(out)
    assert ck.info["codec"]["refine_steps"] == 4
    assert ck.info["codec"]["fit_loss"]["items"] == ck.info["n_train"]
    assert "after 4 refine steps" in mscn("inspect", out).stdout
    default = ok(mscn("encode", ERA5, *T500, "--checkpoint", out, "-o", tmp_path / "d.mscn"))
    explicit = ok(mscn("encode", ERA5, *T500, "--checkpoint", out, "--refine-steps", 4,
                       "--refine-grow", "-o", tmp_path / "e.mscn"))
    assert default["bytes"] == explicit["bytes"]
    assert (tmp_path / "d.mscn").read_bytes() == (tmp_path / "e.mscn").read_bytes()
