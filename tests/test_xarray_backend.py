"""xr.open_dataset(engine="mscn"), the checkpoint catalog and the ds/da.mscn accessors,
on a real stream written and decoded by the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import mscn_plugins.sphere  # noqa: F401 - registers ds.mscn / da.mscn
from mscn_core import bitstream as bs
from mscn_core import catalog, pipeline
from mscn_plugins import sphere_xarray as sx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "datasets" / "data" / "era5_t_z_3deg_2017-01-01_float32.nc"
CKPT = ROOT / "plugins" / "checkpoints" / "era5_t850.safetensors"
MSCN = [sys.executable, "-m", "mscn_core"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Hash index in a temp folder; no MSCN_CHECKPOINTS from the caller's shell."""
    monkeypatch.setenv("MSCN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(catalog.ENV, raising=False)
    catalog.clear_cache()
    sx._register(xr.DataArray, sx.MscnDataArrayAccessor)  # in case the plugin re-registered
    yield
    catalog.clear_cache()


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> tuple[Path, Path]:
    """x.mscn from `mscn encode` and x.nc from `mscn decode` (t850, members 8 and 9)."""
    d = tmp_path_factory.mktemp("stream")
    x, nc = d / "x.mscn", d / "x.nc"
    subprocess.run(MSCN + ["encode", str(DATA), "--var", "t", "--sel", "isobaricInhPa=850",
                           "--sel", "number=8,9", "--checkpoint", str(CKPT), "-o", str(x)],
                   check=True, capture_output=True, cwd=ROOT)
    subprocess.run(MSCN + ["decode", str(x), "--checkpoint", str(CKPT), "-o", str(nc)],
                   check=True, capture_output=True, cwd=ROOT)
    return x, nc


@pytest.fixture
def count_decodes(monkeypatch) -> list[int]:
    calls = [0]
    real = pipeline.decode_item

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "decode_item", counting)
    return calls


def test_engine_listed_and_sniffed_without_torch(stream):
    x, nc = stream
    assert "mscn" in xr.backends.list_engines()
    code = ("import sys, xarray as xr; xr.backends.list_engines(); "
            "from mscn_plugins.sphere_xarray import MscnBackendEntrypoint as B; "
            f"assert B().guess_can_open({str(x)!r}); "
            f"assert not B().guess_can_open({str(nc)!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    b = sx.MscnBackendEntrypoint()
    assert b.guess_can_open(x.read_bytes()) and not b.guess_can_open(DATA.read_bytes())
    assert b.guess_can_open(x.with_name("missing.mscn"))  # unreadable: the suffix decides


def test_open_by_hash_equals_mscn_decode(stream, tmp_path):
    x, nc = stream
    ds = xr.open_dataset(x, engine="mscn")  # checkpoint found by hash (shipped folder)
    ref = xr.open_dataset(nc)
    assert list(ds.data_vars) == list(ref.data_vars) == ["t"]
    xr.testing.assert_allclose(ds.t.drop_attrs(), ref.t.drop_attrs(), rtol=0, atol=1e-4)
    xr.testing.assert_identical(ds.coords.to_dataset().drop_attrs(deep=False),
                                ref.coords.to_dataset().drop_attrs(deep=False))
    assert ds.t.attrs == ref.t.attrs and ds.t.dtype == ref.t.dtype
    mine, theirs = ds.attrs.pop("history"), ref.attrs.pop("history")
    assert ds.attrs == ref.attrs  # the source file's global attributes
    first, *older = mine.split("\n")
    assert theirs.split("\n")[1:] == older  # the first line: a date, another command
    assert theirs.split("\n")[0].endswith(first.rsplit(" (", 1)[1])  # hash, bits
    ds.to_netcdf(tmp_path / "again.nc")  # the source's value encoding, a valid layout
    xr.testing.assert_allclose(xr.open_dataset(tmp_path / "again.nc").t, ref.t)


def test_checkpoint_from_env_kwarg_and_backend_kwargs(stream, tmp_path, monkeypatch):
    x, _ = stream
    ref = xr.open_dataset(x, engine="mscn").t.values
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(CKPT, mine / "renamed.safetensors")
    monkeypatch.setenv(catalog.ENV, os.pathsep.join([str(tmp_path / "nowhere"), str(mine)]))
    sha = bs.read_bitstream(x.read_bytes()).checkpoint_hash
    assert catalog.find_checkpoint(sha) == mine / "renamed.safetensors"  # env before shipped
    np.testing.assert_array_equal(xr.open_dataset(x, engine="mscn").t.values, ref)
    for kw in ({"checkpoint": CKPT}, {"backend_kwargs": {"checkpoint": str(CKPT)}},
               {"checkpoint_dirs": [mine]}):
        np.testing.assert_array_equal(xr.open_dataset(x, engine="mscn", **kw).t.values, ref)


def test_missing_checkpoint_is_one_line(stream, tmp_path):
    x, _ = stream
    s = bs.read_bitstream(x.read_bytes())
    forged = tmp_path / "other.mscn"
    forged.write_bytes(bs.write_bitstream(checkpoint_hash="ab" * 32, modality=s.modality,
                                          bits=s.bits, items_meta=s.items_meta,
                                          payloads=s.payloads, extra=s.extra))
    with pytest.raises(FileNotFoundError) as err:
        xr.open_dataset(forged, engine="mscn", checkpoint_dirs=[tmp_path])
    msg = str(err.value)
    assert "\n" not in msg and "abababababab" in msg and catalog.ENV in msg
    assert "checkpoint=" in msg and str(tmp_path) in msg


def test_corrupted_stream_fails_at_open(stream, tmp_path, count_decodes):
    x, _ = stream
    raw = bytearray(x.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    bad = tmp_path / "bad.mscn"
    bad.write_bytes(bytes(raw))
    with pytest.raises(bs.BitstreamError, match="checksum mismatch") as err:
        xr.open_dataset(bad, engine="mscn")
    assert "\n" not in str(err.value) and count_decodes[0] == 0


def test_forged_item_is_refused_before_any_decode(stream, tmp_path, count_decodes):
    x, _ = stream
    s = bs.read_bitstream(x.read_bytes())
    items = [dict(m) for m in s.items_meta]
    items[-1]["scale"] = [1.0, float("nan")]
    forged = tmp_path / "forged.mscn"
    forged.write_bytes(bs.write_bitstream(checkpoint_hash=s.checkpoint_hash,
                                          modality=s.modality, bits=s.bits, items_meta=items,
                                          payloads=s.payloads, extra=s.extra))
    with pytest.raises(bs.BitstreamError, match="item 7"):
        xr.open_dataset(forged, engine="mscn")
    assert count_decodes[0] == 0


def test_lazy_per_field(stream, count_decodes):
    x, _ = stream
    ds = xr.open_dataset(x, engine="mscn")
    assert count_decodes[0] == 0 and dict(ds.sizes) == {"number": 2, "time": 4,
                                                        "latitude": 61, "longitude": 120}
    one = ds.t.isel(number=0, time=0).values
    assert count_decodes[0] == 1 and one.shape == (61, 120) and np.isfinite(one).all()
    ds.t.isel(number=1, latitude=slice(0, 3)).values  # noqa: B018 - four more fields
    assert count_decodes[0] == 5


def test_dask_chunks_one_per_field(stream, count_decodes):
    """dask is in the climate extra: installed, so this must run."""
    x, _ = stream
    ds = xr.open_dataset(x, engine="mscn", chunks={})
    assert ds.t.chunks == ((1, 1), (1, 1, 1, 1), (61,), (120,)) and count_decodes[0] == 0
    ref = xr.open_dataset(x, engine="mscn").t.isel(number=1, time=2).values
    np.testing.assert_array_equal(ds.t.isel(number=1, time=2).compute().values, ref)


def test_catalog_caches_hashes_and_skips_broken_entry_points(tmp_path, monkeypatch):
    calls = [0]
    real = catalog.file_sha256

    def counting(p):
        calls[0] += 1
        return real(p)

    monkeypatch.setattr(catalog, "file_sha256", counting)
    sha = catalog.checkpoint_hash(CKPT)
    assert catalog.checkpoint_hash(CKPT) == sha and calls[0] == 1
    assert (tmp_path / "cache" / "checkpoint_hashes.json").is_file()
    catalog.clear_cache()  # a new process: the on-disk index answers
    assert catalog.checkpoint_hash(CKPT) == sha and calls[0] == 1

    class Broken:
        name, value = "broken", "nowhere.pkg"

        def load(self):
            raise ImportError("no module named nowhere")

    monkeypatch.setattr(catalog, "entry_points", lambda group: [Broken()])
    with pytest.warns(RuntimeWarning, match="broken"):
        assert catalog.find_checkpoint(sha, [CKPT.parent]) == CKPT


def test_accessor_encode_round_trip(stream, tmp_path):
    x, _ = stream
    src = xr.open_dataset(DATA)
    out = tmp_path / "y.mscn"
    report = src.mscn.encode(out, var="t", sel={"isobaricInhPa": 850, "number": [8, 9]},
                             checkpoint=CKPT)  # the stream fixture's checkpoint
    assert report["items"] == 8 and report["bytes"] == out.stat().st_size
    assert 0 < report["bits_per_value"] < 1 and report["mean"]["rmse"] < 3
    with pytest.raises(FileExistsError):
        src.mscn.encode(out, var="t", sel=["isobaricInhPa=850", "number=8,9"], checkpoint=CKPT)
    got = xr.open_dataset(out, engine="mscn")
    ref = xr.open_dataset(x, engine="mscn")
    xr.testing.assert_allclose(got.t, ref.t, atol=1e-4)
    truth = src.t.sel(isobaricInhPa=850, number=[8, 9])
    assert float(np.sqrt(((got.t - truth) ** 2).mean())) < 3.0


def test_several_variables_in_one_stream(tmp_path, monkeypatch):
    src = xr.open_dataset(DATA).sel(isobaricInhPa=850, number=[8], time=src_times(2))
    out, nc = tmp_path / "tz.mscn", tmp_path / "tz.nc"
    with pytest.warns(UserWarning, match="z"):
        assert src.mscn.encode(out, var=["t", "z"], checkpoint=CKPT)["items"] == 4
    from mscn_core.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    assert main(["decode", str(out), "--checkpoint", str(CKPT), "-o", str(nc)]) == 0  # in-process
    ds, ref = xr.open_dataset(out, engine="mscn"), xr.open_dataset(nc)
    assert list(ds.data_vars) == list(ref.data_vars) == ["t", "z"]
    for v in ("t", "z"):
        xr.testing.assert_allclose(ds[v], ref[v], rtol=1e-6)
        assert ds[v].attrs == ref[v].attrs
    assert list(xr.open_dataset(out, engine="mscn", drop_variables="z").data_vars) == ["t"]
    coarse = xr.open_dataset(out, engine="mscn", resolution=6.0, chunks={})
    assert coarse.z.shape[-2:] == (31, 60) and coarse.z.sizes["time"] == 2
    assert np.isfinite(coarse.z.values).all() and coarse.z.shape == ref.z.shape[:-2] + (31, 60)


def src_times(n: int) -> slice:
    return slice(None, xr.open_dataset(DATA).time.values[n - 1])


def test_accessor_fit(tmp_path):
    src = xr.open_dataset(DATA).sel(isobaricInhPa=850, number=[8, 9])
    with pytest.warns(UserWarning, match="z"):  # z is not in the t850 training set
        fitted = src.mscn.fit(checkpoint=CKPT, steps=3)
    assert set(fitted.data_vars) == {"t", "z"}  # every gridded variable
    rmse = float(np.sqrt(((fitted.t - src.t) ** 2).mean()))
    assert rmse < 1.5, rmse  # 0.66 K measured (t850 checkpoint, 3 inner steps)
    da = src.t.isel(time=0).mscn.fit(checkpoint=CKPT, steps=3, bits=6, resolution=6.0)
    assert da.sizes["latitude"] == 31 and da.sizes["longitude"] == 60
    assert dict(da.isel(latitude=0, longitude=0).sizes) == {"number": 2}


def test_accessor_default_is_the_cli_default(tmp_path):
    """Without checkpoint=, ds.mscn.encode / da.mscn.fit use the checkpoint `mscn fit` and
    `mscn encode` use: the sphere modality's default (one source of truth), not t850."""
    from mscn_core.checkpoint import load_checkpoint
    from mscn_plugins.sphere import SphereModality

    assert sx.default_checkpoint().name == SphereModality.default_checkpoint
    assert sx.DEFAULT_CHECKPOINT == SphereModality.default_checkpoint != CKPT.name
    general = load_checkpoint(sx.default_checkpoint())
    src = xr.open_dataset(DATA).sel(isobaricInhPa=850, number=[8]).isel(time=[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # per-field scaling: no "not in the training set"
        report = src.mscn.encode(tmp_path / "d.mscn", var=["t", "z"])
        fitted = src.t.mscn.fit(steps=3)
    assert report["checkpoint_sha256"] == general.sha256
    assert bs.read_bitstream((tmp_path / "d.mscn").read_bytes()).checkpoint_hash == \
        general.sha256
    assert float(np.sqrt(((fitted - src.t) ** 2).mean())) < 5.0  # 2.3 K measured
