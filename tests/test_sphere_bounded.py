"""Error bounds and error statistics as a climate user asks for them, through the real CLI
on held-out ERA5 fields: the bound holds at every cell of the written NetCDF, reports
carry max error and bias, and ``evaluate`` scores skill against references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from clirun import mscn, ok, refused

from mscn_datasets import vendored_path

ROOT = Path(__file__).resolve().parents[1]
ERA5 = vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")
COADS = vendored_path("coads_sst_airt_2deg_jan-mar.nc")
CKPT = ROOT / "plugins" / "checkpoints" / "era5_t850.safetensors"
HELD = ["--var", "t", "--sel", "number=8", "--sel", "isobaricInhPa=850"]


def _truth(sel: dict, var: str = "t", path=ERA5) -> np.ndarray:
    with xr.open_dataset(path) as ds:
        return ds[var].sel(sel).values.astype(np.float64)


@pytest.mark.parametrize("flag,value", [("--max-abs-error", "0.25"),
                                        ("--max-rel-error", "0.002")])
def test_bound_holds_at_every_cell_of_the_decoded_file(tmp_path, flag, value):
    stream, out = tmp_path / "t.mscn", tmp_path / "t.nc"
    plain = ok(mscn("encode", ERA5, *HELD, "--checkpoint", CKPT, "-o", tmp_path / "p.mscn"))
    rep = ok(mscn("encode", ERA5, *HELD, "--checkpoint", CKPT, flag, value, "-o", stream))
    ok(mscn("decode", stream, "--checkpoint", CKPT, "-o", out))
    truth = _truth({"number": 8, "isobaricInhPa": 850})
    with xr.open_dataset(out) as got:
        err = np.abs(got["t"].values.astype(np.float64) - truth)
        bound = float(value) if flag == "--max-abs-error" else None
        if bound is None:  # relative to each field's own value range
            span = truth.max(axis=(1, 2)) - truth.min(axis=(1, 2))
            bound = float(value) * span[:, None, None]
        assert np.all(err <= bound), float(np.max(err - bound))
        assert "max abs error" in got.attrs["history"].split("\n")[0]
    # the 3-step fit alone misses by kelvins; the residual costs bytes, all counted
    assert plain["mean"]["max_abs_error"] > 1.0
    assert rep["bytes"] > plain["bytes"]


def test_bound_below_float32_output_precision_is_refused(tmp_path):
    out = tmp_path / "t.mscn"
    line = refused(mscn("encode", ERA5, *HELD, "--checkpoint", CKPT, "--max-abs-error",
                        "1e-6", "-o", out))
    assert "1e-06" in line or "1e-6" in line, line
    assert not out.exists()


def test_bounded_stream_refuses_another_grid(tmp_path):
    stream = tmp_path / "t.mscn"
    ok(mscn("encode", ERA5, *HELD, "--checkpoint", CKPT, "--max-abs-error", "0.5",
            "-o", stream))
    line = refused(mscn("decode", stream, "--checkpoint", CKPT, "--resolution", "6",
                        "-o", tmp_path / "x.nc"))
    assert "resolution" in line


def test_reports_carry_max_error_and_bias_and_skill(tmp_path):
    """Max error and bias agree with the written file; over the four times of one level,
    the fit beats the field's own climatology and the unadapted network."""
    out = tmp_path / "fit.nc"
    rep = ok(mscn("fit", ERA5, *HELD, "--checkpoint", CKPT, "-o", out))
    truth = _truth({"number": 8, "isobaricInhPa": 850})
    with xr.open_dataset(out) as got:
        err = got["t"].values.astype(np.float64) - truth
    per_field_max = np.abs(err).reshape(4, -1).max(axis=1)
    assert rep["mean"]["max_abs_error"] == pytest.approx(per_field_max.mean(), rel=1e-3)
    assert rep["mean"]["bias"] == pytest.approx(err.mean(), abs=1e-3)
    ev = ok(mscn("evaluate", ERA5, *HELD, "--checkpoint", CKPT, "--verbose"))
    rows = ev["per_item"]
    assert len(rows) == 4
    for row in rows:  # measured 0.72-0.95 and 0.77-0.91 (a climatology of 4 times of a day)
        assert 0.6 < row["skill_vs_training_mean"] <= 1.0, row
        assert 0.6 < row["skill_vs_climatology"] <= 1.0, row
        assert {"max_abs_error", "bias"} <= set(row)


def test_long_commands_show_progress_with_items_per_second(tmp_path):
    """On a terminal, encode and decode show a bar with a rate (tqdm only draws on a tty,
    so the command runs under a pseudo-terminal here)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from clirun import ENV

    def on_tty(*args: object) -> str:
        main, child = pty.openpty()
        # a terminal of 100 columns (a fresh pty has 0, and tqdm then draws nothing)
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        proc = subprocess.Popen([sys.executable, "-m", "mscn_core", *map(str, args)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=child, env=ENV)
        os.close(child)  # the child holds its own copy; EIO once it exits and is drained
        chunks = []
        try:
            while True:
                try:
                    data = os.read(main, 65536)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(main)
        text = b"".join(chunks).decode("utf-8", "replace")
        assert proc.wait(timeout=300) == 0, text[-2000:]
        return text

    stream = tmp_path / "t.mscn"
    text = on_tty("encode", ERA5, *HELD, "--checkpoint", CKPT, "-o", stream)
    assert "/s" in text and "adapt" in text, text[-500:]
    text = on_tty("decode", stream, "--checkpoint", CKPT, "-o", tmp_path / "t.nc")
    assert "/s" in text and "decode" in text, text[-500:]
