"""Encode many inputs, one ``.mscn`` per input: serially, on a local dask cluster, or on
an existing one (``mscn encode A B C -o DIR [--workers N | --scheduler ADDRESS]``).

Why a module of its own: the per-input task must be importable by dask workers (a
closure in the CLI is not), and the plan (names, refusals) must be settled before any
work so that a bad argument costs a second, not an archive's worth of compute.

Every output goes through :func:`mscn_core.atomic.save_bytes_atomic` (temp + rename in
the output folder): a worker killed mid-write leaves no partial output, only a temp
named ``.NAME.mscn-tmp.PID.…`` that the retry (or the end of the run) removes.
``dask.distributed`` is imported only when a cluster is asked for, so the plain CLI
keeps its fast start.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SUFFIX = ".mscn"


@dataclasses.dataclass(frozen=True)
class Job:
    """One input (a file, or a store that is a folder) and the stream it becomes."""

    input: str
    output: str


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a task needs besides its job: small and picklable (sent to workers).

    ``sha256``: the checkpoint as the command checked it; a worker refuses a file that
    changed since (its streams would name a checkpoint nobody has).
    """

    checkpoint: str
    sha256: str
    modality: str  # NAME or DIST:NAME, as the command resolved it
    options: Any = None
    bits: int = 6
    points_per_step: int | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    refine_steps: int | None = None  # None: the checkpoint's (pipeline.refine_settings)
    refine_lr: float | None = None
    refine_grow: bool | None = None  # refinement may enlarge the payload (no rate cap)
    overwrite: bool = False
    threads: int | None = None


# -- the plan: settled before any work --------------------------------------------------

def plan_jobs(inputs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
              overwrite: bool = False) -> list[Job]:
    """``DIR/<input stem>.mscn`` per input, every refusal raised before any work.

    Why refuse rather than mirror folders: two inputs with one stem (``a/x.nc``,
    ``b/x.nc``) would silently share a name; the user renames or runs twice. The same
    input given twice (a file and its folder) is encoded once. Existing outputs without
    ``overwrite``: all counted, the first named.
    """
    from .atomic import check_output

    out_dir = Path(out_dir)
    if not out_dir.exists():
        raise FileNotFoundError(errno.ENOENT, "output folder does not exist (it is not "
                                "created; make it first)", str(out_dir))
    if not out_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is not a folder; with several inputs (or "
                                 "--workers/--scheduler) -o names the output folder",
                                 str(out_dir))
    jobs: list[Job] = []
    seen_inputs: set[Path] = set()
    by_name: dict[str, str] = {}
    for p in map(Path, inputs):
        real = p.resolve()
        if real in seen_inputs:
            continue
        seen_inputs.add(real)
        name = Path(p.name).stem + SUFFIX
        if name in by_name:
            raise ValueError(f"{by_name[name]} and {p} would both be written to "
                             f"{out_dir / name}; rename one or encode them separately")
        by_name[name] = str(p)
        jobs.append(Job(str(p), str(out_dir / name)))
    existing = []
    for k, job in enumerate(jobs):
        try:
            check_output(job.output, overwrite, probe=k == 0)  # one probe per folder
        except FileExistsError as err:
            existing.append(err)
    if existing:
        err = existing[0]
        more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
        raise FileExistsError(err.errno, f"{err.strerror}{more}", err.filename)
    return jobs


# -- the task: runs in a worker (or here, serially) ---------------------------------------

_LOADED: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # per process: one load per worker


def remember(settings: Settings, ck: Any, modality: Any) -> None:
    """Seed this process's cache with what the command already loaded (serial runs)."""
    _LOADED[(settings.checkpoint, settings.sha256, settings.modality)] = (ck, modality)


def _loaded(settings: Settings) -> tuple[Any, Any]:
    """The checkpoint and its modality with state, loaded once per worker process."""
    key = (settings.checkpoint, settings.sha256, settings.modality)
    if key not in _LOADED:
        from .checkpoint import load_checkpoint
        from .registry import get_modality

        ck = load_checkpoint(settings.checkpoint)
        if ck.sha256 != settings.sha256:
            raise ValueError(f"{settings.checkpoint}: changed since the command started "
                             f"(sha256 {ck.sha256[:16]}…, expected {settings.sha256[:16]}…)")
        modality = get_modality(settings.modality)
        if modality.name != ck.modality:
            raise ValueError(f"{settings.checkpoint} is a {ck.modality!r} checkpoint, not "
                             f"{modality.name!r}")
        modality.load_state(ck.modality_state)
        _LOADED[key] = (ck, modality)
    return _LOADED[key]


def encode_one(job: Job, settings: Settings) -> dict:
    """Read, encode and atomically write one input; a summary row, never an exception.

    Why no exception: a bad input is reported in the summary and the others go on; only
    a dying worker escapes this (the scheduler retries the job elsewhere). A retry that
    finds its output already written by the killed attempt accepts it only if it holds
    the very bytes this attempt encoded (the encoder is deterministic), never overwrites.
    """
    from .cli import _read_items, _summary, describe_error

    t0 = time.perf_counter()
    row: dict[str, Any] = {"input": job.input, "output": job.output}
    try:
        ck, modality = _loaded(settings)
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        from .atomic import save_bytes_atomic
        from .pipeline import encode_items

        items = _read_items(modality, [job.input], settings.options)
        data, rep = encode_items(ck, modality, items, bits=settings.bits,
                                 options=settings.options,
                                 points_per_step=settings.points_per_step,
                                 max_abs_error=settings.max_abs_error,
                                 max_rel_error=settings.max_rel_error,
                                 refine_steps=settings.refine_steps,
                                 refine_lr=settings.refine_lr,
                                 refine_grow=settings.refine_grow)
        try:
            save_bytes_atomic(data, job.output, overwrite=settings.overwrite)
        except FileExistsError:
            if Path(job.output).read_bytes() != data:
                raise
            row["note"] = "written by an earlier attempt (identical bytes)"
        row.update(items=len(items), bytes=rep.n_bytes, values=rep.n_values,
                   bits_per_value=rep.bits_per_value, mean=_summary(rep.metrics))
        if rep.bounds is not None:
            row.update(residual_bytes=rep.residual_bytes,
                       max_abs_error=max(b["max_abs_error"] for b in rep.bounds))
    except Exception as err:  # noqa: BLE001 - reported in the summary row, one line
        text = describe_error(err)
        row["error"] = text if text.startswith(job.input) else f"{job.input}: {text}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["pid"] = os.getpid()
    return row


# -- running the plan ---------------------------------------------------------------------

def _remove_stale_temps(jobs: Sequence[Job]) -> None:
    """Temps of writers that no longer run (a killed worker): never left behind."""
    from .atomic import stale_temps

    for job in jobs:
        for tmp in stale_temps(job.output):
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _orphan_row(job: Job, before: Any) -> dict | None:
    """The stream of a job whose worker died after renaming it into place but before
    reporting: whole (the rename is atomic), so encoded, but without metrics."""
    if _identity(job.output) in (None, before):
        return None
    from .bitstream import read_bitstream
    from .pipeline import merge_common

    data = Path(job.output).read_bytes()
    try:
        stream = read_bitstream(data)
    except ValueError:
        return None
    common = stream.extra.get("common")
    common = common if isinstance(common, dict) else {}
    values = sum(int(merge_common(common, m).get("n_values", 0)) for m in stream.items_meta)
    return {"input": job.input, "output": job.output, "items": stream.n_items,
            "bytes": len(data), "values": values,
            "bits_per_value": 8 * len(data) / values if values else None, "mean": {},
            "note": "written whole by a worker that died before reporting; no metrics"}


def _killed_row(job: Job, err: BaseException) -> dict:
    """A job the cluster gave up on (its workers died: killed, out of memory, lost)."""
    from .cli import describe_error

    tries = getattr(err, "allowed_failures", None)
    if type(err).__name__ == "KilledWorker" and isinstance(tries, int):
        last = getattr(getattr(err, "last_worker", None), "address", "?")
        why = (f"the worker encoding it died {tries + 1} time(s) (last: {last}); not "
               "retried further (dask's distributed.scheduler.allowed-failures)")
    else:
        why = f"the cluster lost it ({type(err).__name__}: {describe_error(err)})"
    return {"input": job.input, "output": job.output, "error": f"{job.input}: {why}"}


def run_jobs(jobs: Sequence[Job], settings: Settings, workers: int = 0,
             scheduler: str | None = None, client: Any = None,
             on_row: Callable[[dict], None] | None = None) -> dict:
    """Encode every job and return the summary (see :func:`summarize`).

    ``workers`` 0 and no ``scheduler``/``client``: here, one after the other. ``workers``
    N: a ``dask.distributed.LocalCluster`` of N single-threaded worker processes, closed
    at the end. ``scheduler``: an existing cluster's address. ``client``: a caller's
    ``Client`` (left open). Stale temps of the outputs are removed before and after.
    """
    from .pipeline import progress

    _remove_stale_temps(jobs)
    t0 = time.perf_counter()
    before = {job.output: _identity(job.output) for job in jobs}
    rows: list[dict] = []
    where: Any = scheduler or workers or (client.scheduler.address if client else 0)
    try:
        with progress(len(jobs), "encode", unit="file") as bar:
            def done(row: dict) -> None:
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                bar.update()

            if client is None and scheduler is None and not workers:
                for job in jobs:
                    done(encode_one(job, settings))
            else:
                _run_dask(jobs, settings, workers, scheduler, client, done, before)
    except KeyboardInterrupt as err:  # the CLI's SIGINT/SIGTERM: say what is complete
        _remove_stale_temps(jobs)  # after the cluster is closed: its writers are gone
        err.summary = _summary_of(jobs, rows, t0, where, before)  # type: ignore[attr-defined]
        raise
    finally:
        _remove_stale_temps(jobs)
    return _summary_of(jobs, rows, t0, where, before)


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _summary_of(jobs: Sequence[Job], rows: list[dict], t0: float, where: Any,
                before: dict[str, Any]) -> dict:
    """The summary in input order. Interrupted: jobs without a row are ``not_done``,
    except those a worker still finished while stopping (``written_while_stopping``:
    whole streams, written atomically, but without a summary row)."""
    order = {job.input: k for k, job in enumerate(jobs)}
    rows = sorted(rows, key=lambda r: order[r["input"]])
    out = summarize(rows, time.perf_counter() - t0, where)
    out["files"] = len(jobs)
    seen = {r["input"] for r in rows}
    rest = [job for job in jobs if job.input not in seen]
    if rest:
        late = [job for job in rest if _identity(job.output) not in (None,
                                                                     before[job.output])]
        out["written_while_stopping"] = [job.output for job in late]
        out["not_done"] = [job.input for job in rest if job not in late]
    return out


def require_dask() -> None:
    """Refuse --workers/--scheduler in the first second when the extra is missing."""
    import importlib.util

    if importlib.util.find_spec("distributed") is None:
        raise ImportError("--workers/--scheduler need dask.distributed: pip install "
                          "'mscn[scale]'")


def _run_dask(jobs, settings, workers, scheduler, client, done, before) -> None:
    """Submit every job (pure=False: a retry is a new attempt) and collect as completed;
    on the way out (done or interrupted) cancel what is left and close what we opened."""
    from distributed import Client, LocalCluster, as_completed

    owned: list[Any] = []
    futures: dict[Any, Job] = {}
    try:
        if client is None:
            if scheduler is not None:
                client = Client(scheduler)
                owned.append(client)
            else:
                import logging

                cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                                       processes=True, dashboard_address=None,
                                       silence_logs=logging.ERROR)  # the summary reports
                owned.append(cluster)
                client = Client(cluster)
                owned.append(client)
        futures = {client.submit(encode_one, job, settings, pure=False,
                                 key=f"mscn-encode-{k}-{os.getpid()}-{time.time_ns()}"): job
                   for k, job in enumerate(jobs)}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as err:  # noqa: BLE001 - KilledWorker and kin: reported
                job = futures[fut]
                row = _orphan_row(job, before[job.output]) or _killed_row(job, err)
            done(row)
    finally:
        if futures and client is not None:
            client.cancel(list(futures))  # a running task still finishes (atomically)
        for obj in reversed(owned):
            obj.close()


def summarize(rows: list[dict], wall: float, workers: Any = 0) -> dict:
    """Totals over the encoded inputs; failures listed, never counted as encoded.

    ``bits_per_value``: all streams' bits over all coded values; ``mean``: each metric's
    mean over all items that have metrics (a file's mean weighted by its items).
    """
    good = [r for r in rows if "error" not in r]
    items = sum(r["items"] for r in good)
    total_bytes = sum(r["bytes"] for r in good)
    values = sum(r["values"] for r in good)
    mean: dict[str, float] = {}
    scored = [r for r in good if r.get("mean")]  # a dead worker's whole stream has none
    scored_items = sum(r["items"] for r in scored)
    if scored_items:
        keys = set.intersection(*(set(r["mean"]) for r in scored))
        mean = {k: sum(r["mean"][k] * r["items"] for r in scored) / scored_items
                for k in sorted(keys)}
    return {"files": len(rows), "encoded": len(good), "failed": len(rows) - len(good),
            "items": items, "bytes": total_bytes, "values": values,
            "bits_per_value": 8 * total_bytes / values if values else None,
            "rmse": mean.get("rmse"), "mean": mean, "wall_seconds": round(wall, 3),
            "workers": workers, "per_file": rows,
            "failures": [{"input": r["input"], "error": r["error"]}
                         for r in rows if "error" in r]}
