"""Tests for mscn_viewers.globe on real data (ETOPO60 relief, ERA5 t850).

Data: ``<repo>/../shared/data/climate`` if present, else the vendored subsets in
``datasets/data`` (ERA5 float32 copy, ETOPO 2-degree block mean); tests fail if
neither exists.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from mscn_datasets.climate import find_lat_lon
from mscn_viewers import globe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "climate"
VENDORED = Path(__file__).resolve().parents[1] / "datasets" / "data"


def _data_file(shared_name: str, vendored_glob: str) -> Path:
    p = SHARED / shared_name
    if p.is_file():
        return p
    matches = sorted(VENDORED.glob(vendored_glob))
    if matches:
        return matches[0]
    raise FileNotFoundError(f"no real data: {p} missing and nothing matches "
                            f"{VENDORED / vendored_glob}")


@pytest.fixture(scope="module")
def etopo() -> xr.DataArray:
    path = _data_file("etopo60_relief_1deg.nc", "etopo*.nc")
    with xr.open_dataset(path, decode_times=False) as ds:
        return ds["ROSE"].load()


@pytest.fixture(scope="module")
def era5() -> xr.Dataset:
    path = _data_file("era5_t_z_3deg_2017-01-01.nc", "era5*.nc")
    with xr.open_dataset(path) as ds:
        return ds[["t"]].load()


@pytest.fixture(scope="module")
def t850(era5) -> xr.DataArray:
    return era5["t"].isel(number=0, time=0).sel(isobaricInhPa=850)


def _flip_and_wrap(da: xr.DataArray) -> xr.DataArray:
    """Same field, lat reversed (-90 -> 90) and lon converted to -180..180 (unsorted)."""
    lon = da["longitude"]
    out = da.isel(latitude=slice(None, None, -1))
    return out.assign_coords(longitude=((lon + 180) % 360) - 180)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def _expected_size(figsize, dpi) -> tuple[int, int]:
    return (int(round(figsize[0] * dpi)), int(round(figsize[1] * dpi)))


# --------------------------------------------------------------------------- PNG basics


def test_render_globe_png(tmp_path, era5, t850):
    recon = era5["t"].isel(number=1, time=0).sel(isobaricInhPa=850)  # another member
    out = globe.render_globe(
        t850,
        _flip_and_wrap(recon),
        tmp_path / "globe.png",
        stats={"PSNR": 41.2, "RMSE": 1.07, "bpv": 0.043},
        dpi=50,
    )
    assert out == tmp_path / "globe.png" and out.is_file()
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == _expected_size(globe.globe_figsize("both"), 50)
    px = _pixels(out)
    assert px.std() > 30, "image looks blank"
    # the diverging error panels contain both reds and blues
    r, b = px[..., 0], px[..., 2]
    assert ((r - b) > 80).sum() > 200 and ((b - r) > 80).sum() > 200
    assert sorted(os.listdir(tmp_path)) == ["globe.png"]  # no temp files left behind


@pytest.mark.parametrize("projection", ["platecarree", "orthographic"])
def test_render_globe_single_row_size(tmp_path, t850, projection):
    out = globe.render_globe(t850, t850, tmp_path / "g.png", projection=projection, dpi=40)
    with Image.open(out) as im:
        assert im.size == _expected_size(globe.globe_figsize(projection), 40)
    assert globe.globe_figsize(projection)[1] < globe.globe_figsize("both")[1]


def test_labels_and_stats(t850):
    assert (
        globe.format_stats({"PSNR": 41.23, "RMSE": 1.07, "bpv": 0.043}, "K")
        == "PSNR 41.2 dB | RMSE 1.07 K | 0.043 bits/value"
    )
    ident = globe.item_identity(t850)
    assert "number=0" in ident and "isobaricInhPa=850" in ident and "time=2017-01-01" in ident
    assert find_lat_lon(t850) == ("latitude", "longitude")  # the reader's, used by the viewer
    assert not hasattr(globe, "find_lat_lon")  # one lat/lon finder, not two


# --------------------------------------------------------------------------- geography


def _bare_relief(etopo, path, **kw) -> np.ndarray:
    globe.render_field(
        etopo,
        path,
        cmap="gray",
        vmin=-7000,
        vmax=6000,
        bare=True,
        coastlines=False,
        figsize=(8, 4),
        dpi=90,
        **kw,
    )
    px = _pixels(path)
    assert px.shape == (360, 720, 3)
    return px[..., 0].astype(float) / 255.0 * 13000.0 - 7000.0  # gray -> metres


def _at(img: np.ndarray, lat: float, lon: float) -> float:
    h, w = img.shape
    x = int((lon + 180.0) / 360.0 * w)
    y = int((90.0 - lat) / 180.0 * h)
    return float(np.median(img[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]))


PLACES_HIGH_LOW = [
    # (name, lat, lon, is_land)
    ("Sahara", 20, 10, True),
    ("central Pacific", 0, -160, False),
    ("Tibet", 32, 88, True),
    ("Indian Ocean", -10, 80, False),
    ("Greenland", 72, -40, True),
    ("SE Pacific off Chile", -20, -85, False),
    ("Altiplano", -18, -67, True),
    ("East Antarctica", -80, 30, True),
    ("Arctic Ocean", 85, 0, False),
]


def test_geography_platecarree(tmp_path, etopo):
    img = _bare_relief(etopo, tmp_path / "relief.png")
    for name, lat, lon, land in PLACES_HIGH_LOW:
        v = _at(img, lat, lon)
        if land:
            assert v > 0, f"{name} ({lat}N, {lon}E) should be land, rendered {v:.0f} m"
        else:
            assert v < -2500, f"{name} ({lat}N, {lon}E) should be deep ocean, rendered {v:.0f} m"
    assert _at(img, 32, 88) > _at(img, -10, 80) + 8000  # Himalaya vs Indian Ocean
    assert _at(img, 20, 10) > _at(img, 0, -160) + 3000  # Sahara vs Pacific

    # Whole-image check against the data, sampled at each pixel centre (nearest cell).
    h, w = img.shape
    lons = (np.arange(w) + 0.5) / w * 360.0 - 180.0
    lats = 90.0 - (np.arange(h) + 0.5) / h * 180.0
    f = globe.normalize_field(etopo)
    ix = np.abs(((lons[:, None] - f["lon"].values[None, :]) + 180) % 360 - 180).argmin(1)
    iy = np.abs(lats[:, None] - f["lat"].values[None, :]).argmin(1)
    expected = np.clip(f.values[np.ix_(iy, ix)], -7000, 6000)
    corr = np.corrcoef(expected.ravel(), img.ravel())[0, 1]
    assert corr > 0.97
    # ...and the check is discriminative: an upside-down or 180-degree shifted map fails it
    assert np.corrcoef(expected[::-1].ravel(), img.ravel())[0, 1] < 0.6
    assert np.corrcoef(np.roll(expected, w // 2, 1).ravel(), img.ravel())[0, 1] < 0.6


def test_geography_central_longitude(tmp_path, etopo):
    """With central_longitude=180 the image is the lon=0 image rolled by half a width."""
    img0 = _bare_relief(etopo, tmp_path / "c0.png")
    img180 = _bare_relief(etopo, tmp_path / "c180.png", central_longitude=180.0)
    assert _at(img180, 0, 20) < -2500  # centre of that map is now the Pacific (0N, 160W)
    shifted = np.roll(img0, img0.shape[1] // 2, axis=1)
    assert np.abs(shifted - img180).mean() < 60  # metres; only antialiasing differences


def test_flipped_lat_and_wrapped_lon_give_same_image(tmp_path, t850):
    flipped = _flip_and_wrap(t850)
    assert flipped["latitude"][0] < 0 and flipped["longitude"].min() < 0
    a = globe.render_field(t850, tmp_path / "a.png", projection="both", dpi=50)
    b = globe.render_field(flipped, tmp_path / "b.png", projection="both", dpi=50)
    pa, pb = _pixels(a), _pixels(b)
    assert pa.shape == pb.shape
    assert pa.std() > 30
    assert np.abs(pa - pb).max() == 0


# --------------------------------------------------------------------------- error field


def test_error_on_truth_grid(t850):
    # identical grids in a different representation -> exactly zero error
    err0 = globe.error_on_truth_grid(t850, _flip_and_wrap(t850))
    assert err0.shape == t850.shape and float(np.abs(err0).max()) == 0.0
    # finer recon grid, offset so that lon 0 lies between 359.25 and 0.75 (periodic wrap)
    lon = t850["longitude"].values
    padded = xr.concat(
        [
            t850.isel(longitude=[-1]).assign_coords(longitude=[lon[-1] - 360]),
            t850,
            t850.isel(longitude=[0]).assign_coords(longitude=[lon[0] + 360]),
        ],
        dim="longitude",
    )
    fine_lon = np.arange(-179.25, 180, 1.5)  # -180..180 convention
    fine = padded.interp(latitude=np.arange(-89.25, 90, 1.5), longitude=fine_lon % 360)
    fine = fine.assign_coords(longitude=fine_lon)
    assert np.isfinite(fine.values).all()
    err = globe.error_on_truth_grid(t850, fine)
    assert err.shape == t850.shape
    assert np.isfinite(err.values).all(), "NaNs at the lon seam or the poles"
    assert float(np.sqrt((err**2).mean())) < 0.1 * float(t850.std())
    assert err.attrs["units"] == "K"


# --------------------------------------------------------------------------- files


def test_overwrite_semantics(tmp_path, t850, era5):
    path = tmp_path / "f.png"
    globe.render_field(t850, path, dpi=30)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        globe.render_field(t850, path, dpi=30, overwrite=False)
    with pytest.raises(FileExistsError):
        globe.render_globe(t850, t850, path, overwrite=False)
    with pytest.raises(FileExistsError):
        globe.rotating_globe_gif(t850, path, frames=2, overwrite=False)
    assert path.read_bytes() == before
    other = era5["t"].isel(number=0, time=0).sel(isobaricInhPa=500)
    globe.render_field(other, path, dpi=30)  # overwrite=True: replaced atomically
    assert path.read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["f.png"]
    # what a plain open() would create (0o666 minus the umask), not mkstemp's 0o600
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_rotating_gif(tmp_path, t850):
    out = globe.rotating_globe_gif(t850, tmp_path / "spin.gif", frames=4, dpi=40)
    with Image.open(out) as im:
        assert im.format == "GIF"
        assert im.n_frames == 4
        assert im.size == (160, 184)
        frames = []
        for k in range(im.n_frames):
            im.seek(k)
            frames.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    assert all(f.std() > 20 for f in frames)
    assert np.abs(frames[0] - frames[2]).mean() > 1  # the globe actually rotates


def test_missing_shapefile_is_a_clear_error_not_a_download(tmp_path, t850, monkeypatch):
    import urllib.request

    from cartopy.io import shapereader

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    globe.configure_cartopy()
    vendored = shapereader.natural_earth(resolution="110m", category="physical", name="coastline")
    assert Path(vendored).is_relative_to(globe.NATURAL_EARTH_DIR)
    with pytest.raises(FileNotFoundError, match="downloads are disabled"):
        shapereader.natural_earth(resolution="10m", category="physical", name="coastline")
    with pytest.raises(FileNotFoundError, match="Vendored Natural Earth shapefile missing"):
        globe.render_field(t850, tmp_path / "x.png", coast_resolution="10m", dpi=30)
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- view options


COADS = SHARED / "coads_climatology_2deg.nc"


def _smooth(da: xr.DataArray) -> xr.DataArray:
    """A plausible reconstruction: 3x3 box mean (periodic in lon), NaNs kept."""
    v = da.values.astype(float)
    with warnings.catch_warnings():  # all-land neighbourhoods: NaN, as they should
        warnings.simplefilter("ignore", RuntimeWarning)
        out = np.nanmean([np.roll(np.roll(v, i, 0), j, 1)
                          for i in (-1, 0, 1) for j in (-1, 0, 1)], 0)
    return da.copy(data=np.where(np.isfinite(v), out, np.nan))


@pytest.fixture(scope="module")
def sst() -> xr.DataArray:
    """COADS July SST (land NaN, time 'hour since 0000-01-01'), or ERA5 t850 with a fake
    land mask and the same time coordinate when the shared file is absent."""
    attrs = {"units": "hour since 0000-01-01 00:00:00", "modulo": " "}
    if COADS.is_file():
        with xr.open_dataset(COADS, decode_times=False) as ds:
            return ds["SST"].isel(TIME=6).load()
    with xr.open_dataset(_data_file("era5_t_z_3deg_2017-01-01.nc", "era5*.nc")) as ds:
        t = ds["t"].isel(number=0, time=0).sel(isobaricInhPa=850).load()
    t = t.where(np.abs(t["latitude"]) < 60).drop_vars(["time", "valid_time"], errors="ignore")
    return t.assign_coords(TIME=xr.Variable((), 4748.91, attrs))


@pytest.fixture
def layouts(monkeypatch) -> list[list[dict]]:
    """What each figure held when written: one dict per map axes (projection, title, clim)."""
    from cartopy.mpl.geoaxes import GeoAxes

    seen: list[list[dict]] = []
    save = globe._save_png

    def spy(fig, path, overwrite):
        seen.append([{"proj": type(ax.projection).__name__,
                      "lon_0": ax.projection.proj4_params.get(  # PlateCarree: pm
                          "lon_0", ax.projection.proj4_params.get("pm")),
                      "title": ax.get_title(), "clim": ax.collections[0].get_clim(),
                      "cmap": ax.collections[0].get_cmap().name}
                     for ax in fig.axes if isinstance(ax, GeoAxes)])
        return save(fig, path, overwrite)

    monkeypatch.setattr(globe, "_save_png", spy)
    return seen


def test_default_layout_unchanged(tmp_path, t850, layouts):
    globe.render_globe(t850, _smooth(t850), tmp_path / "g.png", dpi=30)
    axes = layouts[-1]
    assert [a["proj"] for a in axes] == ["PlateCarree"] * 3 + ["Orthographic"] * 3
    assert [a["title"].split(" ")[0] for a in axes[:3]] == ["Truth", "Reconstruction", "Error"]
    assert globe.globe_figsize() == globe.globe_figsize("both", "truth,recon,error")
    assert globe.globe_figsize()[0] == 15.0


@pytest.mark.parametrize(
    "projection, panels, rows",
    [("robinson", "truth,recon,error", ["Robinson"]),
     ("platecarree", "error", ["PlateCarree"]),
     ("orthographic", "recon,truth", ["Orthographic"]),
     ("both", "error,truth", ["PlateCarree", "Orthographic"])],
)
def test_projection_and_panels(tmp_path, t850, layouts, projection, panels, rows):
    out = globe.render_globe(t850, _smooth(t850), tmp_path / "g.png", projection=projection,
                             panels=panels, central_longitude=180.0, dpi=30)
    cols = panels.split(",")
    axes = layouts[-1]
    assert [a["proj"] for a in axes] == [r for r in rows for _ in cols]
    assert all(a["lon_0"] in (180.0, 180) for a in axes)
    names = {"truth": "Truth", "recon": "Reconstruction", "error": "Error"}
    assert [a["title"].split(" ")[0] for a in axes[: len(cols)]] == [names[c] for c in cols]
    w, h = _expected_size(globe.globe_figsize(projection, panels), 30)
    with Image.open(out) as im:
        assert abs(im.size[0] - w) <= 1 and abs(im.size[1] - h) <= 1  # matplotlib truncates
    px = _pixels(out)
    assert px.std() > 30, "image looks blank"
    if "error" in cols:  # the diverging error map has both reds and blues
        r, b = px[..., 0], px[..., 2]
        assert ((r - b) > 80).sum() > 100 and ((b - r) > 80).sum() > 100


def test_error_only_is_difference_only(tmp_path, t850, layouts):
    globe.render_globe(t850, _smooth(t850), tmp_path / "e.png", projection="platecarree",
                       panels="error", dpi=30)
    (ax,) = layouts[-1]
    lo, hi = ax["clim"]
    assert ax["cmap"] == "RdBu_r" and lo == -hi and 0 < hi < 10  # kelvin differences


def test_cmap_and_limits(tmp_path, t850, layouts):
    globe.render_globe(t850, _smooth(t850), tmp_path / "g.png", projection="robinson",
                       cmap="magma", vmin=240, vmax=300, dpi=30)
    truth, recon, err = layouts[-1]
    assert truth["clim"] == recon["clim"] == (240.0, 300.0)
    assert truth["cmap"] == recon["cmap"] == "magma" and err["cmap"] == "RdBu_r"
    globe.render_globe(t850, t850, tmp_path / "g.png", panels="truth", vmin=250, dpi=30)
    lo, hi = layouts[-1][0]["clim"]
    assert lo == 250.0 and hi > 280  # the other end stays robust


@pytest.mark.parametrize(
    "kw, match",
    [({"projection": "mercator"}, "choose one of both, platecarree, robinson, orthographic"),
     ({"panels": "truth,diff"}, "unknown panel 'diff'"),
     ({"panels": " , "}, "no panels"),
     ({"panels": "truth,truth"}, "repeat"),
     ({"cmap": "viridi"}, "did you mean viridis"),
     ({"vmin": 300, "vmax": 250}, "vmin < vmax"),
     ({"vmin": 400}, "vmin < vmax"),
     ({"vmax": float("nan")}, "finite")],
)
def test_bad_options_are_one_line_errors(tmp_path, t850, kw, match):
    for call in (lambda: globe.render_globe(t850, t850, tmp_path / "x.png", **kw),
                 lambda: globe.rotating_globe_gif(t850, tmp_path / "x.gif", frames=1,
                                                  truth=t850, **kw)):
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_land_nans_stay_blank(tmp_path, sst):
    out = globe.render_globe(sst, _smooth(sst), tmp_path / "sst.png", projection="platecarree",
                             panels="truth", dpi=40)
    px = _pixels(out)
    white = (px.min(-1) > 245).mean()
    assert px.std() > 30 and 0.2 < white < 0.8  # land and ice blank, ocean coloured


# --------------------------------------------------------------------------- decoded times


def test_undecoded_times_show_dates(sst, t850):
    assert "TIME=Jul 16 (climatology)" in globe.item_identity(sst)  # year 0 + modulo
    field = t850.drop_vars(["time", "valid_time"])
    raw = {"days since 2017-01-01": (1.5, "time=2017-01-02 12:00"),
           "hours since 1980-01-14 14:00:00": (17598.0, "time=1982-01-16 20:00"),
           "months since 1958-1-1": (14, "time=1959-03-01"),
           "days since the dawn": (3, "time=3"),  # undecodable: the raw value
           "K": (3.5, "time=3.5")}
    for units, (value, shown) in raw.items():
        da = field.assign_coords(time=xr.Variable((), value, {"units": units}))
        assert shown in globe.item_identity(da), units
    fill = field.assign_coords(time=xr.Variable((), 9.969209968386869e36))  # NetCDF fill
    assert "time=" not in globe.item_identity(fill)
    noleap = field.assign_coords(time=xr.Variable((), 59, {"units": "days since 2001-01-01",
                                                          "calendar": "noleap"}))
    assert "time=2001-03-01" in globe.item_identity(noleap)


def test_title_shows_decoded_time(tmp_path, sst, monkeypatch):
    titles = []
    save = globe._save_png
    monkeypatch.setattr(globe, "_save_png", lambda fig, p, o: (
        titles.append(fig.get_suptitle()), save(fig, p, o))[1])
    globe.render_globe(sst, sst, tmp_path / "g.png", panels="truth", projection="robinson",
                       dpi=20)
    assert "TIME=Jul 16 (climatology)" in titles[0] and "4748" not in titles[0]


# --------------------------------------------------------------------------- animation


def _gif_frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as im:
        out = []
        for k in range(im.n_frames):
            im.seek(k)
            out.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    return out


def test_gif_truth_recon_error_side_by_side(tmp_path, t850):
    out = globe.rotating_globe_gif(_smooth(t850), tmp_path / "spin.gif", frames=3, dpi=30,
                                   truth=t850, projection="both", central_longitude=30)
    frames = _gif_frames(out)
    assert len(frames) == 3
    assert frames[0].shape == (138, 360, 3)  # three 4.0 x 4.6 in panels at 30 dpi
    for f in frames:
        thirds = np.split(f[20:110], 3, axis=1)  # the globes, below the title
        for third in thirds:
            assert third.std() > 20, "an empty panel"
        r, b = thirds[2][..., 0], thirds[2][..., 2]
        assert ((r - b) > 80).sum() > 20 and ((b - r) > 80).sum() > 20  # error: red and blue
    assert np.abs(frames[0] - frames[1]).mean() > 1  # rotates


def test_gif_panels_and_projection(tmp_path, t850):
    out = globe.rotating_globe_gif(t850, tmp_path / "a.gif", frames=2, dpi=20, truth=t850,
                                   panels="error,truth", projection="robinson")
    with Image.open(out) as im:
        assert im.n_frames == 2 and im.size == (160, 92)  # two panels; globes, not maps
    with pytest.raises(ValueError, match="need the truth field"):
        globe.rotating_globe_gif(t850, tmp_path / "b.gif", frames=1, panels="error")


# --------------------------------------------------------------------------- grid kinds

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} absent")


def _field(name: str, var: str, **isel) -> xr.DataArray:
    from mscn_datasets.climate import promote_grid_coords

    with xr.open_dataset(SHARED / name, decode_times=False) as ds:
        return promote_grid_coords(ds)[var].isel(**isel).load()


KINDS = {  # name -> (file, variable, isel, grid kind)
    "pop": ("ncl_pop_ocean_curvilinear.nc", "t", {}, "curvilinear"),
    "mpiom": ("ncl_mpiom_tos_bipolar_curvilinear.nc", "tos", {"time": 0}, "curvilinear"),
    "seam": ("ncl_seam_ps_2d_latlon.nc", "ps", {"time": 0}, "curvilinear"),
    "geodesic": ("ncl_geodesic_2562cells_unstructured.nc", "height", {"time": 0},
                 "unstructured"),
    "t42": ("ncl_t42_uv300.nc", "U", {"time": 0}, "gaussian"),
}


@pytest.fixture(scope="module")
def kinds() -> dict[str, xr.DataArray]:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} absent")
    return {k: _field(f, v, **isel) for k, (f, v, isel, _) in KINDS.items()}


def _noisy(da: xr.DataArray) -> xr.DataArray:
    rng = np.random.default_rng(0)
    return da + 0.05 * float(da.std()) * rng.standard_normal(da.shape)


def _unit(lat, lon) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], -1)


def _nearest_image(da: xr.DataArray, w: int, h: int, c: float) -> np.ndarray:
    """The value of the nearest cell centre at each pixel centre of a bare PlateCarree map."""
    from scipy.spatial import cKDTree

    f = globe.normalize_field(da)
    lat, lon = f["lat"].values, f["lon"].values
    if f.dims == ("lat", "lon"):
        lat, lon = np.meshgrid(lat, lon, indexing="ij")
    lons = (np.arange(w) + 0.5) / w * 360.0 - 180.0 + c
    lats = 90.0 - (np.arange(h) + 0.5) / h * 180.0
    plat, plon = np.meshgrid(lats, lons, indexing="ij")
    _, idx = cKDTree(_unit(lat.ravel(), lon.ravel())).query(_unit(plat.ravel(), plon.ravel()))
    return np.ravel(f.values)[idx].reshape(h, w)


@needs_shared
@pytest.mark.parametrize("name, c", [("pop", 0.0), ("pop", -150.0), ("mpiom", 0.0),
                                     ("seam", 0.0), ("geodesic", 100.0), ("t42", 0.0)])
def test_each_grid_kind_is_drawn_where_its_cells_are(tmp_path, kinds, name, c):
    """Bare gray map vs the nearest cell at every pixel: right place, NaN cells blank, no
    cell smeared across the map at the seam (it would colour land rows / blank the edge)."""
    da = kinds[name]
    assert globe.normalize_field(da).attrs["grid"] == KINDS[name][3]
    lo, hi = float(np.nanmin(da)), float(np.nanmax(da))
    vmax = hi + 0.3 * (hi - lo)  # data stays darker than 0.77 white; blank is white
    globe.render_field(da, tmp_path / "b.png", cmap="gray", vmin=lo, vmax=vmax, bare=True,
                       coastlines=False, figsize=(8, 4), dpi=45, central_longitude=c)
    px = _pixels(tmp_path / "b.png")
    h, w = px.shape[:2]
    blank = px.min(-1) > 245
    want = _nearest_image(da, w, h, c)
    wet = np.isfinite(want)
    assert (~blank[wet]).mean() > 0.97, "holes where there are cells"
    if (~wet).any():
        assert blank[~wet].mean() > 0.9, "NaN (land) cells drawn"
        band = slice(int(h * 80 / 180), int(h * 90 / 180))  # 10N..0: Africa, S America
        assert abs((~blank[band]).mean() - wet[band].mean()) < 0.03, "smeared band"
    assert (~blank[:, [0, -1]][wet[:, [0, -1]]]).mean() > 0.97, "blank map edges (seam)"
    got = px[..., 0].astype(float) / 255.0 * (vmax - lo) + lo
    ok = wet & ~blank
    assert np.corrcoef(got[ok], want[ok])[0, 1] > 0.95
    if name == "t42":
        assert not blank[0].any() and not blank[-1].any(), "Gaussian polar caps left blank"


@needs_shared
@pytest.mark.parametrize("name", ["pop", "geodesic", "seam"])
def test_grid_kinds_all_projections(tmp_path, kinds, layouts, name):
    da = kinds[name]
    for projection, rows in [("both", ["PlateCarree", "Orthographic"]),
                             ("robinson", ["Robinson"])]:
        out = globe.render_globe(da, _noisy(da), tmp_path / "g.png", projection=projection,
                                 dpi=30)
        axes = layouts[-1]
        assert [a["proj"] for a in axes] == [r for r in rows for _ in range(3)]
        assert [a["title"].split(" ")[0] for a in axes[:3]] == ["Truth", "Reconstruction",
                                                                "Error"]
        px = _pixels(out)
        assert px.std() > 30, "image looks blank"
        r, b = px[..., 0], px[..., 2]
        assert ((r - b) > 80).sum() > 100 and ((b - r) > 80).sum() > 100
    out = globe.rotating_globe_gif(_noisy(da), tmp_path / "s.gif", frames=2, dpi=30, truth=da)
    frames = _gif_frames(out)
    assert len(frames) == 2 and all(f.std() > 20 for f in frames)
    assert np.abs(frames[0] - frames[1]).mean() > 1


def _analytic(lat, lon):
    la, lo = np.radians(lat), np.radians(lon)
    return np.cos(la) * np.sin(lo) + 0.5 * np.sin(2 * la)


def _regular(res: float, nan_above: float = 91.0) -> xr.DataArray:
    lat = np.arange(-90 + res / 2, 90, res)
    lon = np.arange(0, 360, res)
    v = _analytic(lat[:, None], lon[None, :])
    v[lat > nan_above] = np.nan
    return xr.DataArray(v, dims=("lat", "lon"), coords={"lat": lat, "lon": lon}, name="f")


def _on_points(da: xr.DataArray) -> xr.DataArray:
    """``da``'s grid carrying the analytic field (NaN where ``da`` is NaN)."""
    f = globe.normalize_field(da)  # cell grids keep their order; lat/lon in degrees
    v = _analytic(f["lat"].values, f["lon"].values)
    return da.copy(data=np.where(np.isfinite(da.values), v, np.nan)).rename("f")


@needs_shared
@pytest.mark.parametrize("name", ["pop", "geodesic"])
def test_error_panel_values(kinds, name):
    truth = _on_points(kinds[name])
    # same grid: the plain difference, NaN where the truth is NaN
    recon = _noisy(truth)
    err = globe.error_on_truth_grid(truth, recon)
    assert err.shape == truth.shape
    np.testing.assert_array_equal(np.ravel(err), np.ravel(recon - truth))
    # regular recon (decoded with --resolution): bilinear onto the truth points
    err = globe.error_on_truth_grid(truth, _regular(1.0))
    wet = np.isfinite(np.ravel(truth))
    assert np.isfinite(np.ravel(err)[wet]).all()
    inner = np.abs(globe.normalize_field(truth)["lat"].values) < 89.4
    assert float(np.nanmax(np.abs(err.values[inner]))) < 2e-3  # bilinear, 1 deg, smooth
    assert float(np.nanmax(np.abs(err))) < 0.015  # poleward of the last row: held constant
    # ... whose NaN rows (no data above 60N): nearest non-NaN recon value, no holes
    err = globe.error_on_truth_grid(truth, _regular(1.0, nan_above=60.0))
    assert np.isfinite(np.ravel(err)[wet]).all()
    # non-regular recon on a regular truth: the nearest recon cell
    reg = _regular(2.0)
    err = globe.error_on_truth_grid(reg, truth)
    assert err.dims == ("lat", "lon")
    if name == "geodesic":  # no NaN cells: every point has a value
        assert np.isfinite(err).all()
    assert float(np.nanmax(np.abs(err))) < 0.1  # a few degrees of a unit-slope field


@needs_shared
def test_regional_grid_shows_the_region(tmp_path, monkeypatch):
    """A Pacific box across the dateline: maps cover the box, the globe looks at it."""
    relief = _field("etopo60_relief_1deg.nc", "ROSE").sel(ETOPO60Y=slice(-40, 40))
    box = relief.isel(ETOPO60X=(relief.ETOPO60X > 120) & (relief.ETOPO60X < 250))
    assert globe.normalize_field(box).attrs["grid"] == "regional"
    seen = []
    save = globe._save_png

    def spy(fig, path, overwrite):
        seen.extend((type(ax.projection).__name__, ax.projection.proj4_params,
                     ax.get_extent()) for ax in fig.axes
                    if hasattr(ax, "projection"))
        return save(fig, path, overwrite)

    monkeypatch.setattr(globe, "_save_png", spy)
    out = globe.render_globe(box, _noisy(box), tmp_path / "r.png", dpi=30)
    maps = [e for p, _, e in seen if p == "PlateCarree"]
    globes = [q for p, q, _ in seen if p == "Orthographic"]
    assert len(maps) == 3 and len(globes) == 3
    for x0, x1, y0, y1 in maps:  # native extent: lon relative to the box centre (175W)
        assert (x0, x1, y0, y1) == pytest.approx((-65, 65, -40, 40), abs=1.5)
    assert all(q.get("pm", q.get("lon_0")) == pytest.approx(-175, abs=1)
               for p, q, _ in seen if p == "PlateCarree")
    assert globes[0]["lon_0"] == pytest.approx(-175, abs=1) and abs(globes[0]["lat_0"]) < 1
    px = _pixels(out)
    assert px.std() > 30
