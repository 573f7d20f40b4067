"""Distributed meta-training (torch.distributed, gloo on CPU): 2 processes give the
1-process result for the same global batch and seed, and only rank 0 writes or prints.

Tolerance: the meta-gradient is a sum over ranks of float32 partial sums, so the order
of additions differs from one process; measured max |Δ| 3e-8 on these tensors after 10
steps (largest |value| 0.3). We assert atol 1e-6. Two 2-rank runs (``--nproc`` and
``torchrun``) are bitwise equal to each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from clirun import ENV, mscn, ok
from conftest import ERA5
from safetensors.torch import load_file

TRAIN = ["meta-train", "--data", ERA5, "--modality", "sphere", "--var", "t",
         "--sel", "isobaricInhPa=850", "--sel", "number=0,1,2,3", "--depth", "3",
         "--width", "16", "--budget", "8", "--outer-steps", "10", "--outer-lr", "1e-3",
         "--batch-size", "4", "--points-per-item", "128", "--val-every", "4",
         "--val-points", "256", "--save-every", "5", "--progress", "false",
         "--threads", "1"]
ATOL = 1e-6


def _only_rank0_wrote(r: subprocess.CompletedProcess, out: Path, tb: Path) -> None:
    ok(r)  # one JSON document on stdout: a second rank's would break it
    assert r.stderr.count("meta-training done:") == 1
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        [out.name, f"{out.name}.train", tb.name])
    assert sorted(p.name for p in Path(f"{out}.train").iterdir()) == [
        "metrics.jsonl", "state.pt"]
    assert len(list(tb.iterdir())) == 1  # one events file (its name holds the pid)
    steps = [json.loads(line)["step"] for line in
             Path(f"{out}.train", "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(11))


def test_two_processes_equal_one(tmp_path):
    one = tmp_path / "one" / "c.safetensors"
    nproc = tmp_path / "nproc" / "c.safetensors"
    run = tmp_path / "torchrun" / "c.safetensors"
    for p in (one, nproc, run):
        p.parent.mkdir()
    ok(mscn(*TRAIN, "-o", one))
    tb = nproc.parent / "tb"
    r = mscn(*TRAIN, "--nproc", 2, "--tensorboard-dir", tb, "-o", nproc)
    assert "2 processes" in r.stderr
    _only_rank0_wrote(r, nproc, tb)
    tb = run.parent / "tb"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "-m", "mscn_core", *map(str, TRAIN),
                        "--tensorboard-dir", str(tb), "-o", str(run)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    _only_rank0_wrote(r, run, tb)

    a, b, c = (load_file(str(p)) for p in (one, nproc, run))
    assert a.keys() == b.keys() == c.keys()
    worst = 0.0
    for k in a:
        assert torch.equal(b[k], c[k]), k  # 2 ranks either way: the same additions
        if a[k].dtype.is_floating_point:
            worst = max(worst, float((a[k] - b[k]).abs().max()))
        else:
            assert torch.equal(a[k], b[k]), k
    assert worst <= ATOL, worst


def test_more_processes_than_batch_items_is_refused_before_launch(tmp_path):
    r = mscn(*TRAIN, "--nproc", 5, "-o", tmp_path / "c.safetensors")
    assert r.returncode == 2 and "meta-training" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(
        "--nproc 5 exceeds --batch-size 4: each process needs at least one item of every batch")
    assert list(tmp_path.iterdir()) == []
