"""Tests for mscn_viewers.globe on real data (ETOPO60 relief, ERA5 t850).

Data: ``<repo>/../shared/data/climate`` if present, else the vendored subsets in
``datasets/data`` (ERA5 float32 copy, ETOPO 2-degree block mean); tests fail if
neither exists.
"""

from __future__ import annotations

import os
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
