"""Grid by reference: ``mscn encode --grid-storage reference`` leaves a curvilinear or
unstructured grid's lat/lon in the input file and names it in the stream by a sha256 of
its values; ``mscn decode --grid-file FILE`` checks FILE by that hash and decodes exactly
what the embedded stream decodes to.

Why these checks: the point is bytes (an ocean grid's coordinates are ~99 % of a
one-field stream), so the sizes are asserted and printed; the promise is "the same file
as before", so decoded files are compared in full (values, coordinates, attributes,
header) with those of the embedded stream; and a missing, wrong or forged grid must fail
in one line before anything is decoded. Real data throughout: the vendored MPI-OM crop
(curvilinear), geodesic grid (unstructured) and T42 file (Gaussian: nothing to refer to),
the shipped general climate checkpoint, the real CLI (one child process for the
headline, the rest in-process through ``main``, the same parser and code).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr
from clirun import mscn, ok
from forge import forge, parse
from ncheader import header

from mscn_core.bitstream import BitstreamError
from mscn_core.checkpoint import load_checkpoint
from mscn_core.cli import main
from mscn_core.pipeline import decode_stream, encode_items, merge_common
from mscn_core.registry import get_modality
from mscn_datasets import climate, vendored_path
from mscn_plugins import sphere as sp

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "plugins" / "checkpoints" / "climate_general.safetensors"
CROP = vendored_path("mpiom_tos_curvilinear_crop.nc")  # curvilinear, 120 x 128
GEO = vendored_path("geodesic_2562cells_t0.nc")  # unstructured, radians, 3 fields
GAUSS = vendored_path("t42_gaussian_uv300_U.nc")
ERA5 = vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")
SEAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "climate" / \
    "ncl_seam_ps_2d_latlon.nc"
FAST = ["--checkpoint", CKPT, "--threads", "1"]
DECODE_ONLY = ("history", "mscn_bits_per_value")  # what differs by design: the stream size


def _run(capsys, *argv) -> tuple[int, str, str]:
    """``mscn ARGV`` in-process: exit code, stdout, stderr."""
    rc = main([str(a) for a in (*argv, *FAST)])
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(capsys, *argv) -> str:
    """The one error line of a refused command (exit 2)."""
    rc, _, err = _run(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln and not ln.startswith("mscn: warning:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def _dataset(path: Path) -> xr.Dataset:
    with xr.open_dataset(path, decode_times=False) as ds:
        ds = ds.load()
    ds.attrs = {k: v for k, v in ds.attrs.items() if k not in DECODE_ONLY}
    for v in ds.variables.values():
        v.attrs = {k: a for k, a in v.attrs.items() if k not in DECODE_ONLY}
    return ds


def _header(path: Path) -> dict:
    h = header(path)
    h["global"] = {k: v for k, v in h["global"].items() if k not in DECODE_ONLY}
    for v in h["variables"].values():
        v["attrs"] = {k: a for k, a in v["attrs"].items() if k not in DECODE_ONLY}
    return h


def _assert_same_file(a: Path, b: Path) -> None:
    """Values, coordinates, attributes and the ncdump-level header are identical."""
    xr.testing.assert_identical(_dataset(a), _dataset(b))
    assert _header(a) == _header(b)


def _encode_both(run, src: Path, folder: Path) -> dict[str, Path]:
    out = {}
    for mode in ("embed", "reference"):
        out[mode] = folder / f"{mode}.mscn"
        run("encode", src, "--grid-storage", mode, "-o", out[mode])
    return out


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> dict[str, Path]:
    """The MPI-OM crop encoded both ways by the real ``mscn`` in a child process."""
    folder = tmp_path_factory.mktemp("crop")
    return _encode_both(lambda *a: ok(mscn(*a, *FAST)), CROP, folder)


@pytest.fixture(scope="module")
def ck():
    return load_checkpoint(CKPT)


# -- sizes and identical decodes ----------------------------------------------------------
def test_curvilinear_reference_stream_is_tiny_and_decodes_to_the_same_file(crop, tmp_path):
    emb, ref = (crop[m].stat().st_size for m in ("embed", "reference"))
    print(f"\nMPI-OM crop 120x128: embedded {emb:,} B, reference {ref:,} B")
    assert ref < 0.1 * emb, (emb, ref)
    a, b = tmp_path / "embed.nc", tmp_path / "reference.nc"
    ok(mscn("decode", crop["embed"], "-o", a, *FAST))
    ok(mscn("decode", crop["reference"], "--grid-file", CROP, "-o", b, *FAST))
    _assert_same_file(a, b)
    with xr.open_dataset(b) as ds:  # the grid file's coordinates, its attributes too
        assert ds["lat"].attrs["standard_name"] == "latitude" and ds["lat"].dtype == "float32"


def test_unstructured_reference_stream_decodes_to_the_same_file(capsys, tmp_path):
    streams = _encode_both(lambda *a: _run(capsys, *a), GEO, tmp_path)
    emb, ref = (streams[m].stat().st_size for m in ("embed", "reference"))
    print(f"\ngeodesic 2562 cells, 3 fields: embedded {emb:,} B, reference {ref:,} B")
    assert ref < 0.2 * emb, (emb, ref)
    header_ = parse(streams["reference"].read_bytes())[0]
    tmpl = merge_common(header_["extra"]["common"], header_["items"][0])["template"]
    assert tmpl["grid_ref"]["kind"] == "unstructured"
    assert tmpl["grid_ref"]["file"] == GEO.name
    assert {k for k, c in tmpl["coords"].items() if isinstance(c["data"], dict)
            and "ref" in c["data"]} == {
        "grid_center_lat", "grid_center_lon"}  # radians, stored as data variables
    a, b = tmp_path / "embed.nc", tmp_path / "reference.nc"
    assert _run(capsys, "decode", streams["embed"], "-o", a)[0] == 0
    assert _run(capsys, "decode", streams["reference"], "--grid-file", GEO, "-o", b)[0] == 0
    _assert_same_file(a, b)
    with netCDF4.Dataset(b) as nc:  # written back as data variables, as in the input
        assert "grid_center_lat" in nc.variables and "coordinates" not in \
            nc["grid_center_lat"].ncattrs()


@pytest.mark.parametrize("path", [GAUSS, ERA5], ids=["gaussian", "regular"])
def test_one_dimensional_axes_stay_embedded(path):
    """Regular, Gaussian (and regional) grids: --grid-storage reference changes nothing."""
    m = get_modality("sphere")
    item = m.read(path)[0]
    ref = m.item_template(item, sp.SphereOptions(grid_storage="reference"))
    assert "grid_ref" not in ref
    assert ref == m.item_template(item)


def test_decode_to_a_regular_grid_uses_the_grid_file(crop, capsys, tmp_path):
    """--resolution needs the grid too (the NaN mask and extent are carried by nearest
    input point): with it, the same file as the embedded stream gives."""
    a, b = tmp_path / "embed.nc", tmp_path / "reference.nc"
    assert _run(capsys, "decode", crop["embed"], "--resolution", "10", "-o", a)[0] == 0
    assert _run(capsys, "decode", crop["reference"], "--resolution", "10", "--grid-file",
                CROP, "-o", b)[0] == 0
    _assert_same_file(a, b)


# -- one-line refusals, before any decoding ------------------------------------------------
def test_a_referenced_grid_without_grid_file_is_refused(crop, capsys, tmp_path):
    out = tmp_path / "x.nc"
    line = _refused(capsys, "decode", crop["reference"], "-o", out)
    sha = json.dumps(parse(crop["reference"].read_bytes())[0])
    assert "stream references grid sha256 " in line and "… (from " in line
    assert f"(from {CROP.name}); pass --grid-file FILE holding it" in line
    assert line.split("sha256 ")[1][:12] in sha
    assert not out.exists()


def test_a_grid_file_with_another_grid_is_refused(crop, capsys, tmp_path):
    other = tmp_path / "moved_grid.nc"
    shutil.copy(CROP, other)
    with netCDF4.Dataset(other, "a") as nc:  # the same names and shape, one point moved
        nc["lat"][0, 0] = nc["lat"][0, 0] + 0.5
    out = tmp_path / "x.nc"
    line = _refused(capsys, "decode", crop["reference"], "--grid-file", other, "-o", out)
    with xr.open_dataset(CROP) as ds:
        want = climate.grid_sha256(ds["lat"].variable, ds["lon"].variable)
    with xr.open_dataset(other) as ds:
        have = climate.grid_sha256(ds["lat"].variable, ds["lon"].variable)
    assert f"grid file {other} has grid {have[:12]}, the stream needs {want[:12]}" in line
    assert not out.exists()


def test_a_grid_file_without_the_coordinates_is_refused(crop, capsys, tmp_path):
    out = tmp_path / "x.nc"
    line = _refused(capsys, "decode", crop["reference"], "--grid-file", GEO, "-o", out)
    assert f"grid file {GEO} has no lat and no lon (the stream's curvilinear grid is " \
        "lat/lon)" in line
    assert "grid_center_lat/grid_center_lon" in line  # what the file has instead
    assert not out.exists()


# -- forged references: one-line ValueErrors from check_meta, BitstreamError from decode ---
def _meta(stream: Path) -> dict:
    h = parse(stream.read_bytes())[0]
    return merge_common(h["extra"]["common"], h["items"][0])


def _grid_ref(key, value):
    def mutate(meta):
        if value is None:
            del meta["template"]["grid_ref"][key]
        else:
            meta["template"]["grid_ref"][key] = value
    return mutate


def _coord_data(value):
    def mutate(meta):
        meta["template"]["coords"]["lat"]["data"] = value
    return mutate


FORGED = {
    "sha_short": (_grid_ref("sha256", "ab" * 31), "sha256 must be 64 lowercase hex digits"),
    "sha_number": (_grid_ref("sha256", 12), "sha256 must be 64 lowercase hex digits"),
    "sha_missing": (_grid_ref("sha256", None), "grid_ref must have exactly"),
    "extra_key": (_grid_ref("url", "http://x"), "grid_ref must have exactly"),
    "file_path": (_grid_ref("file", "../../etc/passwd"), "file must be a file's base name"),
    "file_list": (_grid_ref("file", ["a"]), "file must be a file's base name"),
    "kind": (_grid_ref("kind", "gaussian"), "kind must be one of"),
    "kind_item": (_grid_ref("kind", "unstructured"), "is a unstructured grid, the item says"),
    "lat_name": (_grid_ref("lat", "time"), "but the coordinates that refer to it are"),
    "lat_type": (_grid_ref("lat", 5), "is not a usable name"),
    "not_object": (lambda m: m["template"].__setitem__("grid_ref", "sha"),
                   "grid_ref must be an object"),
    "no_grid_ref": (lambda m: m["template"].pop("grid_ref"), "the template has no grid_ref"),
    "ref_keys": (_coord_data({"ref": "grid", "shape": [120, 128], "zlib": ""}),
                 "a grid reference needs exactly"),
    "ref_kind": (_coord_data({"ref": "file", "shape": [120, 128]}),
                 "a grid reference needs exactly"),
    "ref_shape": (_coord_data({"ref": "grid", "shape": [120]}), "shape does not match its dims"),
    "ref_size": (_coord_data({"ref": "grid", "shape": [120, 10**12]}), "shape must be in"),
    "ref_other_size": (_coord_data({"ref": "grid", "shape": [121, 128]}), "has sizes"),
}


@pytest.mark.parametrize("name", sorted(FORGED))
def test_forged_reference_is_refused_in_one_line(crop, name):
    m = get_modality("sphere")
    meta = _meta(crop["reference"])
    opts = sp.SphereOptions(grid_file=str(CROP))
    assert m.check_meta(copy.deepcopy(meta), opts) == 120 * 128  # the real one passes
    mutate, message = FORGED[name]
    mutate(meta)
    with pytest.raises(ValueError) as info:
        m.check_meta(meta, opts)
    assert "\n" not in str(info.value) and message in str(info.value), str(info.value)


def test_a_reference_on_a_regular_grid_is_refused():
    m = get_modality("sphere")
    item = m.read(ERA5, var="t", sel=["isobaricInhPa=850", "number=8"])[0]
    meta = json.loads(json.dumps(dict(m.to_signal(item).meta, template=m.item_template(item))))
    meta["template"]["grid_ref"] = {"sha256": "0" * 64, "file": "", "kind": "curvilinear",
                                    "lat": "latitude", "lon": "longitude"}
    with pytest.raises(ValueError, match="grid_ref on a regular grid"):
        m.check_meta(meta)


def test_forged_stream_is_refused_before_decoding(crop, ck):
    """Through the core's decoder: the forged grid_ref is one line of BitstreamError."""
    def mutate(h, p):
        common = h["extra"]["common"]
        common["template"]["grid_ref"]["sha256"] = "Z" * 64
    data = forge(crop["reference"].read_bytes(), mutate)
    with pytest.raises(BitstreamError, match=r"^item 0: template grid_ref sha256 must be"):
        decode_stream(data, ck, sp.SphereOptions(grid_file=str(CROP)))


# -- the Python API: bounded encode, the xarray backend -----------------------------------
def test_bounded_encode_and_the_xarray_backend_with_a_referenced_grid(ck, tmp_path):
    """A bounded encode reconstructs with the grid it just referred to (no grid file);
    ``xr.open_dataset(engine="mscn", grid_file=...)`` reads the stream."""
    m = get_modality("sphere")
    m.load_state(ck.modality_state)
    items = m.read(GEO, var="height")
    data, _ = encode_items(ck, m, items, bits=6, with_metrics=False, max_abs_error=5.0,
                           options=sp.SphereOptions(grid_storage="reference"))
    with pytest.raises(BitstreamError, match="pass --grid-file FILE holding it"):
        decode_stream(data, ck)  # a fresh plugin instance: it needs the grid file
    got = decode_stream(data, ck, sp.SphereOptions(grid_file=str(GEO))).artifacts[0]
    assert float(np.nanmax(np.abs(got.values - items[0].values))) <= 5.0
    stream = tmp_path / "h.mscn"
    stream.write_bytes(data)
    ds = xr.open_dataset(stream, engine="mscn", checkpoint=CKPT, grid_file=GEO)
    np.testing.assert_array_equal(ds["height"].values[0], got.values)
    np.testing.assert_array_equal(ds["grid_center_lat"].values, items[0]["grid_center_lat"])


# -- labels of fields whose item coordinate is missing ---------------------------------------
@pytest.mark.skipif(not SEAM.is_file(), reason=f"{SEAM} is absent")
def test_fields_with_missing_times_get_distinct_labels():
    """SEAM's 12 times are all the netCDF fill value: the labels that keep training and
    validation apart must still tell the 12 fields apart (read and scan alike)."""
    m = get_modality("sphere")
    fields = m.read(SEAM)
    assert len(fields) == 12
    labels = [m.item_label(f) for f in fields]
    assert len(set(labels)) == 12, labels
    assert [r.label for r in m.scan(SEAM)] == labels
    assert labels[3].count("#3") == 1
    era5 = m.read(ERA5, var="t", sel=["isobaricInhPa=850"])  # unique coordinates: as ever
    assert all("#" not in m.item_label(f) for f in era5)
