"""Folder outputs (nerf scenes): ``--overwrite`` replaces only a folder mscn wrote.

Every folder :func:`mscn_core.atomic.write_folder_atomic` completes carries the
``.mscn-output`` marker; a folder without it (a user's) is refused and never removed,
and a failure half-way leaves the old folder as it was. The real nerf plugin, the shipped
checkpoint and a vendored held-out scene, read at 32×32 with no orbit (fast).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from clirun import mscn, ok, refused

from mscn_core import atomic
from mscn_core.atomic import MARKER, is_mscn_output, write_folder_atomic
from mscn_datasets import scenes
from mscn_plugins.nerf import NerfModality

JEEP = Path(scenes.__file__).resolve().parent / "data" / "scenes" / "test" / "jeep1"
CKPT = Path(__file__).resolve().parents[1] / "plugins" / "checkpoints" / "nerf_scenes.safetensors"
FIT = ["fit", JEEP, "--checkpoint", CKPT, "--size", "32"]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative name → bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _only(parent: Path, *names: str) -> None:
    """``parent`` holds exactly ``names``: no temp folders (new or old) left behind."""
    assert sorted(os.listdir(parent)) == sorted(names)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A scene folder mscn wrote (no orbit)."""
    out = tmp_path_factory.mktemp("written") / "views"
    ok(mscn(*FIT, "--orbit-views", "0", "-o", out))
    return out


def test_overwrite_replaces_a_folder_mscn_wrote(written, tmp_path):
    out = tmp_path / "views"
    ok(mscn(*FIT, "--orbit-views", "0", "-o", out))
    assert is_mscn_output(out) and not (out / "orbit").exists()
    mark = json.loads((out / MARKER).read_text())
    assert mark["written_by"].startswith("mscn ") and len(mark["checkpoint_sha256"]) == 64
    # without --overwrite: refused, untouched
    line = refused(mscn(*FIT, "--orbit-views", "0", "-o", out))
    assert str(out) in line and "--overwrite" in line
    # with it: the new folder (now with an orbit) replaces the old one, marker and all
    ok(mscn(*FIT, "--orbit-views", "2", "-o", out, "--overwrite"))
    assert len(scenes.read_srn(out).orbit) == 2 and is_mscn_output(out)
    assert json.loads((out / MARKER).read_text())["command"].endswith("--overwrite")
    _only(tmp_path, "views")


def test_a_users_folder_is_refused_even_with_overwrite_and_left_untouched(tmp_path):
    mine = tmp_path / "mine"
    (mine / "rgb").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    (mine / "rgb" / "000000.png").write_bytes(b"not really a png")
    before = _tree(mine)
    line = refused(mscn(*FIT, "--orbit-views", "0", "-o", mine, "--overwrite"))
    assert str(mine) in line and "not written by mscn" in line and MARKER in line
    assert _tree(mine) == before
    _only(tmp_path, "mine")
    # the plugin's writer refuses it too (not only the CLI's early check)
    with pytest.raises(FileExistsError, match="not written by mscn"):
        write_folder_atomic(mine, lambda root: None, overwrite=True)
    assert _tree(mine) == before
    _only(tmp_path, "mine")


def test_a_failure_half_way_leaves_the_old_folder_intact(written, tmp_path, monkeypatch):
    out = tmp_path / "views"
    ok(mscn(*FIT, "--orbit-views", "0", "-o", out))
    before = _tree(out)
    scene = scenes.read_srn(written)

    def half_then_fail(s, root):  # writes some of the new folder, then fails
        (root / "rgb").mkdir()
        (root / "rgb" / "000000.png").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scenes, "fill_srn", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        NerfModality().save([scene], out, overwrite=True)
    assert _tree(out) == before
    _only(tmp_path, "views")
    monkeypatch.undo()

    # a failure at the swap itself (new → target): the old folder is renamed back
    real_rename, failed = os.rename, []

    def rename(src, dst):  # the first rename onto the target fails; the restore works
        if Path(dst) == out and not failed:
            failed.append(src)
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="Input/output"):
        NerfModality().save([scene], out, overwrite=True)
    monkeypatch.undo()
    assert failed and _tree(out) == before
    _only(tmp_path, "views")
    # and then it works
    NerfModality().save([scene], out, overwrite=True)
    assert is_mscn_output(out) and _tree(out).keys() == before.keys()
    _only(tmp_path, "views")


def test_a_folder_only_carries_the_marker_once_complete(tmp_path):
    out = tmp_path / "f"
    seen = []

    def fill(root: Path) -> None:
        (root / "a.txt").write_text("a")
        seen.append((root / MARKER).exists())

    write_folder_atomic(out, fill, marker={"checkpoint_sha256": "ab" * 32})
    assert seen == [False] and is_mscn_output(out)
    assert json.loads((out / MARKER).read_text())["checkpoint_sha256"] == "ab" * 32
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        write_folder_atomic(out, fill)
    (tmp_path / "link").symlink_to(out)  # a link to a marked folder is not the folder
    assert not is_mscn_output(tmp_path / "link")
