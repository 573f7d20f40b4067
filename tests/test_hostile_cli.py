"""The real ``mscn`` CLI on hostile input: bad outputs are refused before any work, every
failure is one line (exit 2; 1 for an internal error), signals and closed pipes leave no
temp file and no traceback, and ``inspect`` reads ``.mscn`` streams.

Most commands run in-process (``main([...])``); signals, pipes and ``kill -9`` use real
child processes. Data: the shipped checkpoint and the vendored file it was trained for.

"Before any work" is shown, not assumed: the commands that can run long get a run length
(``--steps`` / ``--outer-steps`` 10**6) that would take far longer than the time limit
asserted, and meta-train must fail before printing its first progress line.

Lines starting ``mscn: warning:`` are ignored when counting error lines: another test
module (test_registry) installs a plugin shadowing a built-in name into the shared
environment for a while, and every discovery then warns, in one line, about it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mscn_core.atomic import TEMP_TAG, check_output, save_bytes_atomic
from mscn_core.bitstream import read_bitstream
from mscn_core.cli import guarded, main

ROOT = Path(__file__).resolve().parents[1]
ERA5 = ROOT / "datasets" / "data" / "era5_t_z_3deg_2017-01-01_float32.nc"
CKPT = ROOT / "plugins" / "checkpoints" / "era5_t850.safetensors"
OTHER_CKPT = ROOT / "plugins" / "checkpoints" / "shapes_sdf.safetensors"
SEL = ["--var", "t", "--sel", "isobaricInhPa=850", "--sel", "number=8"]  # 4 items
SLOW = str(10**6)  # steps that would take many minutes if the check came after them
FAST_ENOUGH = 30.0  # seconds: a refusal before work, even on a busy 2-core machine



def _run(capsys, *argv) -> tuple[int, str, str]:
    """``mscn ARGV`` in-process: exit code, stdout, stderr."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as done:  # argparse usage errors, --help
        rc = done.code
    out, err = capsys.readouterr()
    return rc, out, err


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln and not ln.startswith("mscn: warning:")]


def _error_line(err: str, command: str) -> str:
    """The one line a failing command prints."""
    assert "Traceback" not in err, err
    lines = _lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mscn {command}: error: "), err
    return lines[0]


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_TAG in p.name)


def _child(*argv: object, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mscn_core", *map(str, argv)], **kw)


# -- one command line per writing command, the output path given ---------------------------

def _writers(stream: Path, spare: Path) -> dict[str, tuple[str, object]]:
    """command → (output suffix, argv builder). The long-running ones are made slow."""
    return {
        "fit": (".nc", lambda o: ["fit", ERA5, *SEL, "--checkpoint", CKPT, "--steps", SLOW,
                                  "-o", o]),
        "evaluate": (".json", lambda o: ["evaluate", ERA5, *SEL, "--checkpoint", CKPT,
                                         "--steps", SLOW, "-o", o]),
        "encode": (".mscn", lambda o: ["encode", ERA5, *SEL, "--checkpoint", CKPT, "-o", o]),
        "decode": (".nc", lambda o: ["decode", stream, "--checkpoint", CKPT, "-o", o]),
        "meta-train": (".safetensors", lambda o: ["meta-train", "--data", ERA5, *SEL,
                                                  "--depth", "2", "--width", "8",
                                                  "--outer-steps", SLOW, "--progress",
                                                  "false", "-o", o]),
        "view": (".png", lambda o: ["view", ERA5, ERA5, *SEL, "-o", o]),
        "view --gif": (".gif", lambda o: ["view", ERA5, ERA5, *SEL, "-o", spare / "v.png",
                                          "--gif", o]),
    }


WRITERS = ["fit", "evaluate", "encode", "decode", "meta-train", "view", "view --gif"]


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    """A real .mscn stream of 4 held-out fields, encoded by the CLI."""
    out = tmp_path_factory.mktemp("stream") / "t850.mscn"
    assert main(["encode", str(ERA5), *SEL, "--checkpoint", str(CKPT), "-o", str(out)]) == 0
    return out


def _refused(capsys, stream, tmp_path, command, output, *, overwrite=False) -> str:
    """Run ``command`` writing ``output``; it must fail fast, in one line, writing nothing."""
    spare = tmp_path / "spare"
    spare.mkdir(exist_ok=True)
    argv = _writers(stream, spare)[command][1](output)
    before = {p: sorted(os.listdir(p)) for p in (tmp_path, spare)}
    t0 = time.monotonic()
    rc, out, err = _run(capsys, *argv, *(["--overwrite"] if overwrite else []))
    took = time.monotonic() - t0
    assert rc == 2, err
    assert took < FAST_ENOUGH, f"{command} took {took:.1f} s: the check came after work"
    assert "meta-training" not in err  # meta-train's first progress line: never reached
    assert out == ""
    assert {p: sorted(os.listdir(p)) for p in (tmp_path, spare)} == before  # nothing, no temp
    return _error_line(err, command.split()[0])


# -- row: read-only output directory --------------------------------------------------------

@pytest.fixture
def readonly_dir(tmp_path):
    """A directory no file can be created in, also for root (who ignores permission
    bits): chmod for a normal user, ``chattr +i`` (immutable) for root."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(d)],
                                        capture_output=True).returncode != 0:
        pytest.skip("root here, and chattr +i is unavailable: no read-only directory to test")
    try:
        try:
            (d / "probe").write_bytes(b"")
        except PermissionError:
            yield d
        else:
            pytest.skip("chattr +i did not make the directory read-only on this file system")
    finally:
        subprocess.run([chattr, "-i", str(d)], check=False)


@pytest.mark.parametrize("command", WRITERS)
def test_read_only_output_directory_is_refused_before_any_work(capsys, stream, tmp_path,
                                                               readonly_dir, command):
    out = readonly_dir / f"out{_writers(stream, tmp_path)[command][0]}"
    line = _refused(capsys, stream, tmp_path, command, out)
    assert str(out) in line and ("not writable" in line or "cannot create" in line), line
    assert os.listdir(readonly_dir) == []


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir("/sys"),
                    reason="shows the creation probe where permission bits say yes (root)")
def test_root_is_refused_where_the_kernel_refuses_despite_permission_bits(capsys, stream,
                                                                           tmp_path):
    assert os.access("/sys", os.W_OK)  # what a permission-bit check alone would believe
    line = _refused(capsys, stream, tmp_path, "encode", Path("/sys/out.mscn"))
    assert "/sys/out.mscn" in line and "cannot create files in directory /sys" in line


# -- row: -o naming a directory; the output directory missing; the output existing ---------

@pytest.mark.parametrize("command", WRITERS)
def test_output_that_is_a_directory_is_refused_even_with_overwrite(capsys, stream, tmp_path,
                                                                   command):
    target = tmp_path / "a_dir"
    target.mkdir()
    for overwrite in (False, True):
        line = _refused(capsys, stream, tmp_path, command, target, overwrite=overwrite)
        assert f"{target}: is a directory" in line


@pytest.mark.parametrize("command", WRITERS)
def test_missing_output_directory_is_refused_and_not_created(capsys, stream, tmp_path,
                                                             command):
    missing = tmp_path / "no_such_dir"
    out = missing / f"out{_writers(stream, tmp_path)[command][0]}"
    line = _refused(capsys, stream, tmp_path, command, out)
    assert line.endswith(f"{out}: directory {missing} does not exist (it is not created)")
    assert TEMP_TAG not in line and not missing.exists()


@pytest.mark.parametrize("command", WRITERS)
def test_existing_output_and_dangling_symlink_are_refused_without_overwrite(capsys, stream,
                                                                           tmp_path, command):
    suffix = _writers(stream, tmp_path)[command][0]
    existing = tmp_path / f"keep{suffix}"
    existing.write_bytes(b"precious")
    line = _refused(capsys, stream, tmp_path, command, existing)
    assert f"{existing}: exists; pass --overwrite" in line
    assert existing.read_bytes() == b"precious"

    link = tmp_path / f"link{suffix}"
    link.symlink_to(tmp_path / "nowhere")
    line = _refused(capsys, stream, tmp_path, command, link)
    assert f"{link}: exists (a dangling symbolic link); pass --overwrite" in line
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("command", ["encode", "fit"])
def test_overwrite_replaces_a_dangling_symlink_itself_never_through_it(capsys, tmp_path,
                                                                      command):
    suffix = ".mscn" if command == "encode" else ".nc"
    link, pointee = tmp_path / f"link{suffix}", tmp_path / f"pointee{suffix}"
    link.symlink_to(pointee)
    rc, _, err = _run(capsys, command, ERA5, *SEL, "--checkpoint", CKPT, "-o", link,
                      "--overwrite")
    assert rc == 0, err
    assert not link.is_symlink() and link.is_file() and not pointee.exists()
    if command == "encode":
        assert read_bitstream(link.read_bytes()).n_items == 4
    assert _temps(tmp_path) == []


def test_write_atomic_replaces_a_live_symlink_not_its_target(tmp_path):
    target = tmp_path / "target.bin"
    target.write_bytes(b"theirs")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_bytes_atomic(b"ours", link)
    save_bytes_atomic(b"ours", link, overwrite=True)
    assert not link.is_symlink() and link.read_bytes() == b"ours"
    assert target.read_bytes() == b"theirs"


def test_check_output_names_the_path_in_every_refusal(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(tmp_path, IsADirectoryError), (afile, FileExistsError),
             (tmp_path / "none" / "x.nc", FileNotFoundError),
             (afile / "x.nc", NotADirectoryError)]
    for path, error in cases:
        with pytest.raises(error) as caught:
            check_output(path)
        assert caught.value.filename == str(path)
    assert check_output(tmp_path / "new.nc") == tmp_path / "new.nc"
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # the creation probe left nothing


# -- row: inputs that are directories, missing or unreadable --------------------------------

def test_input_directory_where_a_file_is_needed(capsys, stream, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    out = tmp_path / "out.nc"
    for command, argv in [
            ("decode", ["decode", folder, "--checkpoint", CKPT, "-o", out]),
            ("fit", ["fit", ERA5, *SEL, "--checkpoint", folder, "-o", out]),
            ("encode", ["encode", ERA5, *SEL, "--checkpoint", folder, "-o", out]),
            ("inspect", ["inspect", folder])]:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2
        assert _error_line(err, command).endswith(f"{folder}: is a directory; a file is "
                                                  "needed here")
    assert sorted(os.listdir(tmp_path)) == ["folder"]


def test_data_folders_are_still_accepted(capsys, tmp_path):
    folder = tmp_path / "data"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(ERA5, folder / "nested" / ERA5.name)
    rc, out, err = _run(capsys, "fit", folder, *SEL, "--checkpoint", CKPT, "-o",
                        tmp_path / "r.nc")
    assert rc == 0, err
    assert json.loads(out)["items"] == 4


def test_missing_inputs_are_named(capsys, stream, tmp_path):
    gone = tmp_path / "gone.nc"
    out = tmp_path / "out.nc"
    for command, argv in [
            ("fit", ["fit", gone, "-o", out]),  # before guessing the modality from it
            ("fit", ["fit", ERA5, *SEL, "--checkpoint", tmp_path / "gone.safetensors",
                     "-o", out]),
            ("decode", ["decode", gone, "--checkpoint", CKPT, "-o", out]),
            ("view", ["view", "globe", gone, ERA5, *SEL, "-o", tmp_path / "v.png"]),
            ("meta-train", ["meta-train", "--modality", "sphere", "--data", gone, "-o",
                            tmp_path / "c.safetensors"]),
            ("inspect", ["inspect", gone])]:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2
        line = _error_line(err, command)
        assert line.endswith(": no such file or directory") and "gone." in line, line
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permission "
                    "bits, so an unreadable input cannot be made here")
def test_unreadable_input_is_refused(capsys, tmp_path):
    secret = tmp_path / "secret.nc"
    shutil.copy(ERA5, secret)
    secret.chmod(0)
    try:
        rc, _, err = _run(capsys, "fit", secret, *SEL, "--checkpoint", CKPT, "-o",
                          tmp_path / "out.nc")
        assert rc == 2
        assert _error_line(err, "fit").endswith(f"{secret}: not readable (permission denied)")
    finally:
        secret.chmod(0o644)


# -- row: kill -9 while writing; SIGTERM / SIGINT -------------------------------------------

SLOW_WRITER = """
import sys, time
from pathlib import Path
from mscn_core.atomic import write_atomic
from mscn_core.cli import guarded

def slow(tmp):
    Path(tmp).write_bytes(b"half a file")
    print("writing", flush=True)
    time.sleep(300)

sys.exit(guarded("encode", lambda: write_atomic(sys.argv[1], slow)))
"""


def _slow_writer(target: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing", child.stderr.read()
    return child


def test_kill_9_leaves_a_recognisable_temp_that_the_next_write_removes(capsys, tmp_path):
    target = tmp_path / "t850.mscn"
    child = _slow_writer(target)
    try:
        (temp,) = _temps(tmp_path)
        assert temp.startswith(f".{target.name}{TEMP_TAG}{child.pid}.")
        assert temp.endswith(".mscn")  # the real suffix last: writers infer the format
        # a live writer's temp is never taken for a stale one
        save_bytes_atomic(b"x", tmp_path / "t850.mscn", overwrite=True)
        assert _temps(tmp_path) == [temp]
        child.kill()  # SIGKILL: no handler, no cleanup
    finally:
        child.kill()
        child.wait()  # reaped: a zombie would still count as a live process
    assert child.returncode == -signal.SIGKILL and _temps(tmp_path) == [temp]

    rc, _, err = _run(capsys, "encode", ERA5, *SEL, "--checkpoint", CKPT, "-o", target,
                      "--overwrite")
    assert rc == 0, err
    assert _temps(tmp_path) == []
    assert read_bitstream(target.read_bytes()).n_items == 4


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_removes_the_temp_and_exits_128_plus_n(tmp_path, sig):
    target = tmp_path / "out.mscn"
    child = _slow_writer(target)
    assert len(_temps(tmp_path)) == 1
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + sig, err
    assert _lines(err) == [f"mscn encode: interrupted ({sig.name}); nothing written"]
    assert os.listdir(tmp_path) == []


def test_sigterm_during_meta_train_exits_143_in_one_line_writing_nothing(tmp_path):
    out = tmp_path / "c.safetensors"
    child = _child("meta-train", "--data", ERA5, *SEL, "--depth", "2", "--width", "8",
                   "--outer-steps", SLOW, "--progress", "false", "--threads", "1", "-o", out,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "meta-training" not in (line := child.stderr.readline()):
            assert line, "meta-train ended before training"
        time.sleep(0.5)  # inside the training loop
        child.send_signal(signal.SIGTERM)
        stdout, err = child.communicate(timeout=120)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 143, err
    assert _lines(err) == ["mscn meta-train: interrupted (SIGTERM); nothing written"]
    assert stdout == "" and os.listdir(tmp_path) == []


# -- row: numeric flags checked at parse time -----------------------------------------------

@pytest.mark.parametrize("command,flag,value,message", [
    ("fit", "--steps", "-5", "must be 0 or more, got -5"),
    ("evaluate", "--steps", "-1", "must be 0 or more, got -1"),
    ("encode", "--bits", "9", "must be 2..8, got 9"),
    ("fit", "--bits", "1", "must be 2..8, got 1"),
    ("encode", "--points-per-step", "0", "must be a positive integer, got 0"),
    ("view", "--index", "-1", "must be 0 or more, got -1"),
    ("fit", "--steps", "three", "not an integer: 'three'"),
])
def test_bad_numbers_are_usage_errors(capsys, tmp_path, command, flag, value, message):
    inputs = [ERA5, ERA5] if command == "view" else [ERA5, "--checkpoint", CKPT]
    rc, stdout, err = _run(capsys, command, *inputs, *SEL, flag, value, "-o",
                           tmp_path / "out.x")
    assert rc == 2 and stdout == "" and "Traceback" not in err
    assert _lines(err)[-1] == f"mscn {command}: error: argument {flag}: {message}"
    assert os.listdir(tmp_path) == []


def test_steps_zero_is_allowed(capsys):
    rc, out, err = _run(capsys, "evaluate", ERA5, *SEL, "--checkpoint", CKPT, "--steps", "0")
    assert rc == 0, err
    assert "psnr_db" in json.loads(out)["mean"]


# -- one error path: --debug, internal errors, data errors name the file --------------------

@pytest.mark.parametrize("where", ["after", "before"])
def test_debug_shows_the_traceback_and_keeps_the_exit_code(capsys, stream, tmp_path, where):
    trunc = tmp_path / "trunc.mscn"
    trunc.write_bytes(stream.read_bytes()[:100])
    argv = ["decode", trunc, "--checkpoint", CKPT, "-o", tmp_path / "out.nc"]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2
    line = _error_line(err, "decode")
    assert line.startswith(f"mscn decode: error: {trunc}: truncated")
    argv = [*argv, "--debug"] if where == "after" else ["--debug", *argv]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and "Traceback" in err and err.splitlines()[-1] == line


def test_an_unexpected_exception_is_one_internal_error_line(capsys):
    def bug() -> int:
        return {}["missing"]

    assert guarded("fit", bug) == 1
    err = capsys.readouterr().err
    assert err == ("mscn fit: internal error: KeyError: 'missing' "
                   "(run with --debug for the traceback)\n")
    assert guarded("fit", bug, debug=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "mscn fit: internal error: " \
        "KeyError: 'missing'"


def test_io_errors_name_their_file(capsys):
    def unreadable() -> int:
        raise PermissionError(13, "Permission denied", "/some/file.nc")

    assert guarded("encode", unreadable) == 2
    assert capsys.readouterr().err == "mscn encode: error: /some/file.nc: Permission denied\n"


# -- row: inspect reads streams; closed pipes; --version ------------------------------------

def test_inspect_reads_an_mscn_stream(capsys, stream):
    rc, out, err = _run(capsys, "inspect", stream)
    assert rc == 0, err
    header = read_bitstream(stream.read_bytes())
    assert f"stream      {stream}  (format v1)" in out
    assert "modality    sphere" in out and "bits        6" in out and "items       4" in out
    assert f"needs       checkpoint sha256 {header.checkpoint_hash}" in out
    assert "bits per value" in out and "item 3" in out

    rc, out, _ = _run(capsys, "inspect", stream, "--checkpoint", CKPT)
    assert rc == 0 and f"checkpoint  {CKPT} matches" in out
    rc, out, _ = _run(capsys, "inspect", stream, "--checkpoint", OTHER_CKPT)
    assert rc == 0 and "does NOT match" in out

    rc, out, _ = _run(capsys, "inspect", stream, "--checkpoint", CKPT, "--json")
    info = json.loads(out)
    assert info["kind"] == "stream" and info["n_items"] == 4 and info["bits"] == 6
    assert info["bytes"] == stream.stat().st_size
    assert info["payload_bytes"] == header.payload_bytes < info["bytes"]
    assert info["checkpoint"]["matches"] is True
    assert info["bits_per_value"] == pytest.approx(8 * info["bytes"] / info["n_values"])
    assert [it["index"] for it in info["items"]] == [0, 1, 2, 3]


def test_inspect_still_reads_checkpoints_and_refuses_anything_else(capsys, tmp_path):
    rc, out, err = _run(capsys, "inspect", CKPT)
    assert rc == 0 and out.startswith(f"checkpoint  {CKPT}"), err
    junk = tmp_path / "x.bin"
    junk.write_bytes(b"not ours at all")
    rc, _, err = _run(capsys, "inspect", junk)
    assert rc == 2
    assert f"{junk}: neither an mscn checkpoint nor an .mscn stream" in _error_line(err,
                                                                                   "inspect")


@pytest.mark.parametrize("argv", [["modalities"], ["inspect", CKPT], ["--help"]])
def test_a_closed_stdout_pipe_exits_quietly(argv):
    child = _child(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader is gone before the first byte: `mscn … | head -c 0`
    err = child.stderr.read().decode()
    child.wait(timeout=120)
    assert _lines(err) == [], err
    # 141 = 128 + SIGPIPE; argparse itself ignores a failed write of --help (then 0)
    assert child.returncode in ((0, 141) if argv == ["--help"] else (141,))


def test_a_pipe_into_head_shows_no_traceback():
    cmd = f"{sys.executable} -m mscn_core modalities | head -c 1"
    done = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and len(done.stdout) == 1
    assert _lines(done.stderr) == [], done.stderr


def test_version_without_importing_torch():
    code = ("import sys\nfrom mscn_core.cli import main\ntry:\n    main(['--version'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    version, imported = done.stdout.splitlines()
    assert version.startswith(f"mscn {importlib.metadata.version('mscn')} (torch ")
    assert imported == "False"
    done = subprocess.run([sys.executable, "-m", "mscn_core", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == version + "\n"


def test_corrupted_data_chunk_is_one_line_naming_file_and_variable(capsys, tmp_path):
    """A NetCDF whose compressed chunk of ``t`` is overwritten (the HDF5 header intact):
    the library's ``RuntimeError: NetCDF: HDF error`` becomes one line, before any fit."""
    import random

    bad = tmp_path / "corrupt.nc"
    data = bytearray(ERA5.read_bytes())
    at = int(0.3 * len(data))  # inside the chunks of t (measured: 0.3 and 0.5 both are)
    data[at:at + 4096] = random.Random(0).randbytes(4096)
    bad.write_bytes(bytes(data))
    out = tmp_path / "recon.nc"
    code, _, err = _run(capsys, "fit", bad, "--checkpoint", CKPT, *SEL, "-o", out)
    assert code == 2, err
    line = _error_line(err, "fit")
    assert str(bad) in line and "cannot read variable t" in line and "corrupted" in line
    assert not out.exists() and not _temps(tmp_path)
