"""Items far outside a checkpoint's experience warn with the error they will get (issue 8,
bad input): ``fit_codec`` records the spread of the training items' losses after the
meta-learned steps; ``fit``/``encode`` compare each new item with its 95th percentile.

Real components: the tiny sphere checkpoint meta-trained on ERA5 t850 members 0-5, a
held-out member of the same file (familiar), and a checkerboard written as a real NetCDF
file in the training range (unfamiliar), through the real ``mscn`` command.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from clirun import mscn, ok

from mscn_core import pipeline as P
from mscn_core.checkpoint import load_checkpoint
from mscn_core.registry import get_modality
from mscn_datasets import vendored_path

ERA5 = vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")
HELD = ["--var", "t", "--sel", "isobaricInhPa=850", "--sel", "number=8"]
MESSAGE = "far outside this checkpoint's experience"


@pytest.fixture(scope="module")
def setup(tiny_sphere_checkpoint):
    ck = load_checkpoint(tiny_sphere_checkpoint)
    m = get_modality("sphere")
    m.load_state(ck.modality_state)
    held = m.read(ERA5, var="t", sel=["isobaricInhPa=850", "number=8"])
    checker = held[0].copy(data=(250 + 30 * (np.indices(held[0].shape).sum(0) % 2))
                           .astype(held[0].dtype))
    return ck, m, held[0], checker


def test_training_records_the_spread_of_its_items_losses(setup):
    ck, *_ = setup
    rec = ck.info["codec"]["fit_loss"]
    assert 0 < rec["p50"] <= rec["p95"] <= rec["max"] and rec["items"] == ck.info["n_train"]


def test_an_unfamiliar_item_warns_with_its_expected_error_a_familiar_one_does_not(setup):
    ck, m, held, checker = setup
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _, rep = P.encode_items(ck, m, [held, checker], bits=6)
    ours = [str(w.message) for w in seen if MESSAGE in str(w.message)]
    assert len(ours) == 1 and ours[0].startswith("item 2 of 2 ")
    assert rep.metrics[1]["rmse"] > 5 * rep.metrics[0]["rmse"]
    signals = [m.to_signal(f) for f in (held, checker)]
    codes = P.adapt_codes(ck, m, signals)
    fitted = m.metrics(signals[1], P.predictor(ck, m, codes[1])(signals[1].coords))
    assert f"rmse {fitted['rmse']:.4g}" in ours[0]  # the error its unquantised fit gets
    losses = P.fit_losses(ck, m, signals, codes)
    p95 = ck.info["codec"]["fit_loss"]["p95"]
    assert losses[0] < P.UNFAMILIAR_FACTOR * p95 < losses[1]


def test_a_checkpoint_without_the_record_never_warns(setup):
    ck, m, _, checker = setup
    signals = [m.to_signal(checker)]
    losses = P.fit_losses(ck, m, signals, P.adapt_codes(ck, m, signals))
    assert P.unfamiliar(ck, losses) == [(0, pytest.approx(
        float(losses[0]) / ck.info["codec"]["fit_loss"]["p95"]))]
    old = ck.info["codec"].pop("fit_loss")
    try:
        assert P.unfamiliar(ck, losses) == []
    finally:
        ck.info["codec"]["fit_loss"] = old


def test_cli_fit_says_it_in_one_line(setup, tiny_sphere_checkpoint, tmp_path):
    _, _, held, checker = setup
    path = tmp_path / "checker.nc"
    checker.to_dataset(name="t").to_netcdf(path)
    r = mscn("fit", path, "--checkpoint", tiny_sphere_checkpoint, "-o", tmp_path / "c.nc")
    ok(r)
    lines = [x for x in r.stderr.splitlines() if MESSAGE in x]
    assert len(lines) == 1 and "expected error (before quantisation): " in lines[0]
    r = mscn("fit", ERA5, *HELD, "--checkpoint", tiny_sphere_checkpoint, "-o", tmp_path / "h.nc")
    ok(r)
    assert MESSAGE not in r.stderr
