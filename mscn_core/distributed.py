"""Process-group plumbing for data-parallel meta-training (torch.distributed).

Why a module of its own: ``meta_train`` must stay one code path for 1 and N processes,
so everything rank-dependent (who am I, sum over ranks, which device) lives here and
degrades to a no-op when no process group exists.

Ranks come from the environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`launch` sets the same variables
for ``mscn meta-train --nproc N`` (a minimal single-node torchrun, so that a failing rank
is reported in one line rather than torchrun's multi-screen error report). The backend is
gloo on CPU and nccl on CUDA, one GPU per local rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun/--nproc)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Only rank 0 writes files (log, state, checkpoint) and prints."""
    return rank() == 0


def device_for(device: str) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under a process group."""
    if world_size() > 1 and device == "cuda":
        return f"cuda:{local_rank()}"
    return device


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's variables; False when there is none
    (``WORLD_SIZE`` unset or 1). nccl for a CUDA device, gloo otherwise."""
    if env_world_size() <= 1 or is_initialized():
        return is_initialized()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return True


def shutdown() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (identity with one process); returns ``t``."""
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    """SUM every parameter's gradient over ranks, flattened into one buffer (one
    collective per step); a parameter without a gradient counts as zeros."""
    if world_size() <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat)
    start = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[start:start + n].view_as(g).clone()
        start += n


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (identical initial θ)."""
    if world_size() <= 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(t.data, src=0)


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``python -m mscn_core ARGV`` as ``nproc`` ranks on this machine; the exit code.

    Rank 0 keeps this terminal (its progress bar, summary and errors); the other ranks'
    stdout is dropped and their stderr kept aside, shown only if one of them fails while
    rank 0 did not. When a rank fails the others are stopped (SIGTERM) rather than left
    waiting in a collective.
    """
    port = str(_free_port())
    procs: list[subprocess.Popen] = []
    logs: list[Path | None] = []
    tmp = tempfile.TemporaryDirectory(prefix="mscn-ranks-")
    try:
        for r in range(nproc):
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(nproc),
                   "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(nproc),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            cmd = [sys.executable, "-m", "mscn_core", *argv]
            if r == 0:
                procs.append(subprocess.Popen(cmd, env=env))
                logs.append(None)
            else:
                log = Path(tmp.name) / f"rank{r}.err"
                with open(log, "wb") as err:
                    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                  stderr=err))
                logs.append(log)
        failed: int | None = None
        while any(p.poll() is None for p in procs):
            bad = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad and failed is None:
                failed = bad[0]
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(0.05)
        codes = [p.returncode for p in procs]
        if codes[0] != 0:
            return codes[0]
        for r, code in enumerate(codes):
            if code != 0:
                text = logs[r].read_text(errors="replace").strip().splitlines() if logs[r] else []
                print(f"mscn meta-train: rank {r} failed (exit {code}): "
                      f"{text[-1] if text else 'no message'}", file=sys.stderr)
                return code
        return 0
    finally:  # interrupted, or a rank failed: SIGTERM lets ranks remove their temp files
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        tmp.cleanup()
