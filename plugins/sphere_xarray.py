"""``xr.open_dataset("x.mscn", engine="mscn")`` and the ``ds.mscn`` / ``da.mscn`` accessors.

Why a backend: a climate user should read a ``.mscn`` stream like any NetCDF, decoding
only what they look at. Opening parses the header, finds the checkpoint the stream names
(``checkpoint=``, else by hash through :mod:`mscn_core.catalog`), validates every item
(the core's ``check_items``) and builds coordinates and attributes from the item
templates; no payload is decoded until values are asked for, and then only the fields
(items) the index touches (with dask, ``chunks={}`` gives one chunk per field).

This module imports neither torch nor the sphere plugin at import time: xarray imports
it to list its engines, and ``guess_can_open`` only sniffs the magic.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

MAGIC = b"MSCN"
SUFFIX = ".mscn"

# the source's value encoding, kept so ds.to_netcdf writes like `mscn decode` (not its
# storage layout: chunk sizes of another shape would be refused)
_ENCODING = ("dtype", "_FillValue", "missing_value", "scale_factor", "add_offset")
_decode_lock = threading.Lock()  # one decode at a time: torch already uses every core


# -- opening ------------------------------------------------------------------------------
def _read_bytes(source: Any) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if hasattr(source, "read"):
        if hasattr(source, "seek"):
            source.seek(0)
        return bytes(source.read())
    return Path(os.fspath(source)).read_bytes()


def _resolve_checkpoint(stream_hash: str, checkpoint: Any, checkpoint_dirs: Iterable) -> Any:
    """A loaded checkpoint: the one given (path or object), else found by the stream's hash."""
    from mscn_core.catalog import find_checkpoint
    from mscn_core.checkpoint import Checkpoint, load_checkpoint

    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if checkpoint is None:
        if isinstance(checkpoint_dirs, str | os.PathLike):
            checkpoint_dirs = [checkpoint_dirs]
        checkpoint = find_checkpoint(stream_hash, checkpoint_dirs)
    return load_checkpoint(checkpoint)


def _zeros(coords: Any) -> Any:
    """A predictor that evaluates nothing: the reconstruct path gives metadata for free."""
    import torch

    return torch.zeros(coords.shape[0], 1)


class MscnArray(BackendArray):
    """One data variable of a stream: ``item_of`` maps each field position (the item dims,
    in the variable's order) to its item in the stream; a read decodes just those items."""

    def __init__(self, source: _Source, item_of: np.ndarray, dims: tuple[str, ...],
                 grid_dims: tuple[str, ...], shape: tuple[int, ...], dtype: np.dtype):
        self.source, self.item_of, self.dims = source, item_of, dims
        self.grid_dims, self.shape, self.dtype = grid_dims, shape, np.dtype(dtype)
        self.item_axes = [i for i, d in enumerate(dims) if d not in grid_dims]
        self.grid_axes = [i for i, d in enumerate(dims) if d in grid_dims]

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._raw_getitem)

    def _raw_getitem(self, key: tuple) -> np.ndarray:
        idx = [np.arange(n)[k] for n, k in zip(self.shape, key, strict=True)]
        keep = [np.ndim(i) > 0 for i in idx]  # integer keys drop their dim
        idx = [np.atleast_1d(i) for i in idx]
        order = self.item_axes + self.grid_axes  # internal layout: items, then grid
        items = self.item_of[np.ix_(*[idx[a] for a in self.item_axes])]
        gidx = [idx[a] for a in self.grid_axes]  # 2 grid dims, or 1 (unstructured cells)
        out = np.empty(items.shape + tuple(len(g) for g in gidx), dtype=self.dtype)
        if out.size:
            for pos in np.ndindex(*items.shape):
                field = self.source.field(int(items[pos]))
                out[pos] = field.transpose(*[self.dims[a] for a in self.grid_axes]
                                           ).values[np.ix_(*gidx)]
        out = out.transpose(np.argsort(order))  # back to the variable's dim order
        return out.reshape([s for s, k in zip(out.shape, keep, strict=True) if k])


class _Source:
    """What every variable of one opened stream shares: stream, checkpoint, plugin."""

    def __init__(self, stream: Any, ck: Any, modality: Any, options: Any):
        self.stream, self.ck, self.modality, self.options = stream, ck, modality, options

    def field(self, index: int) -> xr.DataArray:
        from mscn_core import pipeline

        with _decode_lock:  # looked up at call time, so tests can count decodes
            return pipeline.decode_item(self.stream, index, self.ck, self.modality,
                                        self.options)


def _grid_dims(field: xr.DataArray) -> tuple[str, ...]:
    """The horizontal dims of a decoded field, in its order: (lat, lon) of a regular
    grid, the 2 dims of a Gaussian/regional/curvilinear grid, the cell dim of an
    unstructured one."""
    from mscn_datasets import climate

    grid = climate.find_grid(field)
    return tuple(str(d) for d in field.dims if d in grid.dims)


def _stack(stream: Any, modality: Any, options: Any
           ) -> list[tuple[xr.DataArray, xr.DataArray]]:
    """Per variable: (the stacked array of 1x1 skeletons whose values are item numbers,
    a full-size skeleton of its first item). Skeletons come from the plugin's own
    reconstruct (with a predictor that evaluates nothing) and stacking, so dims, coords
    and attrs are those ``mscn decode`` writes; only one full-size field per variable is
    kept, whatever the number of items."""
    from mscn_core.pipeline import merge_common
    from mscn_datasets import climate

    common = stream.extra.get("common", {})
    tiny, firsts = [], {}
    for i, meta in enumerate(stream.items_meta):
        s = modality.reconstruct(merge_common(common, meta), _zeros, options)
        firsts.setdefault(str(s.name), s)
        t = s.isel({d: slice(0, 1) for d in _grid_dims(s)})
        tiny.append(t.copy(data=np.full(t.shape, i, dtype=np.float64)))  # exact item numbers
    return [(st, firsts[str(st.name)]) for st in climate.stack_variables(tiny)]


def open_mscn(filename_or_obj: Any, *, drop_variables: str | Iterable[str] | None = None,
              checkpoint: Any = None, checkpoint_dirs: Iterable[str | os.PathLike] = (),
              resolution: float | None = None,
              grid_file: str | os.PathLike | None = None) -> xr.Dataset:
    """A ``.mscn`` climate stream as a lazily decoded Dataset (see the module docstring).

    ``checkpoint``: a path (or loaded checkpoint); None finds it by the stream's hash in
    ``checkpoint_dirs``, ``MSCN_CHECKPOINTS`` and the shipped folders. ``resolution``:
    degrees of a new global grid to decode onto (the network is continuous).
    ``grid_file``: the file holding the grid of a stream encoded with
    ``grid_storage="reference"`` (checked by its hash, read when the stream is opened).
    """
    from mscn_core import bitstream as bs
    from mscn_core import pipeline
    from mscn_core.registry import get_modality

    data = _read_bytes(filename_or_obj)
    stream = bs.read_bitstream(data)  # a damaged stream fails here, in one line
    if stream.modality != "sphere":
        raise ValueError(f"engine='mscn' reads climate ('sphere') streams; this one holds "
                         f"{stream.modality!r} items: decode it with `mscn decode`")
    ck = _resolve_checkpoint(stream.checkpoint_hash, checkpoint, checkpoint_dirs)
    if ck.sha256 != stream.checkpoint_hash:
        raise bs.BitstreamError(f"checkpoint mismatch: stream needs checkpoint "
                                f"{stream.checkpoint_hash[:12]}, got {ck.sha256[:12]}")
    modality = get_modality(stream.modality)
    modality.load_state(ck.modality_state)
    options = modality.options(resolution=resolution,
                               grid_file=None if grid_file is None else os.fspath(grid_file))
    pipeline.quantizer(ck, stream.bits)  # the checkpoint has tables for these bits
    n_values = pipeline.check_items(stream, modality, ck.rep.code_size(), options)
    if not stream.items_meta:
        raise bs.BitstreamError("the stream holds no items")
    source = _Source(stream, ck, modality, options)
    prov = {"checkpoint_sha256": ck.sha256}
    if n_values > 0:
        prov["bits_per_value"] = 8 * len(data) / n_values
    data_vars, coords, gattrs = {}, {}, None
    for st, first in _stack(stream, modality, options):
        gattrs = gattrs if gattrs is not None else _global_attrs(st, prov, stream.bits)
        grid = _grid_dims(first)
        shape = tuple(first.sizes[d] if d in grid else st.sizes[d] for d in st.dims)
        item_of = st.isel({d: 0 for d in grid}).transpose(
            *[d for d in st.dims if d not in grid]).values.astype(np.int64)
        arr = MscnArray(source, item_of, tuple(map(str, st.dims)), grid, shape, first.dtype)
        attrs = dict(st.attrs, **{f"mscn_{k}": v for k, v in prov.items()})
        var = xr.Variable(st.dims, indexing.LazilyIndexedArray(arr), attrs)
        var.encoding = {k: v for k, v in st.encoding.items() if k in _ENCODING}
        var.encoding["preferred_chunks"] = {d: (first.sizes[d] if d in grid else 1)
                                            for d in st.dims}
        data_vars[str(st.name)] = var
        for k, c in st.coords.items():
            if not set(c.dims) & set(grid):
                coords.setdefault(str(k), c.variable)
        for k, c in first.coords.items():
            if c.ndim and set(c.dims) <= set(grid):
                coords.setdefault(str(k), c.variable)
    ds = xr.Dataset(data_vars, coords=coords, attrs=gattrs)
    if drop_variables is not None:
        drop = [drop_variables] if isinstance(drop_variables, str) else list(drop_variables)
        ds = ds.drop_vars(drop, errors="ignore")
    return ds


def _global_attrs(stacked: xr.DataArray, prov: dict, bits: int) -> dict:
    """What ``mscn decode`` writes as global attributes: the source file's (carried in the
    item templates) and a history line (the written file's also has a date)."""
    from mscn_datasets import climate

    sphere = _sphere()
    key = getattr(climate, "_ENC_GLOBAL_ATTRS", "mscn_global_attrs")
    attrs = dict(stacked.encoding.get(key, {}))
    line = getattr(sphere, "history_line", None)
    if line is not None:
        text = line(dict(prov, bits=bits, command="xarray.open_dataset(engine='mscn')"))
        old = attrs.get("history")
        attrs["history"] = f"{text}\n{old}" if old is not None and str(old) else text
    return attrs


class MscnBackendEntrypoint(BackendEntrypoint):
    """``engine="mscn"``: lazily decoded ``.mscn`` climate streams (see :func:`open_mscn`)."""

    description = "Lazily decode .mscn climate streams (meta-learned SIREN codec)"
    url = "https://github.com/mscn/mscn"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "checkpoint",
                               "checkpoint_dirs", "resolution", "grid_file")

    def open_dataset(self, filename_or_obj: Any, *,
                     drop_variables: str | Iterable[str] | None = None,
                     checkpoint: Any = None,
                     checkpoint_dirs: Iterable[str | os.PathLike] = (),
                     resolution: float | None = None,
                     grid_file: str | os.PathLike | None = None) -> xr.Dataset:
        return open_mscn(filename_or_obj, drop_variables=drop_variables,
                         checkpoint=checkpoint, checkpoint_dirs=checkpoint_dirs,
                         resolution=resolution, grid_file=grid_file)

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """The 4-byte magic (cheap, no torch); a path that cannot be read: its suffix."""
        if isinstance(filename_or_obj, bytes | bytearray | memoryview):
            return bytes(filename_or_obj[:4]) == MAGIC
        if hasattr(filename_or_obj, "read") and hasattr(filename_or_obj, "seek"):
            try:
                pos = filename_or_obj.tell()
                head = filename_or_obj.read(4)
                filename_or_obj.seek(pos)
                return head == MAGIC
            except (OSError, ValueError):
                return False
        try:
            path = Path(os.fspath(filename_or_obj))
        except TypeError:
            return False
        try:
            with open(path, "rb") as f:
                return f.read(4) == MAGIC
        except OSError:
            return path.suffix == SUFFIX and not path.is_dir()


# -- accessors -----------------------------------------------------------------------------
def _load_sphere(checkpoint: Any) -> tuple[Any, Any]:
    """Checkpoint (None: the sphere modality's default, :func:`default_checkpoint`) and a
    ready sphere plugin."""
    from mscn_core.checkpoint import load_checkpoint

    SphereModality = _sphere().SphereModality  # noqa: N806

    if checkpoint is None:
        checkpoint = default_checkpoint()
    ck = load_checkpoint(checkpoint)
    if ck.modality != SphereModality.name:
        raise ValueError(f"{checkpoint} is a {ck.modality!r} checkpoint, not 'sphere'")
    modality = SphereModality()
    modality.load_state(ck.modality_state)
    return ck, modality


def default_checkpoint_name() -> str:
    """The file name of the default climate checkpoint: the sphere modality's
    ``default_checkpoint``, the one ``mscn fit/encode`` use without ``--checkpoint`` (one
    source of truth; the general climate checkpoint with a degree-7 SH base)."""
    return str(_sphere().SphereModality.default_checkpoint)


def default_checkpoint() -> Path:
    """The default climate checkpoint (:func:`default_checkpoint_name`), found in the
    catalog's folders as the CLI finds it."""
    from mscn_core.catalog import find_named

    try:
        return find_named(default_checkpoint_name())
    except FileNotFoundError as err:
        raise FileNotFoundError(str(err).replace("pass --checkpoint", "pass checkpoint=PATH")
                                ) from None


def __getattr__(name: str) -> Any:
    """``DEFAULT_CHECKPOINT`` (the default's file name) without importing the sphere
    plugin at import time."""
    if name == "DEFAULT_CHECKPOINT":
        return default_checkpoint_name()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fit_array(ck: Any, modality: Any, da: xr.DataArray, steps: int | None,
               bits: int | None, resolution: float | None) -> xr.DataArray:
    """The field(s) of one DataArray as the checkpoint represents them (the core's
    adapt → quantise → predict; the plugin's reconstruct and stacking)."""
    from mscn_core.pipeline import adapt_codes, predictor, quantize_codes
    from mscn_datasets import climate

    name = da.name if da.name is not None else "field"
    fields = list(climate.iter_fields(da.rename(name)))
    signals = [modality.to_signal(f) for f in fields]
    codes = adapt_codes(ck, modality, signals, steps=steps)
    if bits:
        _, codes = quantize_codes(ck, codes, bits)
    opts = modality.options(resolution=resolution)
    recon = [modality.reconstruct(s.meta, predictor(ck, modality, c), opts, template=f)
             for s, c, f in zip(signals, codes, fields, strict=True)]
    return recon[0] if da.ndim == 2 else climate.stack_fields(recon)


def _gridded(ds: xr.Dataset) -> list[str]:
    """Fields on any lat/lon grid; lat/lon, bounds and corners stored as data variables
    describe the grid and are not fields."""
    from mscn_datasets import climate

    on_grid = _sphere()._on_lat_lon
    ds = climate.promote_grid_coords(ds)
    skip = climate._grid_var_names(ds)
    return [str(k) for k, v in ds.data_vars.items() if str(k) not in skip and on_grid(v)]


class MscnDataArrayAccessor:
    """``da.mscn.fit()``: the field(s) of a DataArray as a checkpoint represents them."""

    def __init__(self, da: xr.DataArray):
        self._da = da

    def fit(self, checkpoint: str | os.PathLike | None = None, steps: int | None = None,
            bits: int | None = None, resolution: float | None = None) -> xr.DataArray:
        """``checkpoint`` None: the sphere modality's default (the general climate
        checkpoint, as ``mscn fit``; :func:`default_checkpoint`); ``bits``: what a
        stream at that depth would decode to; ``resolution``: degrees of a new grid."""
        ck, modality = _load_sphere(checkpoint)
        return _fit_array(ck, modality, self._da, steps, bits, resolution)


class MscnDatasetAccessor:
    """``ds.mscn.encode(path)`` writes a ``.mscn`` stream; ``ds.mscn.fit()`` shows what
    one would hold. Every variable on a lat/lon grid unless ``var`` says otherwise."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def _variables(self, var: str | Sequence[str] | None) -> list[str]:
        names = [var] if isinstance(var, str) else list(var) if var is not None else \
            _gridded(self._ds)
        if not names:
            from mscn_datasets import climate

            raise climate.ClimateDataError(climate.coords_not_found(self._ds))
        missing = [n for n in names if n not in self._ds.data_vars]
        if missing:
            raise KeyError(f"no variable {missing[0]!r}; variables: "
                           f"{sorted(map(str, self._ds.data_vars))}")
        return names

    def encode(self, path: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
               bits: int = 6, var: str | Sequence[str] | None = None,
               sel: dict | Sequence[str] | None = None, overwrite: bool = False,
               grid_storage: str = "embed") -> dict:
        """Encode the fields into one stream at ``path`` (written atomically) and return
        the report ``mscn encode`` prints. ``checkpoint`` None: the sphere modality's
        default (the general climate checkpoint, as ``mscn encode``;
        :func:`default_checkpoint`), found through :mod:`mscn_core.catalog` (any reader
        finds it by hash). ``sel``: ``{"number": [8, 9]}`` or
        ``["number=8,9"]``, as ``--sel``. ``grid_storage="reference"``: a curvilinear or
        unstructured grid by reference, as ``--grid-storage`` (decode with ``grid_file=``)."""
        from mscn_core.atomic import save_bytes_atomic
        from mscn_core.pipeline import encode_items
        from mscn_datasets import climate

        ck, modality = _load_sphere(checkpoint)
        if sel is not None and not isinstance(sel, dict):
            sel = climate.parse_sel(list(sel))
        items = []
        for name in self._variables(var):
            da = climate.select_fields(self._ds, var=name, sel=sel).load()
            items.extend(climate.iter_fields(da))
        data, rep = encode_items(ck, modality, items, bits=bits,
                                 options=modality.options(grid_storage=grid_storage))
        out = save_bytes_atomic(data, path, overwrite=overwrite)
        mean = {k: float(np.mean([m[k] for m in rep.metrics])) for k in rep.metrics[0]
                if isinstance(rep.metrics[0][k], int | float)} if rep.metrics else {}
        return {"output": str(out), "items": len(items), "bytes": rep.n_bytes,
                "payload_bytes": rep.payload_bytes, "values": rep.n_values,
                "bits_per_value": rep.bits_per_value,
                "payload_bits_per_value": rep.payload_bits_per_value,
                "checkpoint_sha256": ck.sha256, "mean": mean}

    def fit(self, checkpoint: str | os.PathLike | None = None, steps: int | None = None,
            bits: int | None = None, resolution: float | None = None) -> xr.Dataset:
        """Every gridded variable as the checkpoint represents it (``checkpoint`` None:
        the sphere modality's default, as ``mscn fit``); other variables are left out."""
        from mscn_datasets import climate

        ck, modality = _load_sphere(checkpoint)
        ds = climate.promote_grid_coords(self._ds)  # lat/lon stored as data variables
        out = {name: _fit_array(ck, modality, ds[name], steps, bits, resolution)
               for name in self._variables(None)}
        return xr.Dataset(out, attrs=dict(self._ds.attrs))


def _sphere() -> Any:
    """The sphere plugin module, imported on first use; our accessors stay registered
    (its former DataArray accessor, registered at its import, is replaced again)."""
    from mscn_plugins import sphere

    if getattr(xr.DataArray, "mscn", None) is not MscnDataArrayAccessor:
        _register(xr.DataArray, MscnDataArrayAccessor)
    return sphere


def _register(cls: type, accessor: type) -> None:
    """Register ``accessor`` as ``.mscn``, silently replacing an older mscn one (the
    plugin's former DataArray accessor); anyone else's is overridden with xarray's warning."""
    old = getattr(cls, "mscn", None)  # on the class: the accessor class itself
    ours = old is not None and getattr(old, "__module__", "").startswith("mscn_plugins.")
    register = (xr.register_dataset_accessor if cls is xr.Dataset
                else xr.register_dataarray_accessor)
    with warnings.catch_warnings():
        if ours:
            warnings.simplefilter("ignore", xr.core.extensions.AccessorRegistrationWarning)
        register("mscn")(accessor)


_register(xr.DataArray, MscnDataArrayAccessor)
_register(xr.Dataset, MscnDatasetAccessor)
