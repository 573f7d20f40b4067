"""Property: encode -> decode of any selection of a real climate file is a faithful copy
of that selection (issue 8 part 5).

Hypothesis draws a file (the shared climate files where present, and the vendored ones),
a non-empty subset of its gridded variables (or None: all), and for item dimensions all
values, one value or a list of values (in any order), as the exact ``--sel`` strings a user
would type, built from the file's own coordinate values (times as ISO strings, with a T or
a space; 850 or 850.0; the dim's name in another case; a scalar coordinate by its own
value), and the bits per code value.  Sometimes NaN holes are punched into a copy of
the file first (every grid kind: regular, Gaussian, curvilinear, unstructured), stored as
the variable's ``_FillValue``/``missing_value`` where it has one.  The selection goes
through the Python API (``read`` -> ``encode_items`` -> ``decode_stream`` -> ``save``) and
the written file must have the selection's variables, dims and sizes (a single value makes
a dim a scalar coordinate, a list keeps it), coordinates (names and values, times equal),
variable and global attributes (``history`` gains one line, ``mscn_*`` may be added),
dtypes, and NaN exactly where the selected input is NaN.  Structure, not quality: the tiny
checkpoint, one inner step.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st
from ncheader import compare_headers, header

from mscn_core.checkpoint import load_checkpoint
from mscn_core.pipeline import decode_stream, encode_items
from mscn_core.registry import get_modality
from mscn_datasets import climate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "climate"
VENDORED = Path(__file__).resolve().parents[1] / "datasets" / "data"
# the shared files where present, and always the vendored ones (NETCDF4 variants: deflate,
# chunks, float32); names are unique across both
PATHS = {p.name: p for folder in (SHARED, VENDORED) if folder.is_dir()
         for p in sorted(folder.glob("*.nc"))}
if not PATHS:
    pytest.skip(f"no climate files in {SHARED} or {VENDORED}", allow_module_level=True)

MAX_ALL = 3  # an item dim is taken whole only up to this size (keeps examples fast)
MAX_LIST = 3  # values in a list selection
MAX_ITEMS = 24  # fields per example at most (more: the extra dims are pinned to one value)
# Drawn examples besides the explicit ones below, derandomized (CI is reproducible); to hunt
# longer: MSCN_PROPERTY_EXAMPLES=60 MSCN_PROPERTY_SEED=1 pytest tests/test_roundtrip_property.py
EXAMPLES = int(os.environ.get("MSCN_PROPERTY_EXAMPLES", "30"))
SEED = os.environ.get("MSCN_PROPERTY_SEED")


def _fmt(v) -> str:
    """A coordinate value as typed after ``--sel DIM=``; exact at 1e-6 relative."""
    return climate._fmt_value(v)


def _survey(path: Path) -> dict:
    """Gridded variables, their item dims with coordinate values, and which can hold NaN."""
    with climate.open_climate(path) as ds:
        names = climate._gridded_variables(ds)
        ds = climate.promote_grid_coords(ds)
        dims: dict[str, list] = {}
        per_var: dict[str, list[str]] = {}
        nan_ok = []
        scalars: dict[str, list] = {}  # variable -> its scalar coordinates (ERA5's step)
        for n in names:
            da = ds[n]
            hdims = climate._horizontal(da)
            per_var[n] = [str(d) for d in da.dims if d not in hdims]
            for d in per_var[n]:
                dims.setdefault(d, list(np.asarray(da[d].values)) if d in da.coords else None)
            for c, cv in da.coords.items():
                if cv.ndim == 0 and c not in da.dims:
                    scalars.setdefault(n, []).append((str(c), cv.values[()]))
            enc = da.encoding
            if da.dtype.kind == "f" and "scale_factor" not in enc and "add_offset" not in enc:
                nan_ok.append(n)
    return {"vars": names, "item_dims": per_var, "coords": dims, "nan_ok": nan_ok,
            "scalars": scalars}


SURVEY = {name: _survey(p) for name, p in PATHS.items()}


def _key_spellings(dim: str, dims: dict) -> list[str]:
    """``dim`` as typed: itself, or in another case where that names no other dim."""
    out = [dim]
    for k in (dim.lower(), dim.upper()):
        if k not in out and sum(str(d).lower() == k.lower() for d in dims) == 1:
            out.append(k)
    return out


def _spelling(v) -> st.SearchStrategy[str]:
    """Ways of typing one coordinate value that must select it: 850 / 850.0, a time with
    a T or a space."""
    text = _fmt(v)
    ways = [text]
    if isinstance(v, np.floating | float) and float(v).is_integer() and abs(v) < 1e15:
        ways += [str(int(v)), f"{float(v)!r}"]
    if isinstance(v, np.integer | int):
        ways.append(f"{int(v)}.0")
    if "T" in text and text[:1].isdigit() and text.count("-") >= 2:
        ways.append(text.replace("T", " "))
    return st.sampled_from(ways)


@st.composite
def selections(draw):
    """(file name, var or None, --sel strings, expected isel per dim, NaN plan)."""
    name = draw(st.sampled_from(sorted(SURVEY)))
    s = SURVEY[name]
    if len(s["vars"]) > 1 and draw(st.booleans()):
        var = draw(st.lists(st.sampled_from(s["vars"]), min_size=1, max_size=len(s["vars"]),
                            unique=True))
    else:
        var = None
    chosen = s["vars"] if var is None else var
    item_dims = list(dict.fromkeys(d for v in chosen for d in s["item_dims"][v]))
    sel: list[str] = []
    isel: dict[str, int | list[int]] = {}
    n_items = len(chosen)
    for d in item_dims:
        vals = s["coords"][d]
        if vals is None:
            continue
        keys = [_fmt(v) for v in vals]
        first = {k: keys.index(k) for k in keys}  # a repeated value selects its first
        uniq = list(first)
        modes = ["one"] + (["all"] if len(vals) <= MAX_ALL else []) + (
            ["list"] if len(uniq) > 1 else [])
        mode = draw(st.sampled_from(modes))
        if n_items * len(vals) > MAX_ITEMS and mode == "all":
            mode = "one"
        if mode == "all":
            n_items *= len(vals)
            continue
        key = draw(st.sampled_from(_key_spellings(d, s["coords"])))
        if mode == "one":
            k = draw(st.sampled_from(uniq))
            sel.append(f"{key}={draw(_spelling(vals[first[k]]))}")
            isel[d] = first[k]
            continue
        ks = draw(st.lists(st.sampled_from(uniq), min_size=2,
                           max_size=min(MAX_LIST, len(uniq)), unique=True))
        if n_items * len(ks) > MAX_ITEMS:
            ks = ks[:1]
            sel.append(f"{key}={draw(_spelling(vals[first[ks[0]]]))}")
            isel[d] = first[ks[0]]
            continue
        n_items *= len(ks)
        sel.append(f"{key}={','.join([draw(_spelling(vals[first[k]])) for k in ks])}")
        isel[d] = [first[k] for k in ks]
    # a scalar coordinate selected by its own value: a no-op
    for c, value in dict(x for v in chosen for x in s["scalars"].get(v, [])).items():
        if draw(st.booleans()):
            sel.append(f"{c}={draw(_spelling(value))}")
    nan = None
    holes = [v for v in chosen if v in s["nan_ok"]]
    if holes and draw(st.booleans()):
        nan = {"vars": draw(st.lists(st.sampled_from(holes), min_size=1, unique=True)),
               "fraction": draw(st.sampled_from([0.002, 0.05, 0.3])),
               "seed": draw(st.integers(0, 2**16))}
    return name, var, sel, isel, nan


def _isel(name: str, sel: list[str]) -> dict[str, int | list[int]]:
    """The indices a --sel list picks in ``name`` (a repeated value: its first)."""
    out: dict[str, int | list[int]] = {}
    for item in sel:
        d, _, text = item.partition("=")
        keys = [_fmt(v) for v in SURVEY[name]["coords"][d]]
        idx = [keys.index(k) for k in text.split(",")]
        out[d] = idx if len(idx) > 1 else idx[0]
    return out


def _case(name: str, var: list[str] | None, sel: list[str], nan: dict | None = None):
    return name, var, sel, _isel(name, sel), nan


def _holes(*names: str, fraction: float = 0.05) -> dict:
    return {"vars": list(names), "fraction": fraction, "seed": 7}


# Always run, on the files present: one field, stacks along each kind of dim (time, level,
# member; a list out of order), scalar coordinates only, several variables, a variable
# without the selected dim, and NaN holes on every grid kind.
EXAMPLES_ALWAYS = []
if SHARED.is_dir():
    EXAMPLES_ALWAYS += [
        _case("etopo60_relief_1deg.nc", None, []),
        _case("era5_t_z_3deg_2017-01-01.nc", ["t"],
              ["number=3", "time=2017-01-02T00:00:00,2017-01-01T12:00:00", "isobaricInhPa=850"]),
        _case("era5_t_z_3deg_2017-01-01.nc", None,
              ["number=1,7", "time=2017-01-02T12:00:00", "isobaricInhPa=500"]),
        _case("ncl_t42_T_PS_18lev.nc", None, ["lev=4.809299946"],
              _holes("T", "PS")),  # Gaussian; PS has no lev
        _case("coads_climatology_2deg.nc", ["SST", "AIRT"], ["TIME=366"]),  # regular, land NaN
        _case("ncl_geodesic_2562cells_unstructured.nc", ["height", "tracer_1"], [],
              _holes("height", "tracer_1")),
        _case("ncl_mpiom_tos_bipolar_curvilinear.nc", None, [], _holes("tos", fraction=0.3)),
        _case("ncl_seam_ps_2d_latlon.nc", None, ["time=9.969209968e+36"], _holes("ps")),
        _case("ncl_pop_ocean_curvilinear.nc", ["t", "urot"], []),
    ]
if VENDORED.is_dir():
    EXAMPLES_ALWAYS += [
        _case("etopo_relief_2deg_blockmean.nc", None, []),
        _case("era5_t_z_3deg_2017-01-01_float32.nc", None,
              ["number=1,7", "time=2017-01-02T12:00:00", "isobaricInhPa=500"]),
        _case("t42_gaussian_uv300_U.nc", None, ["time=1"], _holes("U")),  # Gaussian
        _case("coads_sst_airt_2deg_jan-mar.nc", None, []),  # regular, land NaN
        # unstructured, one time: 1-D fields (deflated, chunked whole in NETCDF4)
        _case("geodesic_2562cells_t0.nc", None, ["time=0001-01-01T12:00:00"],
              _holes("height", "relative")),
        _case("mpiom_tos_curvilinear_crop.nc", None, [], _holes("tos", fraction=0.3)),
    ]


def _with_examples(test):
    for case in reversed(EXAMPLES_ALWAYS):
        test = example(case=case, bits=4)(test)
    return test


def _punch_holes(src: Path, dst: Path, nan: dict) -> None:
    """A copy of ``src`` with a random ``fraction`` of the cells of ``nan["vars"]`` missing
    (raw ``_FillValue``/``missing_value`` where declared, else NaN); no field is all NaN
    (the reader refuses those)."""
    shutil.copyfile(src, dst)
    rng = np.random.default_rng(nan["seed"])
    with netCDF4.Dataset(dst, "a") as nc:
        for name in nan["vars"]:
            v = nc[name]
            v.set_auto_maskandscale(False)
            raw = np.array(v[...])
            fill = next((v.getncattr(a) for a in ("_FillValue", "missing_value")
                         if a in v.ncattrs()), np.nan)
            hole = rng.random(raw.shape) < nan["fraction"]  # <= 0.3 of >= 2562 cells
            raw[hole] = np.asarray(fill, dtype=raw.dtype)
            v[...] = raw


class _Quiet:
    """The checkpoint, shown in one word in hypothesis' falsifying-example report."""

    def __init__(self, ck):
        self.ck = ck

    def __repr__(self) -> str:
        return "<tiny sphere checkpoint>"


@pytest.fixture(scope="module")
def codec(tiny_sphere_checkpoint):
    ck = load_checkpoint(tiny_sphere_checkpoint)
    ck.rep.cfg.inner_steps = 1  # structure, not quality
    return _Quiet(ck)


def _expected_header(hin: dict, isel: dict) -> dict:
    """The input's header after the selection: a single value drops the dim (its coordinate
    becomes a scalar), a list sets its size."""
    out = {**hin, "dimensions": dict(hin["dimensions"]),
           "variables": {k: dict(v) for k, v in hin["variables"].items()}}
    for d, idx in isel.items():
        if isinstance(idx, list):
            out["dimensions"][d] = (len(idx), hin["dimensions"][d][1])
            continue
        out["dimensions"].pop(d, None)
        for v in out["variables"].values():
            v["dims"] = tuple(x for x in v["dims"] if x != d)
    return out


def _decoded(path: Path) -> xr.Dataset:
    """Opened as the reader opens it (times numpy, else cftime, else raw numbers)."""
    return climate.open_climate(path)


@seed(int(SEED or 0))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@_with_examples
@given(case=selections(), bits=st.sampled_from([2, 5, 8]))
def test_selection_round_trips_faithfully(codec, tmp_path_factory, case, bits):
    codec = codec.ck
    name, var, sel, isel, nan = case
    tmp = tmp_path_factory.mktemp("prop")
    src = PATHS[name]
    if nan is not None:
        _punch_holes(src, tmp / name, nan)
        src = tmp / name
    m = get_modality("sphere")
    m.load_state(codec.modality_state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing else leaks to the user
        # what the tiny checkpoint says of fields it was not trained on
        warnings.filterwarnings("ignore", message=".* is not in the checkpoint's training set")
        warnings.filterwarnings("ignore", message=".* outside the checkpoint's training range")
        warnings.filterwarnings("ignore", message=".* far outside this checkpoint's experience")
        items = m.read(src, var=var, sel=sel or None)
        data, _ = encode_items(codec, m, items, bits=bits, with_metrics=False)
        decoded = decode_stream(data, codec)
        out = decoded.modality.save(decoded.artifacts, tmp / "out.nc",
                                    provenance={"checkpoint_sha256": codec.sha256, "bits": bits})
    names = list(dict.fromkeys(str(f.name) for f in items))
    hin, hout = header(src), header(out)
    expected_names = SURVEY[name]["vars"] if var is None else var
    assert names == list(expected_names)
    # every chosen variable is written, and no other field
    fields_out = set(hout["variables"]) & set(SURVEY[name]["vars"])
    assert fields_out == set(names), (name, var, sel, fields_out ^ set(names))
    want = _expected_header(hin, isel)
    diffs = compare_headers(want, hout, names)
    # a dim selected to one value becomes a scalar coordinate: CF names it in `coordinates`
    scalar = {d for d, i in isel.items() if not isinstance(i, list)}
    diffs = [x for x in diffs if not _scalar_coordinates_note(x, hin, hout, scalar)]
    assert diffs == [], f"{name} var={var} sel={sel} nan={nan}: {diffs}"
    # same dims and sizes for each written variable
    with _decoded(src) as a, _decoded(out) as b:
        a = climate.promote_grid_coords(a)
        b = climate.promote_grid_coords(b)
        for n in names:
            exp = a[n].isel({d: i for d, i in isel.items() if d in a[n].dims})
            got = b[n]
            assert got.dims == exp.dims, (n, sel)
            assert got.shape == exp.shape, (n, sel)
            assert got.dtype == exp.dtype, (n, sel)
            # xarray gives every variable of a Dataset its scalar coordinates: a dim another
            # variable had selected to one value shows up here (the file says otherwise)
            extra = set(got.coords) - set(exp.coords)
            assert set(exp.coords) <= set(got.coords), (n, sel, set(exp.coords) - set(got.coords))
            assert all(got[c].ndim == 0 and c in isel for c in extra), (n, sel, extra)
            for c in exp.coords:
                np.testing.assert_array_equal(np.asarray(got[c].values),
                                              np.asarray(exp[c].values),
                                              err_msg=f"{n} coordinate {c} ({sel})")
                assert got[c].dims == exp[c].dims, (n, c, sel)
            if exp.dtype.kind == "f":
                ev, gv = np.asarray(exp.values), np.asarray(got.values)
                np.testing.assert_array_equal(np.isnan(gv), np.isnan(ev),
                                              err_msg=f"{n}: NaN moved ({sel}, {nan})")
                assert np.isfinite(gv[~np.isnan(ev)]).all(), (n, sel)
        # global attributes other than history and mscn_* are compared in the header


def _scalar_coordinates_note(diff: str, hin: dict, hout: dict, scalar: set[str]) -> bool:
    """`V:coordinates None -> ('str', 'a b')` where a, b are dims of V (in the input)
    selected to one value: a scalar coordinate named as CF asks."""
    head, sep, _ = diff.partition(":coordinates ")
    if not sep or head not in hout["variables"]:
        return False
    got = hout["variables"][head]["attrs"].get("coordinates")
    had = hin["variables"].get(head, {}).get("attrs", {}).get("coordinates")
    if got is None:
        return False
    extra = set(got[1].split()) - (set(had[1].split()) if had else set())
    own = set(hin["variables"].get(head, {}).get("dims", ()))
    return bool(extra) and extra <= scalar & own
