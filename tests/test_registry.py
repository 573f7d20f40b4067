"""Modality discovery through the ``mscn.modalities`` entry points, with real third-party
distributions built and pip-installed into this environment for this module.

Distributions (all named ``mscn-…-plugin``, never registering another engineer's names):

* ``mscn-toy-plugin``: a working contract-v2 modality with typed options and a viewer;
* ``mscn-broken-plugin``: its module raises ImportError;
* ``mscn-badcontract-plugin``: a v2 object missing members, and one whose options class
  cannot be built from its defaults;
* ``mscn-exit-plugin``: its module raises ``SystemExit(3)`` at import;
* ``mscn-v1-plugin``: a contract-v1 duck-typed class and a class declaring contract v3;
* ``mscn-wrongtype-plugin``: entry points resolving to a string and to a function;
* ``mscn-shadow-plugin``: a working modality registering the built-in's name ``sphere``;
* ``mscn-duck-plugin``: a duck-typed v2 modality with only the required members;
* ``mscn-late-plugin``: built but installed only inside one child, to test ``refresh()``.

All are installed in one pip call and uninstalled in one ``finally`` when this module's
tests are done (module scope keeps the window short in which other engineers' concurrent
tests see the ``sphere`` name conflict). Discovery runs in child processes: the entry
points installed after this interpreter started are seen (importlib.metadata caches).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOY_DIST, TOY_VERSION = "mscn-toy-plugin", "0.3.1"
BROKEN_DIST, BROKEN_VERSION = "mscn-broken-plugin", "0.0.1"
BAD_DIST, BAD_VERSION = "mscn-badcontract-plugin", "0.0.2"
EXIT_DIST = "mscn-exit-plugin"
V1_DIST = "mscn-v1-plugin"
WRONG_DIST = "mscn-wrongtype-plugin"
SHADOW_DIST = "mscn-shadow-plugin"
DUCK_DIST = "mscn-duck-plugin"
LATE_DIST = "mscn-late-plugin"
INSTALLED = [TOY_DIST, BROKEN_DIST, BAD_DIST, EXIT_DIST, V1_DIST, WRONG_DIST, SHADOW_DIST,
             DUCK_DIST]
IMPORT_ERROR = "mscn_broken_plugin needs the frobnicator library"
SHADOW_DESCRIPTION = "a third party's sphere, shadowing the built-in"
# While the shadow plugin is installed every discovery warns about the name conflict; the
# CLI error tests ignore exactly that warning to check the error itself is one line.
CONFLICT_WARNING = "modality 'sphere' is registered by several distributions"
IMPORT_LOG = "MSCN_TEST_IMPORT_LOG"  # plugin modules append their name here at import

LOG_IMPORT = f'''
import os as _os
if _os.environ.get("{IMPORT_LOG}"):
    with open(_os.environ["{IMPORT_LOG}"], "a") as _f:
        _f.write(__name__ + "\\n")
'''

TOY_MODULE = LOG_IMPORT + '''
"""A third-party modality: 1-D signals on [-1, 1], stored as text files of values."""
from dataclasses import dataclass
from pathlib import Path

import torch

from mscn_core.modality import Modality
from mscn_core.signals import Signal

INSTANCES = 0


@dataclass
class ToyOptions:
    scale: float = 1.0  # multiply values by this


class ToyModality(Modality):
    name = "toy"
    description = "toy 1-D test signals"
    in_dim = 1
    out_dim = 1
    file_extensions = (".toy",)
    options = ToyOptions

    def __init__(self):
        global INSTANCES
        INSTANCES += 1

    def read(self, path, options=None):
        scale = options.scale if options is not None else 1.0
        return [[scale * float(v) for v in line.split()]
                for line in Path(path).read_text().splitlines() if line.strip()]

    def to_signal(self, item, options=None):
        x = torch.linspace(-1, 1, len(item))[:, None]
        return Signal(x, torch.tensor(item)[:, None], meta={"n": len(item)})

    def metrics(self, signal, pred):
        return {"mse": float(((pred - signal.targets) ** 2).mean())}

    def reconstruct(self, meta, predict, options=None, template=None):
        with torch.no_grad():
            return predict(torch.linspace(-1, 1, meta["n"])[:, None])[:, 0].tolist()

    def save(self, artifacts, path, overwrite=False, provenance=None):
        if Path(path).exists() and not overwrite:
            raise FileExistsError(f"{path} exists")
        Path(path).write_text("".join(" ".join(map(str, a)) + "\\n" for a in artifacts))
        return path

    def view(self, truth, recon, path, options=None, overwrite=False):
        Path(path).write_text(f"{len(truth)} {len(recon)}")
        return path
'''

BROKEN_MODULE = LOG_IMPORT + f'''
raise ImportError("{IMPORT_ERROR}")
'''

BAD_MODULE = '''
from dataclasses import dataclass

from mscn_core.modality import Modality


class BadModality:
    """Declares contract v2 but has no dimensions worth the name and none of the methods."""
    contract_version = 2
    name = "badcontract"
    description = "breaks the plugin contract"
    in_dim = 0
    out_dim = 1


@dataclass
class NoDefaults:
    var: str  # which variable (but no default: the CLI cannot offer it as a flag)


class BadOptionsModality(Modality):
    name = "badoptions"
    description = "options without defaults"
    in_dim = 1
    out_dim = 1
    options = NoDefaults
    read = to_signal = metrics = reconstruct = save = lambda self, *a, **k: None
'''

EXIT_MODULE = '''
raise SystemExit(3)
'''

V1_MODULE = '''
"""One modality written for plugin contract v1, one for a future contract v3."""
from mscn_core.modality import Modality


class OldModality:
    """Contract v1: duck-typed, no contract_version, v1 signatures."""
    name = "oldstyle"
    description = "written for contract v1"
    in_dim = 2
    out_dim = 1

    def read(self, path, **options):
        return []

    def to_signal(self, item, resolution=None):
        raise NotImplementedError

    def objective(self, params, signal):
        raise NotImplementedError

    def metrics(self, signal, pred):
        return {}

    def reconstruct(self, meta, predict, resolution=None):
        raise NotImplementedError

    def save(self, artifact, path, overwrite=False):
        raise NotImplementedError


class FutureModality(Modality):
    contract_version = 3
    name = "future"
    description = "written for contract v3"
    in_dim = 2
    out_dim = 1

    def read(self, path, options=None):
        return []
'''

WRONGTYPE_MODULE = '''
NAME = "not a modality"


def make():
    return None
'''

SHADOW_MODULE = f'''
from dataclasses import dataclass

from mscn_core.modality import Modality


@dataclass
class ShadowOptions:
    shade: int = 1  # how dark the shadow is


class ShadowSphere(Modality):
    name = "sphere"
    description = "{SHADOW_DESCRIPTION}"
    in_dim = 3
    out_dim = 1
    file_extensions = (".shadow",)
    options = ShadowOptions

    def read(self, path, options=None):
        return []

    def to_signal(self, item, options=None):
        raise NotImplementedError

    def metrics(self, signal, pred):
        return {{}}

    def reconstruct(self, meta, predict, options=None, template=None):
        raise NotImplementedError

    def save(self, artifacts, path, overwrite=False, provenance=None):
        raise NotImplementedError
'''

DUCK_MODULE = '''
"""Contract v2 without subclassing: the declared version and the required members only."""
import torch

from mscn_core.signals import Signal


class DuckModality:
    contract_version = 2
    name = "ducky"
    description = "duck-typed v2 modality"
    in_dim = 2
    out_dim = 3

    def read(self, path, options=None):
        return [10]

    def to_signal(self, item, options=None):
        coords = torch.linspace(0, 1, 2 * item).reshape(item, 2)
        targets = torch.arange(3 * item, dtype=torch.float32).reshape(item, 3)
        mask = torch.arange(item) < 4  # only the first four points are valid
        return Signal(coords, targets, mask=mask, meta={"n": item})

    def metrics(self, signal, pred):
        return {"mse": float(((pred - signal.targets) ** 2).mean())}

    def reconstruct(self, meta, predict, options=None, template=None):
        return predict(torch.zeros(meta["n"], 2))

    def save(self, artifacts, path, overwrite=False, provenance=None):
        return path
'''

LATE_MODULE = '''
from mscn_core.modality import Modality


class LateModality(Modality):
    name = "late"
    description = "installed after discovery"
    in_dim = 1
    out_dim = 1
    read = to_signal = metrics = reconstruct = save = lambda self, *a, **k: None
'''


def _write_dist(root: Path, dist: str, version: str, module: str, source: str,
                entries: dict[str, str]) -> Path:
    d = root / dist
    d.mkdir()
    eps = "\n".join(f'{name} = "{target}"' for name, target in entries.items())
    (d / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{dist}"\nversion = "{version}"\n'
        'description = "test plugin for mscn"\n\n'
        f'[project.entry-points."mscn.modalities"]\n{eps}\n\n'
        f'[tool.setuptools]\npy-modules = ["{module}"]\n')
    (d / f"{module}.py").write_text(source)
    return d


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=300)


def _pip_install(*dirs: Path) -> subprocess.CompletedProcess:
    return _pip("install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                *map(str, dirs))


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin_dists")
    dirs = [
        _write_dist(root, TOY_DIST, TOY_VERSION, "mscn_toy_plugin", TOY_MODULE,
                    {"toy": "mscn_toy_plugin:ToyModality"}),
        _write_dist(root, BROKEN_DIST, BROKEN_VERSION, "mscn_broken_plugin", BROKEN_MODULE,
                    {"broken": "mscn_broken_plugin:BrokenModality"}),
        _write_dist(root, BAD_DIST, BAD_VERSION, "mscn_bad_plugin", BAD_MODULE,
                    {"badcontract": "mscn_bad_plugin:BadModality",
                     "badoptions": "mscn_bad_plugin:BadOptionsModality"}),
        _write_dist(root, EXIT_DIST, "1.0", "mscn_exit_plugin", EXIT_MODULE,
                    {"exiting": "mscn_exit_plugin:ExitModality"}),
        _write_dist(root, V1_DIST, "1.0", "mscn_v1_plugin", V1_MODULE,
                    {"oldstyle": "mscn_v1_plugin:OldModality",
                     "future": "mscn_v1_plugin:FutureModality"}),
        _write_dist(root, WRONG_DIST, "1.0", "mscn_wrongtype_plugin", WRONGTYPE_MODULE,
                    {"strname": "mscn_wrongtype_plugin:NAME",
                     "nonefactory": "mscn_wrongtype_plugin:make"}),
        _write_dist(root, SHADOW_DIST, "2.0", "mscn_shadow_plugin", SHADOW_MODULE,
                    {"sphere": "mscn_shadow_plugin:ShadowSphere"}),
        _write_dist(root, DUCK_DIST, "1.0", "mscn_duck_plugin", DUCK_MODULE,
                    {"ducky": "mscn_duck_plugin:DuckModality"}),
    ]
    late = _write_dist(root, LATE_DIST, "1.0", "mscn_late_plugin", LATE_MODULE,
                       {"late": "mscn_late_plugin:LateModality"})
    try:
        done = _pip_install(*dirs)
        assert done.returncode == 0, done.stdout + done.stderr
        yield {"late": late}
    finally:  # always: other engineers' tests share this environment
        _pip("uninstall", "-y", "-q", *INSTALLED, LATE_DIST)


def _child(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def _child_json(code: str, env: dict | None = None):
    out = _child(code, env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mscn_core.cli", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def listing(plugins):
    """``list_modalities()`` rows (duplicates kept), names, and the warnings it raised."""
    return _child_json('''
        import dataclasses, json, warnings
        from mscn_core import registry
        names = registry.modality_names()
        registry.refresh()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = [dataclasses.asdict(r) for r in registry.list_modalities()]
        print(json.dumps({"rows": rows, "names": names,
                          "warnings": [f"{w.category.__name__}: {w.message}"
                                       for w in caught]}))
        ''')


@pytest.fixture(scope="module")
def cli_listing(plugins):
    out = _cli("modalities")
    lines = out.stdout.splitlines()
    return out, lines[0], [ln for ln in lines[1:] if ln.strip()]


def _rows(listing, name: str) -> list[dict]:
    return [r for r in listing["rows"] if r["name"] == name]


def _row(listing, name: str) -> dict:
    (row,) = _rows(listing, name)
    return row


def _cli_rows(cli_listing, name: str) -> list[str]:
    return [ln for ln in cli_listing[2] if ln.split()[0] == name]


# -- listing ---------------------------------------------------------------------------


def test_list_modalities_reports_good_and_broken_plugins(listing):
    names = listing["names"]
    assert {"toy", "broken", "badcontract", "sphere", "exiting", "oldstyle", "future",
            "strname", "nonefactory", "ducky"} <= set(names)
    assert names == sorted(set(names))  # one entry per name, even when shadowed

    toy = _row(listing, "toy")
    assert toy["status"] == "ok", toy
    assert toy["distribution"] == TOY_DIST and toy["version"] == TOY_VERSION
    assert (toy["in_dim"], toy["out_dim"]) == (1, 1)
    assert toy["description"] == "toy 1-D test signals"
    assert toy["entry_point"] == "mscn_toy_plugin:ToyModality"
    assert toy["contract_version"] == 2 and toy["options"] == ["scale"] and toy["viewer"]
    assert toy["note"] == ""

    broken = _row(listing, "broken")
    assert broken["status"] == "error"
    assert broken["distribution"] == BROKEN_DIST and broken["version"] == BROKEN_VERSION
    assert "ImportError" in broken["error"] and IMPORT_ERROR in broken["error"]

    bad = _row(listing, "badcontract")
    assert bad["status"] == "error" and bad["distribution"] == BAD_DIST
    assert "breaks the contract" in bad["error"]
    assert "in_dim must be a positive int" in bad["error"]
    assert "missing method to_signal()" in bad["error"]

    sphere = [r for r in _rows(listing, "sphere") if r["distribution"] == "mscn"]
    assert len(sphere) == 1  # broken neighbours never take a built-in down
    assert sphere[0]["status"] == "ok"
    assert (sphere[0]["in_dim"], sphere[0]["out_dim"]) == (3, 1)


def test_options_without_defaults_are_an_error_not_a_crash(listing):
    row = _row(listing, "badoptions")
    assert row["status"] == "error" and row["distribution"] == BAD_DIST
    assert "NoDefaults" in row["error"] and "default" in row["error"]


def test_systemexit_at_import_is_isolated(listing, cli_listing):
    row = _row(listing, "exiting")
    assert row["status"] == "error" and row["distribution"] == EXIT_DIST
    assert row["error"].startswith("SystemExit") and "3" in row["error"]

    out, _, _ = cli_listing
    assert out.returncode == 0, out.stderr
    (line,) = _cli_rows(cli_listing, "exiting")
    assert EXIT_DIST in line and " error " in line and "SystemExit" in line
    assert " ok " in _cli_rows(cli_listing, "toy")[0]
    assert any(" ok " in ln and " mscn " in ln for ln in _cli_rows(cli_listing, "sphere"))


def test_other_contract_versions_are_refused_with_a_reason(listing, cli_listing):
    old, future = _row(listing, "oldstyle"), _row(listing, "future")
    for row in (old, future):
        assert row["status"] == "error" and row["distribution"] == V1_DIST
        assert "this mscn speaks contract v2" in row["error"]
        assert row["in_dim"] is None and row["contract_version"] is None
    assert "written for v1" in old["error"] and "no contract_version" in old["error"]
    assert "contract v3" in future["error"]
    for name in ("oldstyle", "future"):
        (line,) = _cli_rows(cli_listing, name)
        assert " error " in line and "speaks contract v2" in line


def test_entry_points_that_are_not_modalities(listing, cli_listing):
    strname, factory = _row(listing, "strname"), _row(listing, "nonefactory")
    assert strname["status"] == factory["status"] == "error"
    assert strname["distribution"] == factory["distribution"] == WRONG_DIST
    assert "str" in strname["error"] and "not a modality" in strname["error"]
    assert "function" in factory["error"] and "not a modality" in factory["error"]
    for name in ("strname", "nonefactory"):
        (line,) = _cli_rows(cli_listing, name)
        assert " error " in line and "not a modality" in line


def test_mscn_modalities_cli_lists_them(cli_listing):
    out, header, _ = cli_listing
    assert out.returncode == 0, out.stderr
    for col in ("name", "distribution", "version", "status", "description"):
        assert col in header.lower()
    (toy,) = _cli_rows(cli_listing, "toy")
    assert TOY_DIST in toy and TOY_VERSION in toy and " ok " in toy
    assert "1→1" in toy and "toy 1-D test signals" in toy and "viewer" in toy
    (broken,) = _cli_rows(cli_listing, "broken")
    assert BROKEN_DIST in broken and " error " in broken and IMPORT_ERROR in broken
    (bad,) = _cli_rows(cli_listing, "badcontract")
    assert " error " in bad and "contract" in bad
    (ducky,) = _cli_rows(cli_listing, "ducky")
    assert DUCK_DIST in ducky and " ok " in ducky and "2→3" in ducky


# -- a third party registering the built-in's name --------------------------------------


def test_shadowed_builtin_is_listed_twice_with_a_warning(listing, cli_listing):
    rows = {r["distribution"]: r for r in _rows(listing, "sphere")}
    assert set(rows) == {"mscn", SHADOW_DIST}
    assert rows["mscn"]["status"] == rows[SHADOW_DIST]["status"] == "ok"
    assert rows[SHADOW_DIST]["description"] == SHADOW_DESCRIPTION
    assert rows[SHADOW_DIST]["options"] == ["shade"]
    assert SHADOW_DIST in rows["mscn"]["note"] and "used by default" in rows["mscn"]["note"]
    assert "mscn" in rows[SHADOW_DIST]["note"]
    assert f"--modality {SHADOW_DIST}:sphere" in rows[SHADOW_DIST]["note"]

    conflict = [w for w in listing["warnings"] if "'sphere'" in w]
    assert len(conflict) == 1, listing["warnings"]
    assert conflict[0].startswith("UserWarning") and SHADOW_DIST in conflict[0]
    assert "built-in is used" in conflict[0]

    out, _, _ = cli_listing
    lines = _cli_rows(cli_listing, "sphere")
    assert len(lines) == 2
    builtin = next(ln for ln in lines if ln.split()[1] == "mscn")
    shadow = next(ln for ln in lines if ln.split()[1] == SHADOW_DIST)
    assert "used by default" in builtin and SHADOW_DIST in builtin
    assert SHADOW_DESCRIPTION in shadow and f"{SHADOW_DIST}:sphere" in shadow
    assert CONFLICT_WARNING in out.stderr  # the user is told too


def test_builtin_wins_unless_the_user_picks_the_shadow(plugins):
    out = _child_json(f'''
        import contextlib, io, json, warnings
        warnings.filterwarnings("ignore", message="{CONFLICT_WARNING}")
        from mscn_core import cli
        from mscn_core.registry import ModalityError, get_modality
        res = {{"default": type(get_modality("sphere")).__name__,
               "picked": type(get_modality("{SHADOW_DIST}:sphere")).__name__,
               "picked_desc": get_modality("{SHADOW_DIST}:sphere").description,
               "underscored": type(get_modality("mscn_shadow_plugin:sphere")).__name__,
               "builtin": type(get_modality("mscn:sphere")).__name__}}
        try:
            get_modality("mscn-nosuch-plugin:sphere")
        except ModalityError as err:
            res["nosuch"] = str(err)
        argv = ["fit", "f.nc", "--modality", "{SHADOW_DIST}:sphere", "--checkpoint",
                "missing.safetensors", "-o", "out.nc"]
        m = cli.resolve_modality(argv)
        res["resolved"] = type(m).__name__
        args = cli.build_parser(m).parse_args(argv + ["--shade", "3"])
        res["shade"] = vars(args)["opt.shade"]
        help_out = io.StringIO()
        with contextlib.redirect_stdout(help_out), contextlib.suppress(SystemExit):
            cli.main(argv + ["--help"])
        res["help"] = help_out.getvalue()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            res["rc"] = cli.main(argv + ["--shade", "3"])
        res["stderr"] = err.getvalue()
        print(json.dumps(res))
        ''')
    assert out["default"] == out["builtin"] == "SphereModality"
    assert out["picked"] == out["underscored"] == out["resolved"] == "ShadowSphere"
    assert out["picked_desc"] == SHADOW_DESCRIPTION
    assert "mscn-nosuch-plugin" in out["nosuch"] and SHADOW_DIST in out["nosuch"]
    assert out["shade"] == 3
    assert "--shade" in out["help"] and "how dark the shadow is" in out["help"]
    assert "--var" not in out["help"]  # the built-in sphere's options are not offered
    # resolved and parsed: the command only fails on the (missing) checkpoint
    assert out["rc"] == 2 and "missing.safetensors" in out["stderr"], out["stderr"]
    assert "modality" not in out["stderr"]


# -- using plugins ----------------------------------------------------------------------


def test_get_modality_and_guessing_skip_broken_plugins(plugins, tmp_path):
    sample = tmp_path / "wave.toy"
    sample.write_text("0.1 0.5 0.9 0.5 0.1\n")
    out = _child_json(f'''
        import json
        from mscn_core.registry import ModalityError, get_modality, guess_modality
        toy = get_modality("toy")
        sig = toy.to_signal(toy.read({str(sample)!r})[0])
        scaled = toy.read({str(sample)!r}, toy.options(scale=2.0))[0]
        res = {{"type": type(toy).__name__, "dims": [toy.in_dim, toy.out_dim],
               "points": sig.n_points, "scaled": scaled,
               "guess": guess_modality({str(sample)!r})}}
        for name in ("broken", "badcontract", "exiting", "oldstyle", "strname",
                     "no-such-modality"):
            try:
                get_modality(name)
                res[name] = None
            except ModalityError as err:
                res[name] = str(err)
        print(json.dumps(res))
        ''')
    assert out["type"] == "ToyModality" and out["dims"] == [1, 1] and out["points"] == 5
    assert out["scaled"] == pytest.approx([0.2, 1.0, 1.8, 1.0, 0.2])
    assert out["guess"] == "toy"
    assert out["broken"] and "'broken'" in out["broken"] and BROKEN_DIST in out["broken"]
    assert IMPORT_ERROR in out["broken"]
    assert out["badcontract"] and "'badcontract'" in out["badcontract"]
    assert "contract" in out["badcontract"]
    assert out["exiting"] and EXIT_DIST in out["exiting"] and "SystemExit" in out["exiting"]
    assert out["oldstyle"] and "v1" in out["oldstyle"] and "v2" in out["oldstyle"]
    assert out["strname"] and "not a modality" in out["strname"]
    assert out["no-such-modality"] and "unknown modality" in out["no-such-modality"]
    assert "toy" in out["no-such-modality"]  # lists what is installed


def test_toy_plugin_runs_meta_train_and_fit_through_the_cli(plugins, tmp_path):
    """The v2 signatures are the ones the core calls: options as flags (--scale), read,
    to_signal, the default sampler/objective, reconstruct with a template, save."""
    data, ckpt, recon = tmp_path / "waves.toy", tmp_path / "toy.safetensors", tmp_path / "r.toy"
    data.write_text("".join(" ".join(f"{(i + j) % 5 / 10:.1f}" for j in range(16)) + "\n"
                            for i in range(4)))
    out = _child_json(f"""
        import contextlib, io, json, warnings
        warnings.filterwarnings("ignore", message="{CONFLICT_WARNING}")
        from mscn_core.checkpoint import read_config
        from mscn_core.cli import main
        train = ["meta-train", "--modality", "toy", "--data", {str(data)!r}, "-o",
                 {str(ckpt)!r}, "--scale", "2", "--width", "8", "--depth", "2",
                 "--budget", "4", "--outer-steps", "2", "--batch-size", "2",
                 "--points-per-item", "8", "--val-every", "1", "--val-points", "8",
                 "--progress", "false"]
        fit = ["fit", {str(data)!r}, "--checkpoint", {str(ckpt)!r}, "-o", {str(recon)!r},
               "--scale", "2"]
        res = {{}}
        for key, argv in (("train", train), ("fit", fit)):
            err, stdout = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
                res[key] = [main(argv), err.getvalue()]
        cfg = read_config({str(ckpt)!r})
        res["modality"], res["dims"] = cfg["modality"], [cfg["siren"]["in_dim"],
                                                         cfg["siren"]["out_dim"]]
        res["options"] = cfg["info"].get("options")
        print(json.dumps(res))
        """)
    assert out["train"][0] == 0, out["train"][1]
    assert out["fit"][0] == 0, out["fit"][1]
    assert out["modality"] == "toy" and out["dims"] == [1, 1]
    assert out["options"] == {"scale": 2.0}  # --scale was parsed into its options
    rows = [line.split() for line in recon.read_text().splitlines()]
    assert [len(r) for r in rows] == [16] * 4


def test_duck_typed_v2_plugin_gets_the_optional_members(listing, plugins):
    row = _row(listing, "ducky")
    assert row["status"] == "ok" and row["distribution"] == DUCK_DIST, row
    assert row["contract_version"] == 2 and row["options"] == [] and not row["viewer"]
    out = _child_json('''
        import json
        import torch
        from mscn_core.modality import Modality
        from mscn_core.registry import get_modality
        from mscn_core.signals import sample_batch
        m = get_modality("ducky")
        sig = m.to_signal(m.read("anything")[0])
        coords, targets, weights = m.sample(sig, 64, torch.Generator().manual_seed(0))
        batch = sample_batch(m, [sig, sig], 16, torch.Generator().manual_seed(1))
        zero = lambda pts: torch.zeros(*pts.shape[:-1], 3)
        loss = m.objective(zero, batch)
        expect = (batch.targets ** 2).mean(dim=-1).mean(dim=1)
        print(json.dumps({
            "subclass": isinstance(m, Modality),
            "sample_shapes": [list(coords.shape), list(targets.shape), list(weights.shape)],
            "sampled_rows": sorted({int(t[0]) // 3 for t in targets}),
            "batch": list(batch.coords.shape), "loss_shape": list(loss.shape),
            "loss_ok": bool(torch.allclose(loss, expect)),
            "n_values": m.n_values(sig), "guess": m.guess_can_open("x.bin"),
            "options": m.options, "view": m.view}))
        ''')
    assert not out["subclass"]
    assert out["sample_shapes"] == [[64, 2], [64, 3], [64]]
    assert out["sampled_rows"] == [0, 1, 2, 3]  # the default sampler honours the mask
    assert out["batch"] == [2, 16, 2] and out["loss_shape"] == [2] and out["loss_ok"]
    assert out["n_values"] == 30 and out["guess"] is False
    assert out["options"] is None and out["view"] is None


def test_cli_errors_for_broken_and_unknown_modalities_are_one_line(plugins, tmp_path):
    data = tmp_path / "wave.toy"
    data.write_text("0.1 0.2\n")
    ckpt, out_path = tmp_path / "ck.safetensors", tmp_path / "out.toy"
    env = {"PYTHONWARNINGS": f"ignore:{CONFLICT_WARNING}"}
    fit = ("fit", str(data), "--modality", "broken", "--checkpoint", str(ckpt),
           "-o", str(out_path))
    done = _cli(*fit, env=env)  # the real command line once, the others in one child
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("mscn fit: error: ")
    assert "'broken'" in done.stderr and BROKEN_DIST in done.stderr
    assert IMPORT_ERROR in done.stderr

    runs = _child_json(f'''
        import contextlib, io, json, warnings
        warnings.filterwarnings("ignore", message="{CONFLICT_WARNING}")
        from mscn_core.cli import main
        res = []
        for argv in ({fit[:3] + ("nosuch",) + fit[4:]!r},
                     ("meta-train", "--modality", "broken", "--data", {str(data)!r},
                      "-o", {str(out_path)!r}),
                     ("meta-train", "--modality", "nosuch", "--data", {str(data)!r},
                      "-o", {str(out_path)!r}),
                     ("meta-train", "--modality", "exiting", "--data", {str(data)!r},
                      "-o", {str(out_path)!r})):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(list(argv))
            res.append([rc, err.getvalue()])
        print(json.dumps(res))
        ''')
    (rc1, unknown_fit), (rc2, broken_mt), (rc3, unknown_mt), (rc4, exit_mt) = runs
    assert rc1 == rc2 == rc3 == rc4 == 2
    for err in (unknown_fit, broken_mt, unknown_mt, exit_mt):
        assert err.count("\n") == 1 and err.endswith("\n"), err
    assert unknown_fit.startswith("mscn fit: error: unknown modality 'nosuch'")
    assert broken_mt.startswith("mscn meta-train: error: ")
    assert "'broken'" in broken_mt and BROKEN_DIST in broken_mt and IMPORT_ERROR in broken_mt
    assert unknown_mt.startswith("mscn meta-train: error: unknown modality 'nosuch'")
    for err in (unknown_fit, unknown_mt):  # lists what is installed
        assert "toy" in err and "sphere" in err and "ducky" in err
    assert "'exiting'" in exit_mt and EXIT_DIST in exit_mt and "SystemExit" in exit_mt
    assert not out_path.exists()


@pytest.fixture(scope="module")
def sniffed(plugins, tmp_path_factory):
    """What ``guess_modality`` makes of NetCDF under other names, of HDF5 that is not a
    climate file, and of a ``.toy`` file (one child for all)."""
    tmp = tmp_path_factory.mktemp("sniff")
    (tmp / "wave.toy").write_text("0.1 0.2\n")
    return _child_json(f"""
        import json
        import netCDF4
        import numpy as np
        from mscn_core.registry import ModalityError, get_modality, guess_modality

        def climate(path, fmt):
            with netCDF4.Dataset(path, "w", format=fmt) as ds:
                ds.createDimension("lat", 4)
                ds.createDimension("lon", 8)
                lat = ds.createVariable("lat", "f4", ("lat",))
                lat.units = "degrees_north"
                lat[:] = np.linspace(-67.5, 67.5, 4)
                lon = ds.createVariable("lon", "f4", ("lon",))
                lon.units = "degrees_east"
                lon[:] = np.arange(8) * 45.0
                ds.createVariable("t", "f4", ("lat", "lon"))[:] = np.ones((4, 8))
            return path

        def voxels(path, dims):  # HDF5 (netCDF4 format) holding an 8x8x8 occupancy grid
            with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
                for d in dims:
                    ds.createDimension(d, 8)
                ds.createVariable("voxels", "u1", dims)[:] = np.ones((8, 8, 8))
            return path

        def guess(path):
            try:
                return guess_modality(path)
            except ModalityError as err:
                return "error: " + str(err)

        tmp = {str(tmp)!r}
        # the dimension names h5netcdf gives a dataset written with h5py
        shape = voxels(tmp + "/shape.h5", ("phony_dim_0", "phony_dim_1", "phony_dim_2"))
        xyz = voxels(tmp + "/shape_xyz.h5", ("x", "y", "z"))
        with open(shape, "rb") as f:
            magic = f.read(8)
        sphere = get_modality("sphere")
        print(json.dumps({{
            "magic": magic.hex(),
            "nc4": guess(climate(tmp + "/era.bin", "NETCDF4")),
            "nc3": guess(climate(tmp + "/era3.bin", "NETCDF3_CLASSIC")),
            "voxels": guess(shape), "sphere_voxels": sphere.guess_can_open(shape),
            "xyz": guess(xyz), "sphere_xyz": sphere.guess_can_open(xyz),
            "toy": guess(tmp + "/wave.toy"),
            "as_toy": guess(climate(tmp + "/era.toy", "NETCDF4")),
            "missing": guess(tmp + "/nothing.bin")}}))
        """)


def test_content_sniffing(sniffed):
    """NetCDF is recognised by content whatever its name; HDF5 that is not a climate file
    is not claimed by sphere; extensions still serve plugins without magic."""
    out = sniffed
    assert out["magic"] == b"\x89HDF\r\n\x1a\n".hex()  # a real HDF5 file
    assert out["nc4"] == out["nc3"] == "sphere"
    assert out["sphere_voxels"] is False
    assert out["voxels"] == "voxel", out["voxels"]  # an IM-NET-style grid: the voxel plugin
    assert out["toy"] == "toy"
    # content (sphere) and extension (toy) both claim it: ambiguous, the user decides
    assert out["as_toy"].startswith("error: several modalities can open"), out["as_toy"]
    assert "sphere" in out["as_toy"] and "toy" in out["as_toy"]
    assert out["missing"].startswith("error: no installed modality can open")


def test_content_sniffing_does_not_take_xyz_voxels_for_lat_lon(sniffed):
    assert sniffed["sphere_xyz"] is False
    assert sniffed["xyz"] == "voxel"  # claimed by the voxel plugin only, not ambiguous


# -- caching ----------------------------------------------------------------------------


def test_discovery_is_cached_until_refresh(plugins):
    late = plugins["late"]
    try:
        out = _child_json(f'''
            import json, subprocess, sys, warnings
            warnings.filterwarnings("ignore", message="{CONFLICT_WARNING}")
            from mscn_core import registry
            before = registry.modality_names()
            done = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                                   "--disable-pip-version-check", "--no-deps",
                                   "--no-build-isolation", "--no-index", {str(late)!r}],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
            cached = registry.modality_names()
            registry.refresh()
            after = registry.modality_names()
            late = registry.get_modality("late")
            print(json.dumps({{"before": before, "cached": cached, "after": after,
                              "late": [type(late).__name__, late.description]}}))
            ''')
    finally:
        _pip("uninstall", "-y", "-q", LATE_DIST)
    assert "late" not in out["before"] and "toy" in out["before"]
    assert out["cached"] == out["before"]  # until refresh(), the discovery is cached
    assert set(out["after"]) == set(out["before"]) | {"late"}
    assert out["late"] == ["LateModality", "installed after discovery"]


def test_each_plugin_is_imported_once(plugins, tmp_path):
    log = tmp_path / "imports.log"
    log.touch()
    out = _child_json(f'''
        import json, sys, warnings
        warnings.filterwarnings("ignore", message="{CONFLICT_WARNING}")
        from mscn_core.registry import ModalityError, get_modality, list_modalities
        from mscn_core.registry import modality_names

        def imports():
            with open({str(log)!r}) as f:
                return f.read().split()

        res = {{"names": "toy" in modality_names(), "after_names": imports(),
                "toy_module_after_names": "mscn_toy_plugin" in sys.modules}}
        list_modalities()
        list_modalities()
        res["after_list"] = imports()
        toy_module = sys.modules["mscn_toy_plugin"]
        res["instances_after_list"] = toy_module.INSTANCES
        a, b = get_modality("toy"), get_modality("toy")
        for _ in range(2):
            try:
                get_modality("broken")
            except ModalityError:
                pass
        res["after_get"] = imports()
        res["same_module"] = sys.modules["mscn_toy_plugin"] is toy_module
        res["fresh"] = a is not b and type(a) is type(b)
        res["instances_after_get"] = toy_module.INSTANCES
        print(json.dumps(res))
        ''', env={IMPORT_LOG: str(log)})
    assert out["names"] and out["after_names"] == [] and not out["toy_module_after_names"]
    assert sorted(out["after_list"]) == ["mscn_broken_plugin", "mscn_toy_plugin"]
    assert out["instances_after_list"] == 1  # loaded once for both listings
    assert out["after_get"] == out["after_list"]  # neither re-imported, the broken included
    assert out["same_module"] and out["fresh"]
    assert out["instances_after_get"] == 3  # get_modality gives a fresh instance each time


# -- listing stays light ---------------------------------------------------------------


def test_builtin_plugins_import_their_heavy_libraries_on_use():
    """``mscn modalities`` imports every plugin: torch and the mesh stack (trimesh, scipy,
    open3d) load when a plugin first reads or scores something, not when it is listed."""
    out = _child_json('''
        import json, sys
        from mscn_core import registry
        rows = [r for r in registry.list_modalities() if r.distribution == "mscn"]
        print(json.dumps({"rows": {r.name: [r.status, r.in_dim, r.out_dim, r.viewer]
                                   for r in rows},
                          "heavy": [m for m in ("trimesh", "scipy", "open3d", "igl")
                                    if m in sys.modules]}))
        ''')
    assert out["rows"] == {"nerf": ["ok", 3, 4, True], "sdf": ["ok", 3, 1, True],
                           "sphere": ["ok", 3, 1, True], "voxel": ["ok", 3, 1, True]}
    assert out["heavy"] == []


def test_builtin_plugins_and_cli_parser_do_not_import_torch():
    """torch (~1 s) loads when a plugin first computes, so ``mscn modalities`` and
    ``mscn fit --help`` stay under a second (bench/cli_startup.py measures it). Toy
    plugins installed by this module may import torch, so the built-ins are imported
    directly."""
    out = _child_json('''
        import json, sys
        import mscn_plugins.sphere, mscn_plugins.sdf, mscn_plugins.voxel, mscn_plugins.nerf
        from mscn_core import cli
        cli.build_parser(mscn_plugins.sphere.SphereModality(), light=True)
        print(json.dumps("torch" in sys.modules))
        ''')
    assert out is False


def test_lazy_plugin_constants_match_the_mesh_readers():
    """sdf keeps copies of two mesh-reader constants so that listing skips trimesh."""
    from mscn_datasets import meshes
    from mscn_plugins import sdf

    assert sdf.MESH_EXTENSIONS == meshes.MESH_EXTENSIONS == sdf.SdfModality.file_extensions
    assert sdf.PYTORCH3D_AVAILABLE == meshes.PYTORCH3D_AVAILABLE


def test_signals_module_does_not_import_torch():
    out = _child_json('''
        import json, sys
        import mscn_core.signals
        print(json.dumps("torch" in sys.modules))
        ''')
    assert out is False


def test_missing_shapes_extra_still_reports_the_mesh_plugins_broken():
    """The mesh stack loads lazily, but a missing one is still found when listing."""
    out = _child_json('''
        import json, sys
        sys.modules["trimesh"] = None  # as if the shapes extra were not installed
        from mscn_core import registry
        print(json.dumps({r.name: [r.status, r.error] for r in registry.list_modalities()
                          if r.distribution == "mscn"}))
        ''')
    for name in ("sdf", "voxel"):
        assert out[name][0] == "error"
        assert "needs the shapes extra" in out[name][1] and "trimesh" in out[name][1]
    assert out["sphere"][0] == out["nerf"][0] == "ok"
