"""Lazy reading of many real NetCDF files (issue 11): globs, references, bounded loading.

The archive is the vendored ERA5 file split into one file per ensemble member (real
fields, written by xarray), so a glob of several files is read both ways and compared.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from clirun import mscn, ok, refused
from conftest import ERA5

from mscn_core.cli import _read_items, expand_paths
from mscn_core.streaming import LazySequence, as_signals, fit_sample, item_labels, subset


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three files (members 0-2 of ERA5, both levels, t and z): 16 fields each; a fourth
    (member 3) one folder down."""
    d = tmp_path_factory.mktemp("archive")
    with xr.open_dataset(ERA5) as ds:
        for m in range(3):
            ds.isel(number=[m]).to_netcdf(d / f"era5_member{m}.nc")
        (d / "held").mkdir()
        ds.isel(number=[3]).to_netcdf(d / "held" / "era5_member3.nc")
    (d / "README.txt").write_text("not data: a glob of *.nc leaves it out\n")
    return d


@pytest.fixture(scope="module")
def sphere():
    from mscn_plugins.sphere import SphereModality

    return SphereModality()


def test_a_glob_reads_the_same_items_lazily_as_eagerly(archive, sphere):
    pattern = str(archive / "*.nc")
    assert len(expand_paths(sphere, [pattern])) == 3
    eager = _read_items(sphere, [pattern], None)
    lazy = _read_items(sphere, [pattern], None, lazy=True)
    assert isinstance(lazy, LazySequence) and len(lazy) == len(eager) == 48
    assert lazy.loads == 0  # listing read no values
    assert item_labels(sphere, lazy) == item_labels(sphere, eager)
    for i in (0, 17, 47):  # first, middle (second file, z), last
        a, b = eager[i], lazy[i]
        assert sphere.item_label(a) == sphere.item_label(b)
        np.testing.assert_array_equal(a.values, b.values)
        assert a.attrs == b.attrs and a.encoding["source"] == b.encoding["source"]
        sa, sb = sphere.to_signal(a), sphere.to_signal(b)
        assert sa.meta == sb.meta and torch.equal(sa.targets, sb.targets)
        same = [json.dumps(sphere.item_template(x), sort_keys=True) for x in (a, b)]
        assert same[0] == same[1]  # as JSON: its NaN fill values compare equal


def test_the_lazy_sequence_loads_only_what_is_indexed(archive, sphere):
    lazy = _read_items(sphere, [str(archive / "*.nc")], None, lazy=True)
    lazy[3], lazy[40], lazy[3]  # noqa: B018 - the third is a cache hit
    assert lazy.loads == 2
    train = subset(lazy, [1, 2, 3])
    sig = as_signals(sphere, train)
    assert len(sig) == 3 and train.loads == sig.loads == 0
    assert sig[torch.tensor(2)].targets.shape == (61 * 120, 1)
    assert sig.loads == 1 and lazy.loads == 2
    small = LazySequence(range(10), lambda r: r * r, cache_size=2)
    assert [small[i] for i in (1, 2, 1, 3, 1)] == [1, 4, 1, 9, 1] and small.loads == 3
    assert list(small[2:5]) == [4, 9, 16] and small[-1] == 81
    with pytest.raises(IndexError):
        small[10]  # noqa: B018
    few = fit_sample(lazy, subset(lazy, [0]), n=5)  # bounded, seeded, lazy
    assert len(few) == 5 and few.loads == 0
    assert fit_sample([1, 2], [3]) == [1, 2, 3]  # eager data: everything, as before


def test_meta_train_on_a_quoted_glob_end_to_end(archive, tmp_path):
    """``**`` reaches member 3 one folder down; as --val-data it is kept out of training
    by the labels of the references."""
    ck = tmp_path / "glob.safetensors"
    r = mscn("meta-train", "--data", archive / "**" / "*.nc", "--var", "t",
             "--val-data", archive / "held" / "era5_member3.nc",
             "--depth", "2", "--width", "8", "--budget", "4", "--outer-steps", "2",
             "--batch-size", "4", "--points-per-item", "64", "--val-every", "1",
             "--progress", "false", "-o", ck)
    assert ok(r)["steps_run"] == 2
    info = ok(mscn("inspect", ck, "--json"))["info"]
    assert info["n_train"] == 24 and info["n_val"] == 8  # t of members 0-2; member 3
    assert info["data"] == [str(archive / "**" / "*.nc")]


def test_a_zarr_store_streams_like_the_file(tmp_path, sphere):
    store = tmp_path / "era5.zarr"
    with xr.open_dataset(ERA5) as ds:
        ds.isel(number=[0, 1]).to_zarr(store, mode="w", zarr_format=2)
    eager = _read_items(sphere, [store], None)
    lazy = _read_items(sphere, [store], None, lazy=True)
    assert len(lazy) == len(eager) == 32 and lazy.loads == 0
    np.testing.assert_array_equal(lazy[31].values, eager[31].values)


def test_a_glob_matching_nothing_is_refused_in_one_line(archive, tmp_path):
    pattern = archive / "*.grib"
    line = refused(mscn("meta-train", "--data", pattern, "--modality", "sphere",
                        "-o", tmp_path / "x.safetensors"))
    assert line == f"mscn meta-train: error: {pattern}: no files match this pattern"
    assert not (tmp_path / "x.safetensors").exists()


def test_train_checkpoint_is_the_same_streamed_or_not(archive, sphere):
    """Small archives: fit_state sees every item and the steps draw the same items."""
    from mscn_core.meta import TrainConfig
    from mscn_core.methods import MethodConfig
    from mscn_core.pipeline import train_checkpoint
    from mscn_core.siren import SirenConfig

    def train(items):
        tcfg = TrainConfig(outer_steps=2, batch_size=3, points_per_item=64, val_every=1,
                           progress=False, outer_lr=1e-3)
        return train_checkpoint(sphere, subset(items, range(2, 12)), subset(items, [0, 1]),
                                SirenConfig(depth=2, width=8), MethodConfig(budget=4), tcfg)

    pattern = str(archive / "*.nc")
    a = train(_read_items(sphere, [pattern], None))
    b = train(_read_items(sphere, [pattern], None, lazy=True))
    assert a.modality_state == b.modality_state
    sa, sb = a.rep.state_dict(), b.rep.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
