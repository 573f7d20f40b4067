"""The contract checker (``mscn_core.testing``): the built-in plugin passes it, and each
deliberately broken toy modality is caught by exactly the clause it breaks.

The toy "line" modality is a complete, working 1-D plugin whose items are passed in
directly (no file needed to start); every variant overrides one member to break one
clause, the way a plugin author would get it wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from mscn_core.atomic import save_bytes_atomic
from mscn_core.modality import Modality, masked_mse
from mscn_core.signals import Signal
from mscn_core.testing import (
    CLAUSES,
    ContractViolation,
    Violation,
    assert_modality,
    check_modality,
)
from mscn_datasets import vendored_path

ERA5 = vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")


# -- a small working plugin ----------------------------------------------------------------
@dataclass
class Line:
    """An item: a named 1-D signal sampled evenly on [-1, 1]."""

    label: str
    values: list[float]


@dataclass
class LineOptions:
    # reconstruct on this many samples instead of the input's
    samples: int | None = None


class LineModality(Modality):
    name = "line"
    description = "1-D signals on [-1, 1], stored as JSON"
    in_dim = 1
    out_dim = 1
    file_extensions = (".line",)
    options = LineOptions

    def __init__(self) -> None:
        self.peak = 1.0

    def read(self, path, options=None):
        return [Line(**d) for d in json.loads(Path(path).read_text())]

    def fit_state(self, items):
        self.peak = max(max(abs(v) for v in i.values) for i in items) or 1.0

    def state(self):
        return {"peak": self.peak}

    def load_state(self, state):
        self.peak = float(state.get("peak", 1.0))

    def to_signal(self, item, options=None):
        x = torch.linspace(-1, 1, len(item.values))[:, None]
        y = torch.tensor(item.values, dtype=torch.float32)[:, None] / self.peak
        return Signal(x, y, meta={"n": len(item.values), "peak": self.peak})

    def item_template(self, item, options=None):
        return {"label": item.label}

    def item_label(self, item):
        return item.label

    def metrics(self, signal, pred):
        mse = float(((pred - signal.targets) ** 2).mean())
        return {"mse": mse, "psnr_db": -10 * math.log10(max(mse, 1e-20))}

    def reconstruct(self, meta, predict, options=None, template=None):
        label = template.label if template is not None else meta["template"]["label"]
        n = (options.samples if options is not None else None) or meta["n"]
        values = predict(torch.linspace(-1, 1, n)[:, None])[:, 0] * meta["peak"]
        return Line(label, values.tolist())

    def save(self, artifacts, path, overwrite=False, provenance=None):
        text = json.dumps([dataclasses.asdict(a) for a in artifacts])
        return save_bytes_atomic(text.encode(), path, overwrite=overwrite)

    def view(self, truth, recon, path, options=None, overwrite=False):
        rows = [f"{t:+.3f} {r:+.3f}" for t, r in zip(truth.values, recon.values, strict=False)]
        return save_bytes_atomic("\n".join(rows).encode(), path, overwrite=overwrite)


def line_items() -> list[Line]:
    x = [i / 24 - 1 for i in range(49)]
    return [Line("sine", [math.sin(3 * v) for v in x]), Line("ramp", [0.5 * v for v in x])]


# -- each variant breaks one clause ----------------------------------------------------------
class ScalarObjective(LineModality):
    def objective(self, field, batch):
        return masked_mse(self.render(field, batch.coords), batch.targets, batch.weights).mean()


class DetachedObjective(LineModality):
    def objective(self, field, batch):
        return super().objective(field, batch).detach()


class WrongSampleShape(LineModality):
    def sample(self, signal, n, generator=None):
        coords, targets, weights = super().sample(signal, n, generator)
        return coords, targets, weights[:, None]  # (n, 1) instead of (n,)


class UnreproducibleSample(LineModality):
    def sample(self, signal, n, generator=None):
        pick = torch.randint(signal.n_points, (n,))  # the global RNG, not `generator`
        return signal.coords[pick], signal.targets[pick], torch.ones(n)


class WrongRenderShape(LineModality):
    def render(self, field, coords):
        return field(coords)[..., 0]  # drops the channel axis


class NanMetrics(LineModality):
    def metrics(self, signal, pred):
        return {"mse": float("nan")}


class TensorMetrics(LineModality):
    def metrics(self, signal, pred):
        return {"mse": ((pred - signal.targets) ** 2).mean()}  # a tensor, not a float


class ZeroValues(LineModality):
    def n_values(self, signal):
        return 0


class SharedLabel(LineModality):
    def item_label(self, item):
        return "line"


class ReconstructRaises(LineModality):
    def reconstruct(self, meta, predict, options=None, template=None):
        raise KeyError("shape")


class ClobberingSave(LineModality):
    def save(self, artifacts, path, overwrite=False, provenance=None):
        Path(path).write_text(json.dumps([dataclasses.asdict(a) for a in artifacts]) + " ")


class SilentView(LineModality):
    def view(self, truth, recon, path, options=None, overwrite=False):
        return path


class TensorInMeta(LineModality):
    def to_signal(self, item, options=None):
        s = super().to_signal(item, options)
        s.meta["grid"] = s.coords[:, 0]  # a tensor: not JSON, so not in the bitstream
        return s


class UnserialisableState(LineModality):
    def state(self):
        return {"peak": torch.tensor(self.peak)}


class VersionOne(LineModality):
    contract_version = 1


class DictOptions(LineModality):
    options = dict


class DuckLine:
    """A plugin that does not subclass Modality: required members plus the version."""

    contract_version = 2
    name = "duckline"
    description = "LineModality without the base class"
    in_dim = 1
    out_dim = 1
    file_extensions = (".line",)
    _impl = LineModality()

    def read(self, path, options=None):
        return self._impl.read(path, options)

    def to_signal(self, item, options=None):
        return self._impl.to_signal(item, options)

    def metrics(self, signal, pred):
        return self._impl.metrics(signal, pred)

    def item_label(self, item):
        return item.label

    def item_template(self, item, options=None):
        return {"label": item.label}

    def reconstruct(self, meta, predict, options=None, template=None):
        return self._impl.reconstruct(meta, predict, None, template)

    def save(self, artifacts, path, overwrite=False, provenance=None):
        return self._impl.save(artifacts, path, overwrite, provenance)


BROKEN = {
    ScalarObjective: "objective",
    DetachedObjective: "objective",
    WrongSampleShape: "sample",
    UnreproducibleSample: "sample",
    # predictions without their channel axis: all that renders (objective and predict) fails
    WrongRenderShape: ("render", "objective", "reconstruct"),
    NanMetrics: "metrics",
    TensorMetrics: "metrics",
    ZeroValues: "n_values",
    SharedLabel: "item_label",
    ReconstructRaises: "reconstruct",
    ClobberingSave: "save",
    SilentView: "view",
    TensorInMeta: "to_signal",
    UnserialisableState: "state",
    VersionOne: "attributes",
    DictOptions: "attributes",
}


def errors(found: list[Violation]) -> list[Violation]:
    return [v for v in found if v.severity == "error"]


@pytest.mark.parametrize("cls", [LineModality, DuckLine], ids=lambda c: c.__name__)
def test_a_working_plugin_has_no_violations(cls, tmp_path):
    assert check_modality(cls(), line_items(), tmp_dir=tmp_path) == []
    assert assert_modality(cls(), line_items()) == []  # own temp folder, no raise
    assert (tmp_path / "reconstruction.line").stat().st_size > 0
    assert (tmp_path / "view.png").exists() == (cls is LineModality)


@pytest.mark.parametrize("cls, clause", list(BROKEN.items()), ids=[c.__name__ for c in BROKEN])
def test_each_broken_plugin_is_caught_by_exactly_its_clause(cls, clause, tmp_path):
    expected = (clause,) if isinstance(clause, str) else clause
    found = errors(check_modality(cls(), line_items(), tmp_dir=tmp_path))
    assert [v.name for v in found] == list(expected), "\n".join(map(str, found))
    assert [v.clause for v in found] == [CLAUSES[c] for c in expected]


def test_messages_say_what_is_wrong(tmp_path):
    def message(cls) -> str:
        (v,) = errors(check_modality(cls(), line_items(), tmp_dir=tmp_path / cls.__name__))
        return v.message

    assert "shape (B,)" in message(ScalarObjective)
    assert "not differentiable" in message(DetachedObjective)
    assert "not reproducible" in message(UnreproducibleSample)
    assert "FileExistsError" in message(ClobberingSave)
    assert "raised KeyError" in message(ReconstructRaises)
    assert "contract v1" in message(VersionOne)
    assert "'mse'" in message(NanMetrics)


def test_clauses_that_cannot_run_are_warnings_not_errors(tmp_path):
    found = check_modality(ReconstructRaises(), line_items(), tmp_dir=tmp_path)
    assert {v.name for v in found if v.severity == "warning"} == {"save"}
    assert "not checked" in next(v.message for v in found if v.name == "save")


class ThreeBugs(LineModality):
    objective = ScalarObjective.objective
    metrics = NanMetrics.metrics
    save = ClobberingSave.save


def test_every_violation_is_reported_in_one_assertion(tmp_path):
    with pytest.raises(ContractViolation) as info:
        assert_modality(ThreeBugs(), line_items(), tmp_dir=tmp_path)
    text = str(info.value)
    assert "in 3 place(s)" in text
    for clause in ("objective", "metrics", "save"):
        assert f"{CLAUSES[clause]} {clause}:" in text
    assert sorted(v.name for v in info.value.violations) == ["metrics", "objective", "save"]


class CannotReadOwnOutput(LineModality):
    file_extensions = ()  # guess_can_open claims nothing, so a failed read-back only warns

    def read(self, path, options=None):
        raise ValueError("reads .line files only")


def test_reading_back_is_a_warning_unless_the_plugin_claims_the_file(tmp_path):
    found = check_modality(CannotReadOwnOutput(), line_items(), tmp_dir=tmp_path / "a")
    assert [(v.name, v.severity) for v in found] == [("read", "warning")]
    with pytest.warns(UserWarning, match="C14 read"):
        assert_modality(CannotReadOwnOutput(), line_items(), tmp_dir=tmp_path / "b")

    class Claims(CannotReadOwnOutput):
        def guess_can_open(self, path):
            return True

    found = check_modality(Claims(), line_items(), tmp_dir=tmp_path / "c")
    assert [(v.name, v.severity) for v in found] == [("read", "error")]


def test_the_sphere_plugin_passes_with_real_era5_fields(tmp_path):
    from mscn_plugins.sphere import SphereModality

    m = SphereModality()
    items = m.read(ERA5, var="t", sel=["isobaricInhPa=850"])[:2]
    t0 = time.perf_counter()
    found = check_modality(m, items, tmp_dir=tmp_path)
    seconds = time.perf_counter() - t0
    assert found == [], "\n".join(map(str, found))
    assert seconds < 10.0  # about 2 s on 2 cores (view included); generous for loaded machines
    assert (tmp_path / "view.png").stat().st_size > 0


def test_options_are_passed_to_the_plugin(tmp_path):
    seen: list[Any] = []

    class Recording(LineModality):
        def reconstruct(self, meta, predict, options=None, template=None):
            seen.append(options)
            return super().reconstruct(meta, predict, options, template)

    assert check_modality(Recording(), line_items(), tmp_dir=tmp_path,
                          options=LineOptions(samples=7)) == []
    assert seen and all(o == LineOptions(samples=7) for o in seen)
    assert len(Recording().read(tmp_path / "reconstruction.line")[0].values) == 7


class Float64Coords(LineModality):
    def to_signal(self, item, options=None):
        s = super().to_signal(item, options)
        return Signal(s.coords.double(), s.targets, meta=s.meta)


def test_the_root_cause_comes_first_when_one_bug_breaks_several_clauses(tmp_path):
    found = errors(check_modality(Float64Coords(), line_items(), tmp_dir=tmp_path))
    assert found[0].name == "to_signal" and "float32" in found[0].message
    assert {"render", "objective"} <= {v.name for v in found}  # what it breaks downstream


def test_items_that_cannot_share_a_batch_are_reported(tmp_path):
    class Ragged(LineModality):
        def to_signal(self, item, options=None):
            s = super().to_signal(item, options)
            if item.label == "ramp":  # two target channels for one item only
                return Signal(s.coords, s.targets.repeat(1, 2), meta=s.meta)
            return s

    found = errors(check_modality(Ragged(), line_items(), tmp_dir=tmp_path))
    assert any(v.name == "to_signal" and "stacks items" in v.message for v in found)


def test_a_class_is_instantiated_as_the_registry_does_and_no_items_is_an_error(tmp_path):
    assert check_modality(LineModality, line_items(), tmp_dir=tmp_path / "a") == []
    found = check_modality(LineModality(), [], tmp_dir=tmp_path / "b")
    assert [v.name for v in errors(found)] == ["to_signal"]
    assert "no items" in errors(found)[0].message
