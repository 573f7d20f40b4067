"""Climate files the sphere plugin cannot use get a precise one-line reason naming the
file, not the core's "no installed modality can open"; the default checkpoint is one
name everywhere; warnings print dates, not nanoseconds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr

from mscn_core.registry import get_modality, guess_modality
from mscn_datasets import climate, meshes
from mscn_plugins import sphere
from mscn_plugins import sphere_xarray as sx

ROOT = Path(__file__).resolve().parents[1]
ERA5 = ROOT / "datasets" / "data" / "era5_t_z_3deg_2017-01-01_float32.nc"
MSCN = [sys.executable, "-m", "mscn_core"]


def _grid_ds(lat, lon, lat_attrs, lon_attrs) -> xr.Dataset:
    return xr.Dataset({"t": (("lat", "lon"), np.random.default_rng(0).random(
        (len(lat), len(lon))).astype("f4"))},
        coords={"lat": ("lat", np.asarray(lat, "f4"), lat_attrs),
                "lon": ("lon", np.asarray(lon, "f4"), lon_attrs)})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    out = {k: d / f"{k}.nc" for k in ("nocoords", "lat95", "radlat", "projected", "ok")}
    xr.Dataset({"v": (("a", "b"), np.ones((4, 5), "f4"))}).to_netcdf(out["nocoords"])
    deg = ({"units": "degrees_north"}, {"units": "degrees_east"})
    _grid_ds([80, 85, 90, 95], np.arange(8) * 45.0, *deg).to_netcdf(out["lat95"])
    _grid_ds([0.5, 1.0, 1.5, 1.7], np.arange(8) * 0.7, {"units": "radians"},
             {"units": "radians"}).to_netcdf(out["radlat"])
    _grid_ds([-60, -20, 20, 60], np.arange(8) * 45.0, *deg).to_netcdf(out["ok"])
    proj = xr.Dataset({"sst": (("j", "i"), np.ones((3, 4))),
                       "xc": (("j", "i"), np.ones((3, 4)), {"units": "m"}),
                       "yc": (("j", "i"), np.ones((3, 4)),
                              {"units": "m", "standard_name": "projection_y_coordinate"})})
    proj["sst"].attrs["coordinates"] = "xc yc"
    proj.to_netcdf(out["projected"])
    out["zarr"] = d / "nocoords.zarr"
    xr.Dataset({"v": (("a", "b"), np.ones((3, 4)))}).to_zarr(out["zarr"], mode="w",
                                                             zarr_format=2)
    out["plain_h5"] = d / "plain.h5"  # HDF5 without netCDF structure
    with h5py.File(out["plain_h5"], "w") as f:
        f["data"] = np.ones((4, 5))
    out["imnet"] = meshes.write_voxels_hdf5(np.ones((2, 8, 8, 8), bool), d / "imnet.h5")
    out["scalar"] = d / "scalar.nc"  # no field with a dim at all
    xr.Dataset({"s": ((), 1.0)}).to_netcdf(out["scalar"])
    return out


# -- which modality opens what ------------------------------------------------------------


@pytest.mark.parametrize("name", ["nocoords", "lat95", "radlat", "projected", "zarr", "ok"])
def test_netcdf_without_usable_coordinates_is_still_sphere(files, name):
    assert guess_modality(files[name]) == "sphere"


def test_hdf5_that_is_not_netcdf_is_not_claimed(files):
    s = get_modality("sphere")
    assert not s.guess_can_open(files["plain_h5"])
    assert not s.guess_can_open(files["imnet"])
    assert guess_modality(files["imnet"]) == "voxel"  # IM-NET voxels: the voxel plugin's
    assert not s.guess_can_open(files["scalar"])  # no field with a dim


# -- the messages -----------------------------------------------------------------------------


def _read_error(path, **kw) -> str:
    with pytest.raises(climate.ClimateDataError) as err:
        get_modality("sphere").read(path, **kw)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    return msg


def _expects(msg: str) -> None:
    for words in ("standard_name latitude/longitude", "grid_latitude", "degrees_north",
                  "radians", "axis Y/X", "'coordinates' attribute", "nav_lat", "clat"):
        assert words in msg, (words, msg)


def test_no_coordinates_names_what_was_examined_and_expected(files):
    msg = _read_error(files["nocoords"])
    assert "no data variable on a latitude/longitude grid" in msg
    assert "variables examined: v (a, b)" in msg
    assert "dims without a coordinate variable: a, b" in msg
    _expects(msg)


def test_var_without_coordinates_names_the_coordinate_variables(files):
    msg = _read_error(files["projected"], var="sst")
    assert "no lat and lon coordinates found in variable 'sst'" in msg
    assert "coordinates='xc yc'" in msg  # the attribute that named them
    assert "xc [j, i] (standard_name=none, units='m', axis=none)" in msg
    assert "yc [j, i] (standard_name='projection_y_coordinate', units='m', axis=none)" in msg
    _expects(msg)
    msg = _read_error(files["nocoords"], var="v")  # --var: not only the dims any more
    assert "coordinate variables examined: none" in msg and "a, b" in msg
    _expects(msg)


def test_every_place_uses_the_same_builder(files):
    ds = climate.open_climate(files["projected"])
    for call in (lambda: climate.find_grid(ds), lambda: climate.find_grid(ds["sst"]),
                 lambda: climate.find_lat_lon(ds["sst"]), lambda: climate.select_fields(ds),
                 lambda: ds.mscn.encode(files["projected"].with_suffix(".mscn"))):
        with pytest.raises(climate.ClimateDataError) as err:
            call()
        msg = str(err.value)
        assert "xc [j, i] (standard_name=none, units='m', axis=none)" in msg, msg
        assert msg.endswith(climate.EXPECTED_COORDS), msg


def test_latitude_out_of_range_is_refused_by_read(files):
    msg = _read_error(files["lat95"])
    assert "latitude lat values 80..95 outside [-90, 90]" in msg
    msg = _read_error(files["radlat"])
    assert "(units radians: 0.5..1.7) outside [-90, 90]" in msg


@pytest.mark.parametrize("name, words", [
    ("nocoords", "no data variable on a latitude/longitude grid; variables examined: v"),
    ("lat95", "latitude lat values 80..95 outside [-90, 90]"),
])
def test_cli_gives_the_reason_without_modality(files, tmp_path, name, words):
    r = subprocess.run(MSCN + ["fit", str(files[name]), "-o", str(tmp_path / "x.nc")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    assert "no installed modality" not in r.stderr, r.stderr
    assert err.startswith(f"mscn fit: error: {files[name]}: ") and words in err, err


# -- the default checkpoint, dates in warnings ------------------------------------------------


def test_accessor_default_checkpoint_is_the_modalitys():
    assert sx.default_checkpoint().name == sphere.SphereModality.default_checkpoint
    assert sx.DEFAULT_CHECKPOINT == sphere.SphereModality.default_checkpoint


def _build_script():
    path = ROOT / "plugins" / "checkpoints" / "build_climate_general.py"
    spec = importlib.util.spec_from_file_location("build_climate_general", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_script_rebuilds_the_default_without_arguments():
    b = _build_script()
    assert b.recipe() == (192, 7) == b.recipe(192, 7)  # no arguments = make climate-checkpoint
    assert b.paths(*b.recipe())[0].name == sphere.SphereModality.default_checkpoint
    cmd = b.args_for(10, 1, *b.recipe())
    assert cmd[cmd.index("--budget") + 1] == "192" and cmd[cmd.index("--sh-degree") + 1] == "7"
    plain = b.paths(*b.recipe(sh_degree=-1))[0].name
    assert plain == b.paths(*b.recipe(256))[0].name == "climate_general.safetensors"
    assert b.paths(*b.recipe(64))[0].name == "climate_general_b64.safetensors"
    assert b.recipe(1024) == (1024, -1) and b.width_for(1024) == 256


def test_range_warning_prints_iso_dates():
    (f, *_) = get_modality("sphere").read(ERA5, var="t", sel={"isobaricInhPa": 850})
    m = sphere.SphereModality()
    m.scaling = {sphere.variable_key(f): [0.0, 1.0]}  # every temperature is far outside
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.to_signal(f)
    (msg,) = [str(w.message) for w in caught if "training range" in str(w.message)]
    assert "time=2017-01-01T00:00:00" in msg and "isobaricInhPa=850" in msg, msg
    assert "1483228800000000000" not in msg


def test_docs_say_what_is_in_training():
    readme = (ROOT / "README.md").read_text()
    assert "every variable, level and grid kind" not in readme
    assert "no unstructured grid" in readme and "ncl_landsea_1deg.nc" in readme
    data = (ROOT / "datasets" / "data" / "README.md").read_text()
    assert "ncl_landsea_1deg.nc" in data and "LSMASK" in data and "categorical" in data
