"""``mscn meta-train --resume``: killed with SIGKILL mid-run, resumed, bitwise the same
checkpoint as a run never interrupted (real ERA5 data, tiny config, one thread)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from clirun import ENV, mscn, ok
from conftest import ERA5
from safetensors.torch import load_file

from mscn_core.trainstate import load_state

STEPS = 60
TRAIN = ["meta-train", "--data", ERA5, "--modality", "sphere", "--var", "t",
         "--sel", "isobaricInhPa=850", "--sel", "number=0,1,2,3", "--depth", "3",
         "--width", "16", "--budget", "8", "--outer-lr", "1e-3", "--batch-size", "4",
         "--points-per-item", "128", "--val-every", "4", "--val-points", "256",
         "--save-every", "3", "--progress", "false", "--threads", "1"]


def refused(r: subprocess.CompletedProcess) -> str:
    """The one error line of a refused command (exit 2), before training began. (Not
    clirun.refused: an unrelated plugin-name warning may precede it on this machine.)"""
    assert r.returncode == 2, r.stderr
    assert "meta-training" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text().splitlines()
            if "event" not in json.loads(line)]


def _killed_run(out: Path) -> None:
    """Start a run, SIGKILL it once its second state file (state.prev.pt) exists."""
    child = subprocess.Popen([sys.executable, "-m", "mscn_core", *map(str, TRAIN),
                              "--outer-steps", str(STEPS), "-o", str(out)], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    prev = Path(f"{out}.train") / "state.prev.pt"
    try:
        deadline = time.monotonic() + 60
        while not prev.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()


def test_killed_then_resumed_equals_uninterrupted(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref = tmp_path / "ref.safetensors"
    tb = tmp_path / "tb"
    r = mscn(*TRAIN, "--outer-steps", STEPS, "--tensorboard-dir", tb, "-o", ref)
    assert ok(r)["steps_run"] == STEPS
    summary = r.stderr.strip().splitlines()[-1]
    assert summary.startswith("meta-training done: best validation loss")
    assert f"{STEPS} steps" in summary and str(ref) in summary and "metrics.jsonl" in summary
    acc = EventAccumulator(str(tb)).Reload()
    assert len(acc.Scalars("train/loss")) == STEPS

    out = tmp_path / "run.safetensors"
    _killed_run(out)
    state_dir = Path(f"{out}.train")
    # (the kill may land between the rotation to .prev and the new latest: then only
    # state.prev.pt exists, which is what resuming must cope with too)
    state, _ = load_state(state_dir, warn=False)
    assert 3 <= state["step"] < STEPS

    # the same state, its latest file truncated: falls back to state.prev.pt
    bad = tmp_path / "bad.safetensors"
    shutil.copytree(state_dir, f"{bad}.train")
    latest = Path(f"{bad}.train") / "state.pt"
    prev = Path(f"{bad}.train") / "state.prev.pt"
    latest.write_bytes((latest if latest.exists() else prev).read_bytes()[:1000])

    # a different width: refused in one line naming the difference, state untouched
    line = refused(mscn(*TRAIN, "--outer-steps", STEPS, "--width", "8", "--resume",
                        "-o", out))
    assert "siren.width was 16, now 8" in line and not out.exists()
    # a fresh run over a crashed one's state: refused unless --resume/--overwrite
    assert "--resume" in refused(mscn(*TRAIN, "--outer-steps", STEPS, "-o", out))

    r = mscn(*TRAIN, "--outer-steps", STEPS, "--resume", "-o", out)
    assert ok(r)["steps_run"] == STEPS
    _same_tensors(ref, out)
    steps = _steps(state_dir / "metrics.jsonl")
    assert steps == list(range(STEPS + 1))  # cut back at the resumed step: no duplicates

    r = mscn(*TRAIN, "--outer-steps", STEPS, "--resume", "-o", bad)
    ok(r)
    warning = [ln for ln in r.stderr.splitlines() if "warning" in ln and "state" in ln]
    assert len(warning) == 1 and str(latest) in warning[0] and "previous" in warning[0]
    _same_tensors(ref, bad)


def test_resume_without_state_is_one_line_error(tmp_path):
    line = refused(mscn(*TRAIN, "--outer-steps", 3, "--resume", "-o", tmp_path / "x.st"))
    assert "no training state to resume" in line


def test_sigterm_after_a_state_save_says_where_the_state_is(tmp_path):
    out = tmp_path / "run.safetensors"
    child = subprocess.Popen([sys.executable, "-m", "mscn_core", *map(str, TRAIN),
                              "--outer-steps", "100000", "-o", str(out)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = Path(f"{out}.train") / "state.pt"
    try:
        deadline = time.monotonic() + 60
        while not state.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 143, err
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert lines == [f"mscn meta-train: interrupted (SIGTERM); training state kept in "
                     f"{out}.train; continue with --resume"]
    assert not out.exists() and load_state(Path(f"{out}.train"), warn=False)[0]["step"] >= 3
