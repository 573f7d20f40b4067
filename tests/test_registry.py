"""Modality discovery through the ``mscn.modalities`` entry points, with real third-party
distributions built and pip-installed into this environment for the session.

Three distributions: a working toy modality, one whose module fails to import, and one
whose object breaks the contract. Discovery runs in child processes, so the entry points
installed after this interpreter started are seen (importlib.metadata finders cache).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOY_DIST, TOY_VERSION = "mscn-toy-plugin", "0.3.1"
BROKEN_DIST, BROKEN_VERSION = "mscn-broken-plugin", "0.0.1"
BAD_DIST, BAD_VERSION = "mscn-badcontract-plugin", "0.0.2"
IMPORT_ERROR = "mscn_broken_plugin needs the frobnicator library"

TOY_MODULE = '''
"""A third-party modality: 1-D signals on [-1, 1], stored as text files of values."""
from pathlib import Path

import torch

from mscn_core.modality import Modality
from mscn_core.signals import Signal


class ToyModality(Modality):
    name = "toy"
    description = "toy 1-D test signals"
    in_dim = 1
    out_dim = 1
    file_extensions = (".toy",)

    def read(self, path, **options):
        return [[float(v) for v in Path(path).read_text().split()]]

    def to_signal(self, item, resolution=None):
        x = torch.linspace(-1, 1, len(item))[:, None]
        return Signal(x, torch.tensor(item)[:, None], meta={"n": len(item)})

    def metrics(self, signal, pred):
        return {"mse": float(((pred - signal.targets) ** 2).mean())}

    def reconstruct(self, meta, predict, resolution=None):
        return predict(torch.linspace(-1, 1, resolution or meta["n"])[:, None])[:, 0].tolist()

    def save(self, artifact, path, overwrite=False):
        Path(path).write_text(" ".join(map(str, artifact)))

    def view(self, truth, recon, path, stats):
        return None
'''

BROKEN_MODULE = f'''
raise ImportError("{IMPORT_ERROR}")
'''

BAD_MODULE = '''
class BadModality:
    """Declares itself but has no dimensions worth the name and none of the methods."""
    name = "badcontract"
    description = "breaks the plugin contract"
    in_dim = 0
    out_dim = 1
'''


def _write_dist(root: Path, dist: str, version: str, module: str, source: str,
                entry: str) -> Path:
    d = root / dist
    d.mkdir()
    (d / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "{version}"
        description = "test plugin for mscn"

        [project.entry-points."mscn.modalities"]
        {entry}

        [tool.setuptools]
        py-modules = ["{module}"]
        '''))
    (d / f"{module}.py").write_text(source)
    return d


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def plugins(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin_dists")
    dirs = [
        _write_dist(root, TOY_DIST, TOY_VERSION, "mscn_toy_plugin", TOY_MODULE,
                    'toy = "mscn_toy_plugin:ToyModality"'),
        _write_dist(root, BROKEN_DIST, BROKEN_VERSION, "mscn_broken_plugin", BROKEN_MODULE,
                    'broken = "mscn_broken_plugin:BrokenModality"'),
        _write_dist(root, BAD_DIST, BAD_VERSION, "mscn_bad_plugin", BAD_MODULE,
                    'badcontract = "mscn_bad_plugin:BadModality"'),
    ]
    done = _pip("install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                *map(str, dirs))
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        yield dirs
    finally:
        _pip("uninstall", "-y", "-q", TOY_DIST, BROKEN_DIST, BAD_DIST)


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def _child_json(code: str):
    out = _child(code)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_list_modalities_reports_good_and_broken_plugins(plugins):
    rows = _child_json('''
        import dataclasses, json
        from mscn_core.registry import list_modalities, modality_names
        rows = {r.name: dataclasses.asdict(r) for r in list_modalities()}
        print(json.dumps({"rows": rows, "names": modality_names()}))
        ''')
    names, rows = rows["names"], rows["rows"]
    assert {"toy", "broken", "badcontract", "sphere"} <= set(names)

    toy = rows["toy"]
    assert toy["status"] == "ok", toy
    assert toy["distribution"] == TOY_DIST and toy["version"] == TOY_VERSION
    assert (toy["in_dim"], toy["out_dim"]) == (1, 1)
    assert toy["description"] == "toy 1-D test signals"
    assert toy["entry_point"] == "mscn_toy_plugin:ToyModality"

    broken = rows["broken"]
    assert broken["status"] == "error"
    assert broken["distribution"] == BROKEN_DIST and broken["version"] == BROKEN_VERSION
    assert "ImportError" in broken["error"] and IMPORT_ERROR in broken["error"]

    bad = rows["badcontract"]
    assert bad["status"] == "error" and bad["distribution"] == BAD_DIST
    assert "breaks the contract" in bad["error"]
    assert "in_dim must be a positive int" in bad["error"]
    assert "missing method to_signal()" in bad["error"]

    sphere = rows["sphere"]  # a broken neighbour never takes a built-in down
    assert sphere["status"] == "ok" and sphere["distribution"] == "mscn"
    assert (sphere["in_dim"], sphere["out_dim"]) == (3, 1)


def test_get_modality_and_guessing_skip_broken_plugins(plugins, tmp_path):
    sample = tmp_path / "wave.toy"
    sample.write_text("0.1 0.5 0.9 0.5 0.1")
    out = _child_json(f'''
        import json
        from mscn_core.registry import ModalityError, get_modality, guess_modality
        toy = get_modality("toy")
        sig = toy.to_signal(toy.read({str(sample)!r})[0])
        res = {{"type": type(toy).__name__, "dims": [toy.in_dim, toy.out_dim],
               "points": sig.n_points, "guess": guess_modality({str(sample)!r})}}
        for name in ("broken", "badcontract", "no-such-modality"):
            try:
                get_modality(name)
                res[name] = None
            except ModalityError as err:
                res[name] = str(err)
        print(json.dumps(res))
        ''')
    assert out["type"] == "ToyModality" and out["dims"] == [1, 1] and out["points"] == 5
    assert out["guess"] == "toy"
    assert out["broken"] and "'broken'" in out["broken"] and BROKEN_DIST in out["broken"]
    assert IMPORT_ERROR in out["broken"]
    assert out["badcontract"] and "'badcontract'" in out["badcontract"]
    assert "contract" in out["badcontract"]
    assert out["no-such-modality"] and "unknown modality" in out["no-such-modality"]
    assert "toy" in out["no-such-modality"]  # lists what is installed


def test_mscn_modalities_cli_lists_them(plugins):
    out = subprocess.run([sys.executable, "-m", "mscn_core.cli", "modalities"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = lines[0].lower()
    for col in ("name", "distribution", "version", "status", "description"):
        assert col in header
    rows = {ln.split()[0]: ln for ln in lines[1:] if ln.strip()}
    assert {"toy", "broken", "badcontract", "sphere"} <= set(rows)
    toy = rows["toy"]
    assert TOY_DIST in toy and TOY_VERSION in toy and " ok " in toy
    assert "1→1" in toy and "toy 1-D test signals" in toy
    assert BROKEN_DIST in rows["broken"] and " error " in rows["broken"]
    assert IMPORT_ERROR in rows["broken"]
    assert " error " in rows["badcontract"] and "contract" in rows["badcontract"]
    assert " ok " in rows["sphere"]
