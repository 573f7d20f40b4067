"""A structural fuzzer for what mscn reads from strangers: ``.mscn`` streams and checkpoints.

Streams are mutated the way a forger would, not only by flipping bytes: header fields get
values of another JSON type, huge or negative counts, deleted keys, extra or missing items,
nested zlib data becomes a bomb, payloads are swapped, cut or grown, and the CRC is
recomputed so the damage reaches the parser. Checkpoint metadata gets the same treatment.
Each case runs through the real CLI (``mscn decode`` / ``mscn inspect``, in process) and
must end in success or ONE line of error (exit 2), within a per-case time cap, in a
process whose address space is capped (``resource.setrlimit``): a hang, a traceback, an
"internal error", a leftover temp file or a memory-cap breach is a failure.

Hypothesis draws the mutations (``st.randoms``), so a failure is shrunk and reported with
the seed that reproduces it. Used by ``tests/test_fuzz.py`` (short budget, ``make test``)
and by ``make fuzz`` (``python tests/fuzzing.py --seconds 600``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

CHECKPOINTS = REPO / "plugins" / "checkpoints"
MEMORY_HEADROOM = 1536 << 20  # bytes of address space above the warmed-up worker
CASE_SECONDS = 60.0  # a case slower than this is a hang
# Decoded outputs above this many values are refused (forged but self-consistent sizes
# would otherwise make honest, slow decodes); the limit itself is what is being tested.
MAX_OUTPUT_VALUES = 1 << 22


class Hang(BaseException):
    """A case ran past its time cap (BaseException: nothing under test may swallow it)."""


# -- seeds: real streams written by the real encoder -------------------------------------
def build_seeds(folder: Path) -> list[dict]:
    """Valid streams of every shipped modality, with the decode flags that keep them fast."""
    from mscn_core.checkpoint import load_checkpoint
    from mscn_core.pipeline import encode_items
    from mscn_core.registry import get_modality
    from mscn_datasets import vendored_path

    seeds = []
    sphere = get_modality("sphere")
    ck = load_checkpoint(CHECKPOINTS / "era5_t850.safetensors")
    sphere.load_state(ck.modality_state)
    fields = sphere.read(vendored_path("era5_t_z_3deg_2017-01-01_float32.nc"), var="t",
                         sel=["isobaricInhPa=850"])[:2]
    data, _ = encode_items(ck, sphere, fields, bits=6, with_metrics=False)
    seeds.append({"name": "sphere", "stream": data, "checkpoint": ck.path, "ext": ".nc",
                  "flags": []})
    coads = vendored_path("coads_sst_airt_2deg_jan-mar.nc")  # NaN (land) mask in the meta
    sst = sphere.read(coads, var="SST")[:1]
    data, _ = encode_items(ck, sphere, sst, bits=4, with_metrics=False)
    seeds.append({"name": "sphere-masked", "stream": data, "checkpoint": ck.path,
                  "ext": ".nc", "flags": []})

    from mscn_datasets.meshes import vendored_mesh

    for name, flags in (("sdf", ["--resolution", "16"]),
                        ("voxel", ["--output-resolution", "16"])):
        mod = get_modality(name)
        ck = load_checkpoint(CHECKPOINTS / f"shapes_{name}.safetensors")
        mod.load_state(ck.modality_state)
        opts = mod.options()
        shapes = mod.read(vendored_mesh("bunny00"), opts)
        data, _ = encode_items(ck, mod, shapes, bits=6, with_metrics=False, options=opts)
        seeds.append({"name": name, "stream": data, "checkpoint": ck.path, "ext": ".ply",
                      "flags": flags})
    # a held-out scene: compact intrinsics, orbit and look-at poses in its metadata. Its
    # decode renders every scored pixel (24 network calls a ray), so a forged but
    # self-consistent size is capped lower than the other seeds' (8x the seed's own).
    nerf = get_modality("nerf")
    ck = load_checkpoint(CHECKPOINTS / "nerf_scenes.safetensors")
    nerf.load_state(ck.modality_state)
    scene = nerf.read(vendored_path("scenes") / "test" / "cow")
    data, _ = encode_items(ck, nerf, scene, bits=6, with_metrics=False)
    seeds.append({"name": "nerf", "stream": data, "checkpoint": ck.path, "ext": "",
                  "flags": ["--orbit-views", "0"], "max_output_values": 1 << 19})
    for s in seeds:
        path = folder / f"seed_{s['name']}.mscn"
        path.write_bytes(s["stream"])
        s["path"] = str(path)
    return seeds


# -- mutations ---------------------------------------------------------------------------
BOMB_SIZES = (1 << 20, 64 << 20, 1 << 30)


_BOMBS: dict[int, bytes] = {}


def bomb(size: int) -> bytes:
    """zlib data that inflates to ``size`` zero bytes (cached: the fuzzer reuses them)."""
    from forge import zlib_bomb

    if size not in _BOMBS:
        _BOMBS[size] = zlib_bomb(size)
    return _BOMBS[size]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of a random type, biased to the values that break parsers."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return rng.choice([0, 1, -1, 2, 7, 255, 2**31, 2**32 + 1, 2**63, -(2**63), 10**30])
    if kind == 1:
        return rng.choice([0.5, -0.0, 1e308, -1e308, float("nan"), float("inf"),
                           -float("inf"), 1e-320])
    if kind == 2:
        return rng.choice(["", "foo", "float32", "x" * 1000, "0" * 64, "é∂", "\x00",
                           "{}", "null"])
    if kind == 3:
        return base64.b64encode(bomb(rng.choice(BOMB_SIZES[:2]))).decode()
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5:
        return []
    if kind == 6:
        return {}
    if kind == 7:
        return rng.choice([[0] * 100000, list(range(3)), [None, "a", 1.5]])
    if kind == 8:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 9:
        return {rng.choice(["n", "first", "step", "shape", "dtype", "scale", "data",
                            "dims", "name"]): random_json(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    if kind == 10:
        return {"first": 0.0, "step": 1.0, "n": rng.choice([2 * 10**8, 2**40, -1, 0, 1.5])}
    return [[random_json(rng, depth + 1)]]


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON document (the root excluded)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:20]):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


def _parent(doc: Any, path: tuple) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


def mutate_json(doc: Any, rng: random.Random) -> str:
    """One structural change of ``doc`` in place; returns what it did."""
    paths = _paths(doc)
    if not paths:
        return "nothing to mutate"
    path = rng.choice(paths)
    parent, key = _parent(doc, path), path[-1]
    old = parent[key]
    op = rng.randrange(7)
    if op == 0 and isinstance(parent, dict):
        del parent[key]
        return f"deleted {path}"
    if op == 1 and isinstance(old, int | float) and not isinstance(old, bool):
        parent[key] = rng.choice([old * 1000003, -old - 1, old + 1, 2**40, 0, str(old)])
        return f"numeric {path}"
    if op == 2 and isinstance(old, list) and old:
        choice = rng.randrange(3)
        if choice == 0:
            old.append(copy.deepcopy(old[-1]))
        elif choice == 1:
            old.pop(rng.randrange(len(old)))
        else:
            old.extend(copy.deepcopy(old[:1]) * rng.choice([10, 1000]))
        return f"list length {path}"
    if op == 3 and isinstance(old, str) and len(old) > 16:
        try:
            raw = zlib.decompress(base64.b64decode(old))
        except Exception:
            raw = None
        if raw is not None:  # nested zlib: a bomb, or the same bits cut short
            parent[key] = base64.b64encode(
                bomb(rng.choice(BOMB_SIZES)) if rng.random() < 0.7
                else zlib.compress(raw[: len(raw) // 2])).decode()
            return f"nested zlib {path}"
    if op == 4 and isinstance(old, dict) and old:
        parent[key] = {k: random_json(rng) if rng.random() < 0.3 else v for k, v in old.items()}
        return f"object values {path}"
    parent[key] = random_json(rng)
    return f"replaced {path}"


def mutate_stream(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """A forged variant of a valid stream: structural changes with the CRC recomputed, or
    raw damage without it."""
    from forge import forge

    done: list[str] = []
    if rng.random() < 0.15:  # raw damage: the container must notice
        buf = bytearray(data)
        op = rng.randrange(3)
        if op == 0:
            for _ in range(rng.randrange(1, 8)):
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
            done.append("bit flips")
        elif op == 1:
            buf = buf[: rng.randrange(len(buf))]
            done.append("truncated")
        else:
            buf[rng.randrange(len(buf)):rng.randrange(len(buf))] = rng.randbytes(rng.randrange(64))
            done.append("spliced")
        return bytes(buf), done

    def mutate(header: dict, payloads: list) -> None:
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            try:
                one_mutation(header, payloads)
            except (TypeError, KeyError, IndexError, AttributeError):
                done.append("skipped (an earlier change removed what it needs)")

    def one_mutation(header: dict, payloads: list) -> None:
        op = rng.randrange(10)
        if op < 6:
            done.append(mutate_json(header, rng))
        elif op == 6 and payloads:  # payload bytes, lengths kept consistent
            i = rng.randrange(len(payloads))
            p = bytearray(payloads[i])
            how = rng.randrange(4)
            if how == 0 and p:
                p[rng.randrange(len(p))] ^= 0xFF
            elif how == 1:
                p = p[: rng.randrange(len(p) + 1)]
            elif how == 2:
                p += rng.randbytes(rng.choice([1, 4, 1000]))
            else:
                p = bytearray(rng.randbytes(len(p)))
            payloads[i] = bytes(p)
            header["payload_lengths"][i] = len(p)
            done.append(f"payload {i} ({how})")
        elif op == 7 and payloads:  # more items, consistent counts
            k = rng.choice([1, 5, 1000])
            header["items"] += [copy.deepcopy(header["items"][-1]) for _ in range(k)]
            payloads += [payloads[-1]] * k
            header["payload_lengths"] += [len(payloads[-1])] * k
            header["n_items"] = len(payloads)
            done.append(f"{k} extra items")
        elif op == 8:  # counts that disagree with the data
            header["n_items"] = rng.choice([0, 1, 12_000_000, -1])
            done.append("n_items")
        else:  # a template or shape claim, deep in the item metadata
            targets = [p for p in _paths(header) if p and p[-1] in
                       ("n", "shape", "resolution", "scale", "dtype", "template", "frame",
                        "intrinsics", "views", "context", "orbit", "poses")]
            if targets:
                path = rng.choice(targets)
                _parent(header, path)[path[-1]] = random_json(rng)
                done.append(f"claim {path}")

    return forge(data, mutate), done


# -- running one case ---------------------------------------------------------------------
def _alarm(signum, frame):  # noqa: ARG001
    raise Hang()


def run_cli(argv: list[str], seconds: float = CASE_SECONDS) -> tuple[int, str]:
    """``mscn ARGV`` in process: (exit code, stderr). Stdout is swallowed."""
    from mscn_core.cli import main

    err, out = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return int(code or 0), err.getvalue()


def judge(code: int, stderr: str, out_dir: Path) -> str | None:
    """None when the outcome is acceptable, else what went wrong."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "warning:" not in ln]
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(".")]
    if leftovers:
        return f"temp files left behind: {leftovers}"
    if code == 0:
        return None
    if code != 2:
        return f"exit {code}: {stderr.strip()[-2000:]}"
    if len(lines) != 1:
        return f"{len(lines)} lines of error: {stderr.strip()[-2000:]}"
    if "Traceback" in stderr or "internal error" in stderr:
        return f"not a clean error: {stderr.strip()}"
    return None


def decode_case(stream: bytes, seed: dict, work: Path) -> str | None:
    """Decode a (forged) stream with the real CLI; a verdict as :func:`judge`."""
    src = work / "case.mscn"
    src.write_bytes(stream)
    out_dir = work / "out"
    out_dir.mkdir(exist_ok=True)
    for p in out_dir.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()  # a scene decodes to a folder
    os.environ["MSCN_MAX_OUTPUT_VALUES"] = str(seed.get("max_output_values",
                                                        MAX_OUTPUT_VALUES))
    code, stderr = run_cli(["decode", str(src), "--checkpoint", str(seed["checkpoint"]),
                            "-o", str(out_dir / f"decoded{seed['ext']}"), "--overwrite",
                            *seed["flags"]])
    return judge(code, stderr, out_dir)


def checkpoint_case(ckpt: Path, rng: random.Random, work: Path) -> str | None:
    """A checkpoint with forged metadata (digest kept, recomputed or dropped), inspected and
    used to decode its own seed stream."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(ckpt), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["mscn"])
    what = mutate_json(config, rng)
    meta["mscn"] = json.dumps(config)
    op = rng.randrange(4)
    if op == 0:
        meta.pop("mscn_tensors_sha256", None)
    elif op == 1:
        k = rng.choice(sorted(tensors))
        tensors[k] = tensors[k].clone()
        tensors[k].view(-1)[0] += 1
    elif op == 2:
        meta["mscn"] = rng.choice(["[]", "3", "\"x\"", "{", json.dumps({"siren": 1})])
    forged = work / "forged.safetensors"
    forged.write_bytes(save(tensors, metadata=meta))
    out_dir = work / "out"
    out_dir.mkdir(exist_ok=True)
    code, stderr = run_cli(["inspect", str(forged)])
    verdict = judge(code, stderr, out_dir)
    return None if verdict is None else f"{what}, op {op}: {verdict}"


# -- the worker: hypothesis rounds until the budget is spent --------------------------------
def work(seconds: float, max_cases: int, seed: int, report: Path) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    os.environ["MSCN_MAX_OUTPUT_VALUES"] = str(MAX_OUTPUT_VALUES)
    workdir = Path(tempfile.mkdtemp(prefix="mscn-fuzz-"))
    seeds = build_seeds(workdir)
    for size in BOMB_SIZES:
        bomb(size)
    # Warm every code path once (imports, lazy plugin loading) before capping memory.
    for s in seeds:
        verdict = decode_case(s["stream"], s, workdir)
        if verdict:
            raise SystemExit(f"seed {s['name']} does not decode cleanly: {verdict}")
    vm = _vm_size()
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_HEADROOM, resource.RLIM_INFINITY))
    counts = {"streams": 0, "checkpoints": 0, "rounds": 0}
    stop = time.monotonic() + seconds
    failures: list[dict] = []

    def write_report() -> None:
        report.write_text(json.dumps({**counts, "failures": failures, "seconds": seconds,
                                      "memory_cap_bytes": vm + MEMORY_HEADROOM,
                                      "max_output_values": MAX_OUTPUT_VALUES,
                                      "seed": seed}, indent=2))

    @settings(max_examples=50, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(rng=st.randoms(use_true_random=False), which=st.integers(0, len(seeds)),
           )
    def one_case(rng: random.Random, which: int) -> None:
        if which == len(seeds):
            counts["checkpoints"] += 1
            s = seeds[rng.randrange(len(seeds))]
            verdict = checkpoint_case(Path(s["checkpoint"]), rng, workdir)
            assert verdict is None, verdict
            return
        s = seeds[which]
        stream, done = mutate_stream(s["stream"], rng)
        counts["streams"] += 1
        # Written before running: what a crash (signal, kill by the cap) leaves behind.
        report.with_suffix(".case.mscn").write_bytes(stream)
        report.with_suffix(".case.json").write_text(json.dumps({"seed": s["name"],
                                                                 "done": done}))
        verdict = decode_case(stream, s, workdir)
        assert verdict is None, f"{s['name']} {done}: {verdict}"

    k = 0
    while time.monotonic() < stop and counts["streams"] + counts["checkpoints"] < max_cases:
        try:
            hseed(seed * 100003 + k)(one_case)()
        except Exception as exc:  # an assertion, or anything escaping a case
            failures.append({"round": k, "error": f"{type(exc).__name__}: {exc}"[:4000]})
            write_report()
            break
        k += 1
        counts["rounds"] = k
        write_report()
    write_report()
    return 1 if failures else 0


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def run(seconds: float, max_cases: int = 10**9, seed: int = 0,
        report: Path | None = None) -> dict:
    """Run the worker in a child process (its memory is capped, ours is not)."""
    report = report or Path(tempfile.mkdtemp(prefix="mscn-fuzz-report-")) / "fuzz.json"
    cmd = [sys.executable, __file__, "--worker", "--seconds", str(seconds),
           "--max-cases", str(max_cases), "--seed", str(seed), "--report", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=seconds + 600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(report.read_text()) if report.exists() else {}
    result["returncode"] = proc.returncode
    result["stderr_tail"] = proc.stderr[-3000:]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--max-cases", type=int, default=10**9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(1)
        return work(args.seconds, args.max_cases, args.seed, args.report)
    report = args.report or REPO / "out" / "fuzz.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    result = run(args.seconds, args.max_cases, args.seed, report)
    print(json.dumps({k: v for k, v in result.items() if k != "stderr_tail"}, indent=2))
    if result["returncode"] != 0:
        print(result["stderr_tail"], file=sys.stderr)
    return result["returncode"]


if __name__ == "__main__":
    raise SystemExit(main())
