"""``mscn decode STREAM -o OUT`` without ``--checkpoint``: the checkpoint is found by the
sha256 the stream names (shipped checkpoints, ``MSCN_CHECKPOINTS``), as the xarray
backend finds it; a stream whose checkpoint is nowhere is refused in one line."""

from __future__ import annotations

import numpy as np
import xarray as xr
from clirun import mscn, ok, refused
from conftest import ERA5
from forge import forge

CKPT = "plugins/checkpoints/era5_t850.safetensors"
SEL = ["--var", "t", "--sel", "isobaricInhPa=850", "--sel", "number=8"]


def test_decode_finds_the_streams_checkpoint_by_hash(tmp_path):
    stream = tmp_path / "a.mscn"
    ok(mscn("encode", ERA5, *SEL, "--checkpoint", CKPT, "-o", stream))
    named = tmp_path / "named.nc"
    ok(mscn("decode", stream, "--checkpoint", CKPT, "-o", named))
    found = tmp_path / "found.nc"
    r = mscn("decode", stream, "-o", found)
    assert ok(r)["items"] == 4
    assert "era5_t850.safetensors (the stream's checkpoint, found by its sha256)" in r.stderr
    with xr.open_dataset(named) as a, xr.open_dataset(found) as b:
        np.testing.assert_array_equal(a["t"].values, b["t"].values)


def test_a_stream_of_an_unknown_checkpoint_is_refused_in_one_line(tmp_path):
    stream = tmp_path / "a.mscn"
    ok(mscn("encode", ERA5, *SEL, "--checkpoint", CKPT, "-o", stream))

    def other_checkpoint(header: dict, payloads: list[bytes]) -> None:
        header["checkpoint_hash"] = "0" * 64

    stray = tmp_path / "stray.mscn"
    stray.write_bytes(forge(stream.read_bytes(), other_checkpoint))
    line = refused(mscn("decode", stray, "-o", tmp_path / "x.nc",
                        env={"MSCN_CHECKPOINTS": str(tmp_path)}))
    assert "stray.mscn" in line and "no checkpoint with sha256 000000000000" in line
    assert "--checkpoint" in line and not (tmp_path / "x.nc").exists()
    # not a stream at all: said as such, not as an unknown modality
    line = refused(mscn("decode", ERA5, "-o", tmp_path / "y.nc"))
    assert "not an .mscn file" in line
