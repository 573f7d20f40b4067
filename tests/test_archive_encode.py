"""Issue 11 part 3: ``mscn encode`` over many files, one ``.mscn`` each, serially or on a
dask cluster; a worker killed mid-run leaves no partial output and the summary says
what happened. Real NetCDF files (one ensemble member each, cut from the vendored ERA5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from clirun import ENV, mscn, ok, refused
from distributed import Client, LocalCluster

from mscn_core import archive
from mscn_core.atomic import TEMP_TAG
from mscn_core.bitstream import read_bitstream
from mscn_core.checkpoint import load_checkpoint
from mscn_core.pipeline import decode_stream
from mscn_datasets import vendored_path

ROOT = Path(__file__).resolve().parents[1]
ERA5 = vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")
CKPT = ROOT / "plugins" / "checkpoints" / "era5_t850.safetensors"
SEL = ["--var", "t", "--sel", "isobaricInhPa=850"]
MEMBERS = (6, 7, 8, 9)  # 4 times each: 4 items per file


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """One NetCDF file per ensemble member (the member dimension kept, length 1)."""
    folder = tmp_path_factory.mktemp("archive")
    out = []
    with xr.open_dataset(ERA5) as ds:
        for n in MEMBERS:
            path = folder / f"member{n}.nc"
            ds.sel(number=[n]).to_netcdf(path)
            out.append(path)
    return out


@pytest.fixture(scope="module")
def serial(files, tmp_path_factory) -> tuple[Path, dict]:
    """The reference: the same files encoded one after the other (--workers 0), in a
    process that must never import dask.distributed."""
    out = tmp_path_factory.mktemp("serial")
    code = ("import sys; from mscn_core.cli import main; rc = main(sys.argv[1:]); "
            "assert 'distributed' not in sys.modules, 'imported distributed'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "encode", *map(str, files), *SEL,
                        "--checkpoint", str(CKPT), "--workers", "0", "-o", str(out)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    return out, ok(r)


@pytest.fixture(scope="module")
def ck():
    return load_checkpoint(CKPT)


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_TAG in p.name)


def _check_summary(rep: dict, folder: Path) -> None:
    """The totals are the sums of what is on disk; failures are not counted as encoded."""
    rows = [r for r in rep["per_file"] if "error" not in r]
    assert rep["encoded"] == len(rows) and rep["failed"] == len(rep["failures"])
    assert rep["files"] == rep["encoded"] + rep["failed"]
    assert rep["bytes"] == sum(Path(r["output"]).stat().st_size for r in rows)
    assert rep["items"] == sum(r["items"] for r in rows)
    assert rep["bytes"] == sum(r["bytes"] for r in rows)
    for r in rows:
        assert r["bits_per_value"] == pytest.approx(8 * r["bytes"] / r["values"])
    if rows:
        assert rep["bits_per_value"] == pytest.approx(8 * rep["bytes"] / rep["values"])
        scored = [r for r in rows if r["mean"]]  # not a dead worker's unreported stream
        if scored:
            mean_rmse = (sum(r["mean"]["rmse"] * r["items"] for r in scored)
                         / sum(r["items"] for r in scored))
            assert rep["rmse"] == pytest.approx(mean_rmse)
    for r in rep["per_file"]:
        if "error" in r:
            assert not Path(r["output"]).exists(), r
    assert _temps(folder) == []
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(r["output"]).name
                                                              for r in rows)


def test_serial_archive_is_one_stream_per_file_equal_to_a_single_encode(files, serial,
                                                                        tmp_path):
    folder, rep = serial
    assert rep["files"] == 4 and rep["encoded"] == 4 and rep["items"] == 16
    assert rep["workers"] == 0
    _check_summary(rep, folder)
    single = tmp_path / "one.mscn"  # the one-input command is unchanged
    one = ok(mscn("encode", files[0], *SEL, "--checkpoint", CKPT, "-o", single,
                  "--summary", tmp_path / "one.json"))
    assert json.loads((tmp_path / "one.json").read_text()) == one
    assert set(one) >= {"output", "items", "bytes", "bits_per_value", "mean"}
    assert single.read_bytes() == (folder / "member6.mscn").read_bytes()


def test_local_cluster_of_two_workers_matches_the_serial_encode(files, serial, ck, tmp_path):
    """``--workers 2``: a LocalCluster of 2 single-threaded processes. The encoder is
    deterministic, so every stream is byte-for-byte the serial one, and decodes."""
    out = tmp_path / "out"
    out.mkdir()
    summary = tmp_path / "summary.json"
    t0 = time.monotonic()
    r = mscn("encode", *files, *SEL, "--checkpoint", CKPT, "--workers", "2", "-o", out,
             "--summary", summary, timeout=120)
    took = time.monotonic() - t0
    rep = ok(r)
    assert json.loads(summary.read_text()) == rep
    assert rep["workers"] == 2 and rep["encoded"] == 4 and rep["failed"] == 0
    assert len({row["pid"] for row in rep["per_file"]}) <= 2
    _check_summary(rep, out)
    ref = serial[0]
    for f in files:
        got = out / f"{f.stem}.mscn"
        assert got.read_bytes() == (ref / got.name).read_bytes(), got
        decoded = decode_stream(got.read_bytes(), ck)
        assert decoded.stream.n_items == 4
    nc = tmp_path / "member8.nc"
    dec = ok(mscn("decode", out / "member8.mscn", "--checkpoint", CKPT, "-o", nc))
    assert dec["items"] == 4
    with xr.open_dataset(nc) as got, xr.open_dataset(files[2]) as src:
        truth = src["t"].sel(isobaricInhPa=850).values
        assert np.sqrt(np.mean((got["t"].values.reshape(truth.shape) - truth) ** 2)) < 1.5
    print(f"--workers 2, 4 files: {took:.1f} s")  # measured ~10 s here, most of it startup


# -- an existing cluster, and workers that die ----------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """2 worker processes, 1 thread each, as ``--workers 2`` makes (no dashboard)."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as c, Client(c) as client:
        yield c, client


def test_existing_scheduler(files, serial, cluster, tmp_path):
    c, _ = cluster
    out = tmp_path / "out"
    out.mkdir()
    rep = ok(mscn("encode", *files[:2], *SEL, "--checkpoint", CKPT, "--scheduler",
                  c.scheduler_address, "-o", out, timeout=120))
    assert rep["workers"] == c.scheduler_address and rep["encoded"] == 2
    _check_summary(rep, out)
    for f in files[:2]:
        assert (out / f"{f.stem}.mscn").read_bytes() == (serial[0] / f"{f.stem}.mscn"
                                                          ).read_bytes()


def _settings(ck, refine_steps: int) -> archive.Settings:
    from mscn_core.registry import get_modality

    opts = get_modality("sphere").options(var=["t"], sel=["isobaricInhPa=850"])
    return archive.Settings(checkpoint=str(CKPT), sha256=ck.sha256, modality="sphere",
                            options=opts, refine_steps=refine_steps, threads=1)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("allowed_failures", [3, 0], ids=["retried", "given-up"])
def test_a_killed_worker_leaves_no_partial_output(files, ck, cluster, tmp_path,
                                                  allowed_failures):
    """SIGKILL one worker while it encodes. Retried (dask's allowed-failures): every
    stream is written once, whole. Given up (0 allowed): those jobs are failures in the
    summary and have no output; the others are whole. Never a temp file left, and a
    temp a killed writer left before the run is removed by it."""
    c, client = cluster
    client.wait_for_workers(2, timeout=60)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".member6.mscn{TEMP_TAG}{_dead_pid()}.0123abcd.mscn"
    stale.write_bytes(b"half a stream")
    jobs = archive.plan_jobs(files, out)
    settings = _settings(ck, refine_steps=0)
    old = c.scheduler.allowed_failures
    c.scheduler.allowed_failures = allowed_failures
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        archive.run_jobs(jobs, settings, client=client)))
    try:
        runner.start()
        killed = None
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:
            busy = [w for w, keys in client.processing().items() if keys]
            if busy:  # at once: the job may take under a second on a warm worker
                pids = client.run(os.getpid, workers=busy[:1])
                killed = next(iter(pids.values()))
                os.kill(killed, signal.SIGKILL)
            else:
                time.sleep(0.05)
        runner.join(timeout=120)
        took = time.monotonic() - deadline + 60
    finally:
        c.scheduler.allowed_failures = old
    assert killed is not None and not runner.is_alive()
    rep = result
    _check_summary(rep, out)
    assert not stale.exists()
    assert all(row.get("pid") != killed for row in rep["per_file"] if "error" not in row)
    if allowed_failures:
        assert rep["encoded"] == 4, rep["failures"]
    else:
        assert rep["failed"] >= 1
        for f in rep["failures"]:
            assert "worker encoding it died 1 time(s)" in f["error"], f
            assert "\n" not in f["error"]
    for row in rep["per_file"]:
        if "error" not in row:
            data = Path(row["output"]).read_bytes()
            assert read_bitstream(data).n_items == 4
            assert decode_stream(data, ck).stream.n_items == 4
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it for the next test
    print(f"killed worker {killed}, {rep['failed']} failed, run took {took:.1f} s",
          [(r.get("pid"), r.get("seconds")) for r in rep["per_file"]])


# -- refusals: one line, before any work, nothing written -----------------------------------

def _quick_refusal(*argv, folder: Path) -> str:
    before = sorted(os.listdir(folder))
    t0 = time.monotonic()
    line = refused(mscn("encode", *argv, *SEL, "--checkpoint", CKPT))
    assert time.monotonic() - t0 < 30
    assert sorted(os.listdir(folder)) == before
    return line


def test_a_missing_file_among_many_is_refused_before_any_work(files, tmp_path):
    gone = tmp_path / "gone.nc"
    out = tmp_path / "out"
    out.mkdir()
    line = _quick_refusal(*files[:2], gone, files[2], "--workers", "2", "-o", out,
                          folder=out)
    assert line.endswith(f"{gone}: no such file or directory"), line


def test_output_that_is_a_file_is_refused_with_several_inputs(files, tmp_path):
    target = tmp_path / "out.mscn"
    target.write_bytes(b"precious")
    line = _quick_refusal(*files[:2], "-o", target, folder=tmp_path)
    assert str(target) in line and "is not a folder" in line, line
    assert target.read_bytes() == b"precious"


def test_missing_output_folder_is_refused_and_not_created(files, tmp_path):
    missing = tmp_path / "nope"
    line = _quick_refusal(*files[:2], "-o", missing, folder=tmp_path)
    assert str(missing) in line and "does not exist" in line, line
    assert not missing.exists()


def test_existing_outputs_are_refused_before_any_work(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("member7.mscn", "member8.mscn"):
        (out / name).write_bytes(b"precious")
    line = _quick_refusal(*files, "-o", out, folder=out)
    assert f"{out / 'member7.mscn'}: exists" in line and "1 more" in line, line
    assert "--overwrite" in line
    assert (out / "member8.mscn").read_bytes() == b"precious"


def test_two_inputs_with_one_name_are_refused(files, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    twin = other / files[0].name
    twin.write_bytes(files[0].read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    line = _quick_refusal(files[0], twin, "-o", out, folder=out)
    assert str(files[0]) in line and str(twin) in line and "member6.mscn" in line, line


def test_a_bad_file_among_many_is_reported_and_the_rest_are_encoded(files, tmp_path):
    bad = tmp_path / "broken.nc"
    bad.write_bytes(b"CDF\x01 not really")
    out = tmp_path / "out"
    out.mkdir()
    r = mscn("encode", files[0], bad, *SEL, "--checkpoint", CKPT, "-o", out)
    assert r.returncode == 2, r.stderr
    rep = json.loads(r.stdout)
    assert rep["encoded"] == 1 and rep["failed"] == 1
    (fail,) = rep["failures"]
    assert fail["input"] == str(bad) and "\n" not in fail["error"]
    assert f"mscn encode: error: {fail['error']}" in r.stderr
    _check_summary(rep, out)


def test_plain_encode_does_not_import_dask():
    """The scale extra is imported only for --workers/--scheduler: a fast start."""
    code = ("import sys; from mscn_core.cli import build_parser; build_parser(); "
            "import mscn_core.archive; print('distributed' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert r.stdout.strip() == "False", r.stderr



def test_interrupt_says_which_streams_are_complete(files, tmp_path):
    """SIGINT mid-run on a LocalCluster: exit 130, the summary lists every input as
    encoded, written while stopping or not done, and the disk agrees; no temps."""
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-m", "mscn_core", "encode", *map(str, files),
                              *SEL, "--checkpoint", str(CKPT), "--workers", "2",
                              "--refine-steps", "10", "-o", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=ENV)
    try:
        deadline = time.monotonic() + 90
        while not list(out.glob("*.mscn")) and time.monotonic() < deadline:
            time.sleep(0.1)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, stderr
    rep = json.loads(stdout)
    late = rep.get("written_while_stopping", [])
    assert rep["files"] == 4
    assert rep["encoded"] + rep["failed"] + len(late) + len(rep.get("not_done", [])) == 4
    whole = rep["encoded"] + len(late)
    assert f"interrupted (SIGINT); {whole} of 4 streams complete" in stderr
    on_disk = sorted(p.name for p in out.iterdir())
    assert on_disk == sorted([Path(r["output"]).name for r in rep["per_file"]
                              if "error" not in r] + [Path(p).name for p in late])
    for p in out.iterdir():
        assert read_bitstream(p.read_bytes()).n_items == 4


def test_a_retry_accepts_its_own_finished_stream_and_never_overwrites(files, serial, ck,
                                                                      tmp_path):
    """A worker killed after its rename: the retry finds the stream already there. The
    same bytes: accepted; anything else (someone else's file): an error, left alone."""
    settings = _settings(ck, refine_steps=0)
    same, other = tmp_path / "same.mscn", tmp_path / "other.mscn"
    same.write_bytes((serial[0] / "member6.mscn").read_bytes())
    other.write_bytes(b"theirs")
    row = archive.encode_one(archive.Job(str(files[0]), str(same)), settings)
    assert "error" not in row and "earlier attempt" in row["note"], row
    row = archive.encode_one(archive.Job(str(files[0]), str(other)), settings)
    assert "exists" in row["error"] and other.read_bytes() == b"theirs"
    assert _temps(tmp_path) == []


def test_a_stream_finished_by_a_worker_that_died_before_reporting_counts(serial, tmp_path):
    """Killed between its rename and its report: the stream is whole, so the summary
    counts it (bytes, items, values from its header), without metrics."""
    folder, rep = serial
    out = tmp_path / "member7.mscn"
    assert archive._orphan_row(archive.Job("member7.nc", str(out)), None) is None
    out.write_bytes((folder / "member7.mscn").read_bytes())
    row = archive._orphan_row(archive.Job("member7.nc", str(out)), None)
    (ref,) = [r for r in rep["per_file"] if r["output"].endswith("member7.mscn")]
    assert {k: row[k] for k in ("items", "bytes", "values", "bits_per_value")} == \
        {k: ref[k] for k in ("items", "bytes", "values", "bits_per_value")}
    assert row["mean"] == {} and "died before reporting" in row["note"]
    total = archive.summarize([row, ref], 1.0)
    assert total["encoded"] == 2 and total["rmse"] == ref["mean"]["rmse"]
