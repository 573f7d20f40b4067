"""The plugin contract checker: run a modality through every clause of contract v2.

A plugin author calls :func:`assert_modality` in their own test suite with a few real
items; it raises one :class:`ContractViolation` that lists *every* broken clause, so a
plugin is fixed in one round instead of one failure at a time. :func:`check_modality`
returns the same findings as a list. Each clause runs on its own (any exception becomes
a violation of that clause) and, where it can, on inputs that do not depend on other
clauses, so one bug is reported once, under the member that has it.

The checks run on a tiny seeded network (3 layers × 16 units, MSCN with 8 modulations)
and call the plugin exactly as the core does (``fit``, ``encode``, ``decode``, ``view``).

Clauses
-------
C1  ``attributes``     :func:`~mscn_core.modality.contract_problems` is empty: non-empty
                       ``name``, positive int ``in_dim``/``out_dim``, ``contract_version``
                       equal to :data:`~mscn_core.modality.CONTRACT_VERSION`, the required
                       methods, ``options`` a dataclass type or None.
C2  ``options``        the options dataclass instantiates with its defaults (every field
                       has one), the CLI can turn it into flags, and ``validation()``, if
                       offered, returns options of the same class or None.
C3  ``fit_state``      ``fit_state(items)`` runs (the core calls it before ``to_signal``).
C4  ``to_signal``      a :class:`~mscn_core.signals.Signal` per item: float 2-D coords,
                       float targets ``(N, c)``, finite where the mask is valid, a bool
                       mask ``(N,)``, ``meta`` that the stream can store (JSON); the same
                       ``k`` and ``c`` for all items (they share batches). With the default
                       ``render`` also ``k = in_dim``, ``c = out_dim`` and float32 coords;
                       a plugin that overrides it (NeRF: rays in, RGB out) may differ.
C5  ``sample``         ``sample(signal, n, generator)`` gives ``(n, k)``, ``(n, c)``,
                       ``(n,)`` finite floats, weights >= 0 not all zero, and the same
                       samples again for the same generator seed.
C6  ``render``         ``render(field, coords (B, n, k))`` gives finite ``(B, n, c)``.
C7  ``objective``      ``objective(field, batch)`` gives finite losses ``(B,)``,
                       differentiable w.r.t. the network (finite, not all-zero gradients);
                       one inner step (``meta.adapt``) runs on it.
C8  ``n_values``       a positive int for every signal (the bits-per-value denominator).
C9  ``metrics``        ``metrics(signal, predict(signal.coords))`` is a dict str → finite
                       number.
C10 ``item_template``  a JSON-serialisable dict.
C11 ``item_label``     a str, distinct for distinct items (the items given are taken to
                       be distinct); a warning if the id-based default is kept, since it
                       is not stable across reads.
C12 ``reconstruct``    returns an artifact both as ``decode`` calls it (``meta`` after a
                       JSON round trip, with ``"template"`` and ``"n_values"``,
                       ``template=None``) and as ``fit`` calls it (``template=item``).
C13 ``save``           ``save([artifact], path, overwrite=False, provenance=…)`` (what a
                       one-item stream decodes to) writes a non-empty file (or folder);
                       saving again without ``overwrite`` raises ``FileExistsError`` and
                       leaves it intact; with ``overwrite`` it replaces it.
C14 ``read``           ``read`` gives back items from the saved file and ``to_signal``
                       accepts them. A modality need not read its own output, so this is a
                       *warning* unless ``guess_can_open`` claims the file.
C15 ``state``          ``state()`` is JSON-serialisable (it goes into the checkpoint) and
                       ``load_state`` of it, on a fresh instance when one can be made,
                       gives the same state back.
C16 ``view``           when a viewer is offered, ``view(truth, recon, path, options,
                       overwrite=False)`` writes a non-empty file.
C17 ``check_meta``     ``check_meta(meta, options)`` accepts an item's meta as ``decode``
                       sees it (as under C12) and returns a non-negative int, positive
                       when the item has values (the number of values ``reconstruct``
                       will produce).
C18 ``capabilities``   when offered: ``value_scale(meta)`` is a finite float > 0 and
                       ``reconstruct`` (as decode calls it) predicts on exactly the
                       signal's points (what an error-bounded stream needs),
                       ``output_ulp(meta)`` a finite float >= 0, ``reference_group(item)``
                       hashable or None.
C19 ``scan``/``load``  when offered (both or neither, C1): on the saved file of C13,
                       ``scan`` lists as many references as ``read`` gives items, each
                       with a str ``label``; ``load`` of the first gives the item ``read``
                       gives (same ``item_label``, equal to the reference's, and the same
                       signal: targets and meta). Severity as C14.

A clause that cannot run because an earlier one gave nothing to work on (no signals, no
artifact) is reported as a *warning* saying so; warnings never make
:func:`assert_modality` fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .modality import CONTRACT_VERSION, Modality, contract_problems, has_view, with_defaults
from .signals import Batch, Signal

Severity = Literal["error", "warning"]

CLAUSES: dict[str, str] = {
    "attributes": "C1", "options": "C2", "fit_state": "C3", "to_signal": "C4",
    "sample": "C5", "render": "C6", "objective": "C7", "n_values": "C8", "metrics": "C9",
    "item_template": "C10", "item_label": "C11", "reconstruct": "C12", "save": "C13",
    "read": "C14", "state": "C15", "view": "C16", "check_meta": "C17",
    "capabilities": "C18", "streaming": "C19",
}

_PROBE_POINTS = 64  # samples per item in the probe batch
_SAMPLE_POINTS = 32  # samples asked of ``sample``
_PROVENANCE = {"checkpoint_sha256": "0" * 64, "bits_per_value": 0.5}


@dataclasses.dataclass(frozen=True)
class Violation:
    """One broken clause: its id (``"C7"``), its name (the contract member) and why."""

    clause: str
    name: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        tag = "" if self.severity == "error" else " (warning)"
        return f"{self.clause} {self.name}{tag}: {self.message}"


class ContractViolation(AssertionError):
    """Every error-level violation of one modality, listed in one message."""

    def __init__(self, modality_name: str, violations: Sequence[Violation]):
        self.violations = list(violations)
        errors = [v for v in self.violations if v.severity == "error"]
        lines = [f"modality {modality_name!r} breaks plugin contract v{CONTRACT_VERSION} "
                 f"in {len(errors)} place(s):"]
        lines += [f"  {v}" for v in self.violations]
        super().__init__("\n".join(lines))


class _Failed(Exception):
    """A clause's own finding (as opposed to an exception the plugin raised)."""


class _Recorder:
    """Collects violations; ``with rec.clause(name):`` turns any exception into one."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []

    def add(self, name: str, message: str, severity: Severity = "error") -> None:
        self.violations.append(Violation(CLAUSES[name], name, message, severity))

    def clause(self, name: str, severity: Severity = "error") -> _Clause:
        return _Clause(self, name, severity)

    def merged(self) -> list[Violation]:
        """One violation per clause and severity: per-item findings joined, and the same
        finding on several items said once (``items 0, 1: …``)."""
        groups: dict[tuple[str, Severity], list[str]] = {}
        for v in self.violations:
            groups.setdefault((v.name, v.severity), []).append(v.message)
        out = []
        for (name, severity), messages in groups.items():
            by_text: dict[str, list[str]] = {}
            for msg in messages:
                m = re.match(r"item (\d+): (.*)$", msg, re.S)
                idx, text = (m.group(1), m.group(2)) if m else ("", msg)
                by_text.setdefault(text, []).append(idx)
            parts = []
            for text, idx in by_text.items():
                idx = [i for i in idx if i]
                head = "" if not idx else ("item " if len(idx) == 1 else "items ")
                parts.append(f"{head}{', '.join(idx)}: {text}" if idx else text)
            out.append(Violation(CLAUSES[name], name, "; ".join(parts), severity))
        return sorted(out, key=lambda v: int(v.clause[1:]))


class _Clause:
    def __init__(self, rec: _Recorder, name: str, severity: Severity) -> None:
        self.rec, self.name, self.severity = rec, name, severity

    def __enter__(self) -> _Clause:
        return self

    def __exit__(self, tp: Any, err: BaseException | None, tb: Any) -> bool:
        if err is None:
            return False
        if isinstance(err, KeyboardInterrupt):
            return False
        if isinstance(err, _Failed):
            self.rec.add(self.name, str(err), self.severity)
        else:  # the plugin raised: name the exception, keep checking the other clauses
            self.rec.add(self.name, f"raised {type(err).__name__}: {err}", self.severity)
        return True

    def require(self, ok: bool, message: str) -> None:
        """Stop this clause with ``message`` unless ``ok``."""
        if not ok:
            raise _Failed(message)


# -- helpers ---------------------------------------------------------------------------
def _json_round_trip(obj: Any, what: str, bitstream: bool = False) -> Any:
    """``obj`` as the core will see it again after storing it as JSON.

    ``bitstream=True`` accepts what the ``.mscn`` writer converts (numpy scalars/arrays).
    """
    from .bitstream import _json_default

    try:
        text = json.dumps(obj, sort_keys=True, default=_json_default if bitstream else None)
    except (TypeError, ValueError) as err:
        raise _Failed(f"{what} is not JSON-serialisable: {err}") from None
    return json.loads(text)


def _is_float_tensor(t: Any) -> bool:
    return isinstance(t, Tensor) and t.dtype.is_floating_point


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _default_render(m: Any) -> bool:
    """True if ``m`` keeps the pointwise ``render`` (then ``c = out_dim``, ``k = in_dim``)."""
    return getattr(m.render, "__func__", None) is Modality.render


def _probe_batch(signals: Sequence[Signal], n: int) -> Batch:
    """Evenly spread valid samples of every signal, without the plugin's ``sample``.

    Independent of C5, so a broken sampler is reported once, not again under C6/C7.
    """
    picks = []
    for s in signals:
        valid = (s.mask.reshape(-1).bool().nonzero().squeeze(1) if s.mask is not None
                 else torch.arange(s.n_points))
        picks.append(valid)
    n = min([n] + [p.numel() for p in picks])
    rows = []
    for s, valid in zip(signals, picks, strict=True):
        idx = valid[torch.linspace(0, valid.numel() - 1, n).round().long()]
        rows.append((s.coords[idx], s.targets[idx], torch.ones(n, dtype=s.coords.dtype)))
    c, t, w = (torch.stack(x) for x in zip(*rows, strict=True))
    return Batch(c, t, w)


def _path_content(path: Path) -> dict[str, bytes] | None:
    """A file's bytes, or a folder's files' bytes (zarr-like outputs); None if absent."""
    if path.is_file():
        return {"": path.read_bytes()}
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes()
                for p in sorted(path.rglob("*")) if p.is_file()}
    return None


def _non_empty(content: dict[str, bytes] | None) -> bool:
    return bool(content) and any(len(b) for b in content.values())


def _fresh_instance(m: Any) -> Any:
    """A new instance of the plugin's class if it takes no arguments, else ``m`` itself."""
    try:
        other = type(m)()
    except Exception:  # noqa: BLE001 - a class that needs arguments: reuse the instance
        return m
    return with_defaults(other)


# -- the checker -----------------------------------------------------------------------
def check_modality(modality: Any, items: Sequence[Any], *, tmp_dir: str | os.PathLike | None
                   = None, options: Any = None, seed: int = 0) -> list[Violation]:
    """Every violation of contract v2 by ``modality`` on ``items`` (empty list: it complies).

    ``modality`` is an instance (duck-typed objects get the optional members' defaults);
    ``items`` are a few real, distinct items as its ``read`` returns them (two suffice);
    ``options`` an instance of its options dataclass (default: the defaults); files go
    under ``tmp_dir`` (default: a temporary folder, removed afterwards).
    """
    if tmp_dir is None:
        with tempfile.TemporaryDirectory(prefix="mscn-check-") as d:
            return check_modality(modality, items, tmp_dir=d, options=options, seed=seed)
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    items = list(items)
    rec = _Recorder()
    raw = None
    with rec.clause("attributes"):
        raw = modality() if isinstance(modality, type) else modality  # as the registry does
    if raw is None:
        return rec.merged()

    # C1 attributes ---------------------------------------------------------------------
    with rec.clause("attributes") as c:
        problems = contract_problems(raw)
        c.require(not problems, "; ".join(problems))
    m = with_defaults(raw)

    # C2 options -------------------------------------------------------------------------
    opts_cls = getattr(m, "options", None)
    opts = options
    if isinstance(opts_cls, type) and dataclasses.is_dataclass(opts_cls):
        with rec.clause("options") as c:
            missing = [f.name for f in dataclasses.fields(opts_cls)
                       if f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING]
            c.require(not missing, f"fields without a default: {', '.join(missing)} "
                      "(the CLI builds the options from defaults plus flags)")
            defaults = opts_cls()
            if opts is None:
                opts = defaults
            from .cli import add_config_flags

            add_config_flags(argparse.ArgumentParser(), opts_cls, f"{m.name} options",
                             prefix="opt")
            validation = getattr(opts, "validation", None)
            if callable(validation):
                v = validation()
                c.require(v is None or isinstance(v, opts_cls),
                          f"validation() must return {opts_cls.__name__} or None, "
                          f"got {type(v).__name__}")

    # C3 fit_state ----------------------------------------------------------------------
    if items:
        with rec.clause("fit_state"):
            m.fit_state(list(items))

    # C4 to_signal ----------------------------------------------------------------------
    signals: list[Signal | None] = []
    for i, item in enumerate(items):
        sig = None
        with rec.clause("to_signal") as c:
            s = m.to_signal(item, opts)
            c.require(isinstance(s, Signal), f"item {i}: returned {type(s).__name__}, "
                      "not a mscn_core.signals.Signal")
            sig = s
            _check_signal(c, m, s, i)
        signals.append(sig)
    good = [s for s in signals if s is not None]
    shapes = {(s.coords.shape[1], s.targets.shape[1]) for s in good}
    if len(shapes) > 1:  # items are batched together: every signal needs the same k and c
        rec.add("to_signal", "items disagree on (coords columns k, target channels c): "
                f"{sorted(shapes)}; the core stacks items into one batch")
        good = [s for s in good if (s.coords.shape[1], s.targets.shape[1]) == max(shapes)]
        kept = {id(s) for s in good}
        signals = [s if s is not None and id(s) in kept else None for s in signals]
    have_all = len(good) == len(items) and len(items) > 0
    if not items:
        rec.add("to_signal", "no items given: pass a few real items (two suffice)")

    def skipped(name: str, why: str) -> None:
        rec.add(name, f"not checked: {why}", "warning")

    # C5 sample -------------------------------------------------------------------------
    if not good:
        for name in ("sample", "render", "objective", "n_values", "metrics", "reconstruct",
                     "save", "read"):
            skipped(name, "no signal to work on (see to_signal)")
    for i, s in enumerate(signals):
        if s is not None:
            with rec.clause("sample") as c:
                _check_sample(c, m, s, i, seed)

    # C6 render, C7 objective -------------------------------------------------------------
    rep = codes = None
    if good:
        from .methods import MethodConfig, build_representation
        from .siren import SirenConfig

        rep = build_representation(
            SirenConfig(in_dim=_dim(m, "in_dim"), out_dim=_dim(m, "out_dim"), width=16,
                        depth=3),
            MethodConfig(method="mscn", budget=8), torch.Generator().manual_seed(seed))
        rep.eval()
        batch = None
        with rec.clause("to_signal"):
            batch = _probe_batch(good, _PROBE_POINTS)
        if batch is not None:
            with rec.clause("render") as c:
                _check_render(c, m, rep, batch)
            with rec.clause("objective") as c:
                codes = _check_objective(c, m, rep, batch)

    # C8 n_values -----------------------------------------------------------------------
    for i, s in enumerate(signals):
        if s is None:
            continue
        with rec.clause("n_values") as c:
            n = m.n_values(s)
            c.require(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0,
                      f"item {i}: must be a positive int, got {n!r}")

    # C9 metrics -------------------------------------------------------------------------
    predicts = _predictors(m, rep, signals, codes) if rep is not None else {}
    for i, s in enumerate(signals):
        if s is None:
            continue
        with rec.clause("metrics") as c:
            p = predicts[i]
            pred = p(s.coords)
            got = m.metrics(s, pred)
            c.require(isinstance(got, dict), f"item {i}: returned {type(got).__name__}, "
                      "not a dict")
            bad = {k: v for k, v in got.items()
                   if not isinstance(k, str) or isinstance(v, bool)
                   or not isinstance(v, numbers.Real) or not math.isfinite(float(v))}
            c.require(not bad, f"item {i}: every entry must be str -> finite float, got "
                      + ", ".join(f"{k!r}: {v!r}" for k, v in bad.items()))

    # C10 item_template, C11 item_label ---------------------------------------------------
    templates: list[Any] = []
    for i, item in enumerate(items):
        t = None
        with rec.clause("item_template") as c:
            t = m.item_template(item, opts)
            c.require(isinstance(t, dict), f"item {i}: returned {type(t).__name__}, "
                      "not a dict")
            _json_round_trip(t, f"item {i}'s template", bitstream=True)
        templates.append(t)
    if getattr(m.item_label, "__func__", None) is Modality.item_label:
        rec.add("item_label", "not overridden: the default label is id(item), which changes "
                "between reads, so meta-train cannot keep validation items (--val-data, "
                "options.validation()) out of training, and reports cannot name items",
                "warning")
    with rec.clause("item_label") as c:
        labels = [m.item_label(item) for item in items]
        bad = [repr(x) for x in labels if not isinstance(x, str)]
        c.require(not bad, f"labels must be str, got {', '.join(bad)}")
        distinct = {id(x) for x in items}
        c.require(len(distinct) < len(items) or len(set(labels)) == len(labels),
                  f"distinct items share a label: {labels}")

    # C12 reconstruct -------------------------------------------------------------------
    artifact = None
    if have_all:
        with rec.clause("reconstruct") as c:
            s, p, t = signals[0], predicts[0], templates[0]
            meta = dict(s.meta, template=t, n_values=_safe_n_values(m, s))
            try:
                meta = _json_round_trip(meta, "meta", bitstream=True)
            except _Failed:  # reported under to_signal / item_template; use it as it is
                pass
            decoded = m.reconstruct(meta, p, opts)
            c.require(decoded is not None, "returned None as decode calls it "
                      "(template=None, meta['template'])")
            fitted = m.reconstruct(s.meta, p, opts, template=items[0])
            c.require(fitted is not None, "returned None as fit calls it (template=item)")
            artifact = decoded
    elif good:
        skipped("reconstruct", "needs every item's signal (see to_signal)")

    # C17 check_meta: what decode asks before it allocates anything ------------------------
    if have_all:
        with rec.clause("check_meta") as c:
            s, t = signals[0], templates[0]
            n_item = _safe_n_values(m, s)
            meta = dict(s.meta, template=t, n_values=n_item)
            try:
                meta = _json_round_trip(meta, "meta", bitstream=True)
            except _Failed:  # reported under to_signal / item_template
                pass
            n = m.check_meta(meta, opts)
            c.require(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0,
                      f"must return the number of values reconstruct will produce (an int "
                      f">= 0), got {n!r}")
            c.require(n > 0 or n_item <= 0, f"returned 0 for an item of {n_item} values")

    # C18 capabilities: value_scale, output_ulp, reference_group (optional) ---------------
    if have_all and any(callable(getattr(m, k, None)) for k in
                        ("value_scale", "output_ulp", "reference_group")):
        with rec.clause("capabilities") as c:
            _check_capabilities(c, m, signals[0], templates[0], predicts[0], items, opts)

    # C13 save --------------------------------------------------------------------------
    ext = (tuple(getattr(m, "file_extensions", ())) or (".out",))[0]
    out = tmp / f"reconstruction{ext}"
    saved = False
    if artifact is not None:
        with rec.clause("save") as c:
            _check_save(c, m, artifact, out)
        saved = _non_empty(_path_content(out))
    elif good:
        skipped("save", "needs an artifact from reconstruct")

    # C14 read back ---------------------------------------------------------------------
    read_back = None
    if saved:
        claims = False
        try:
            claims = bool(m.guess_can_open(out))
        except Exception as err:  # noqa: BLE001 - reported here, checking goes on
            rec.add("read", f"guess_can_open raised {type(err).__name__}: {err}")
        with rec.clause("read", "error" if claims else "warning") as c:
            back = list(m.read(out, opts))
            c.require(len(back) > 0, f"read gave no items from its own output {out.name}")
            s = m.to_signal(back[0], opts)
            c.require(isinstance(s, Signal), "to_signal of the read-back item gave "
                      f"{type(s).__name__}")
            read_back = back[0]
        if callable(getattr(m, "scan", None)) and callable(getattr(m, "load", None)):
            with rec.clause("streaming", "error" if claims else "warning") as c:
                _check_streaming(c, m, out, back if read_back is not None else None, opts)

    # C15 state -------------------------------------------------------------------------
    with rec.clause("state") as c:
        st = m.state()
        c.require(isinstance(st, dict), f"state() returned {type(st).__name__}, not a dict")
        stored = _json_round_trip(st, "state()")
        other = _fresh_instance(m)
        other.load_state(stored)
        again = _json_round_trip(other.state(), "state() after load_state")
        c.require(again == stored, "load_state(state()) does not give the same state back: "
                  f"{json.dumps(stored)[:200]} -> {json.dumps(again)[:200]}")

    # C16 view --------------------------------------------------------------------------
    if has_view(m) and items:
        with rec.clause("view") as c:
            png = tmp / "view.png"
            recon = read_back if read_back is not None else items[0]
            m.view(items[0], recon, png, opts, overwrite=False)
            c.require(_non_empty(_path_content(png)), f"view wrote nothing at {png.name}")
    return rec.merged()


def assert_modality(modality: Any, items: Sequence[Any], *, tmp_dir: str | os.PathLike | None
                    = None, options: Any = None, seed: int = 0) -> list[Violation]:
    """Raise one :class:`ContractViolation` listing every violation, if any is an error.

    Warnings (e.g. a modality that cannot read its own output) are issued with
    :func:`warnings.warn` and returned.
    """
    found = check_modality(modality, items, tmp_dir=tmp_dir, options=options, seed=seed)
    if any(v.severity == "error" for v in found):
        raise ContractViolation(str(getattr(modality, "name", type(modality).__name__)), found)
    for v in found:
        warnings.warn(str(v), stacklevel=2)
    return found


# -- clause bodies -----------------------------------------------------------------------
def _check_capabilities(c: _Clause, m: Any, s: Signal, template: Any, predict: Any,
                        items: Sequence[Any], opts: Any) -> None:
    meta = _json_round_trip(dict(s.meta, template=template, n_values=_safe_n_values(m, s)),
                            "meta", bitstream=True)
    for name, lo in (("value_scale", 0.0), ("output_ulp", None)):
        fn = getattr(m, name, None)
        if callable(fn):
            v = fn(meta)
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            c.require(ok and (v > 0 if lo is not None else v >= 0),
                      f"{name}(meta) must be a finite float "
                      f"{'> 0' if lo is not None else '>= 0'}, got {v!r}")
    if callable(getattr(m, "value_scale", None)):
        calls: list[int] = []

        def counting(coords: Tensor) -> Tensor:
            calls.append(int(coords.shape[0]))
            return predict(coords).double()

        m.reconstruct(meta, counting, opts)
        c.require(calls and all(n == s.n_points for n in calls),
                  f"with value_scale (error-bounded streams) reconstruct must predict on "
                  f"the signal's {s.n_points} points, it asked for {calls or 'none'}")
    fn = getattr(m, "reference_group", None)
    if callable(fn):
        for item in items:
            g = fn(item)
            try:
                hash(g)
            except TypeError:
                c.require(False, f"reference_group(item) must be hashable or None, got "
                          f"{type(g).__name__}")


def _check_streaming(c: _Clause, m: Any, path: Path, items: Sequence[Any] | None,
                     opts: Any) -> None:
    """C19: the lazy reader lists and loads what the eager ``read`` gives."""
    refs = list(m.scan(path, opts))
    c.require(all(isinstance(getattr(r, "label", None), str) for r in refs),
              "scan must return references with a str label (mscn_core.streaming.ItemRef)")
    if items is None:
        return
    c.require(len(refs) == len(items), f"scan listed {len(refs)} references, read gave "
              f"{len(items)} items")
    if not refs:
        return
    item = m.load(refs[0], opts)
    label = m.item_label(item)
    c.require(label == refs[0].label == m.item_label(items[0]),
              f"labels differ: reference {refs[0].label!r}, loaded {label!r}, read "
              f"{m.item_label(items[0])!r}")
    lazy, eager = m.to_signal(item, opts), m.to_signal(items[0], opts)
    c.require(torch.equal(lazy.targets, eager.targets) and
              json.dumps(lazy.meta, sort_keys=True, default=str)
              == json.dumps(eager.meta, sort_keys=True, default=str),
              "load(scan()[0]) gives another signal than read()[0] (targets or meta)")


def _check_signal(c: _Clause, m: Any, s: Signal, i: int) -> None:
    n = s.coords.shape[0] if isinstance(s.coords, Tensor) else -1
    c.require(_is_float_tensor(s.coords) and s.coords.dim() == 2,
              f"item {i}: coords must be a 2-D float tensor, got {_shape(s.coords)} "
              f"{getattr(s.coords, 'dtype', '')}")
    c.require(_is_float_tensor(s.targets) and s.targets.dim() == 2
              and s.targets.shape[0] == n,
              f"item {i}: targets must be a float tensor (N, c), got {_shape(s.targets)}")
    if _default_render(m):
        c.require(s.coords.dtype == torch.float32,
                  f"item {i}: coords are {s.coords.dtype}; the default render feeds them to "
                  "the float32 network")
        c.require(s.targets.shape[1] == m.out_dim,
                  f"item {i}: targets {_shape(s.targets)} need out_dim={m.out_dim} channels "
                  "(the default render passes the network's outputs through)")
        c.require(s.coords.shape[1] == m.in_dim,
                  f"item {i}: coords {_shape(s.coords)} need in_dim={m.in_dim} columns "
                  "(the default render feeds them to the network)")
    if s.mask is not None:
        c.require(isinstance(s.mask, Tensor) and s.mask.dtype == torch.bool
                  and tuple(s.mask.shape) == (n,),
                  f"item {i}: mask must be a bool tensor ({n},), got {_shape(s.mask)}")
        valid = s.targets[s.mask]
    else:
        valid = s.targets
    c.require(_finite(valid), f"item {i}: targets are not finite where the mask is valid")
    c.require(isinstance(s.meta, dict), f"item {i}: meta must be a dict")
    _json_round_trip(s.meta, f"item {i}'s meta", bitstream=True)


def _check_sample(c: _Clause, m: Any, s: Signal, i: int, seed: int) -> None:
    n = _SAMPLE_POINTS
    k, ch = s.coords.shape[1], s.targets.shape[1]
    got = m.sample(s, n, torch.Generator().manual_seed(seed))
    c.require(isinstance(got, tuple | list) and len(got) == 3,
              f"item {i}: must return (coords, targets, weights), got {type(got).__name__}")
    coords, targets, weights = got
    want = {"coords": (coords, (n, k)), "targets": (targets, (n, ch)),
            "weights": (weights, (n,))}
    for what, (t, shape) in want.items():
        c.require(_is_float_tensor(t) and tuple(t.shape) == shape,
                  f"item {i}: {what} must be a float tensor {shape} for n={n}, got "
                  f"{_shape(t)} {getattr(t, 'dtype', '')}")
        c.require(_finite(t), f"item {i}: {what} are not finite")
    c.require(bool((weights >= 0).all()) and bool((weights > 0).any()),
              f"item {i}: weights must be >= 0 and not all zero")
    again = m.sample(s, n, torch.Generator().manual_seed(seed))
    same = all(isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
               for a, b in zip(got, again, strict=True))
    c.require(same, f"item {i}: not reproducible: the same generator seed gave other "
              "samples (draw all randomness from the generator passed in)")


def _field(rep: Any, state: dict, ctx: dict):
    return lambda points: rep.predict(state, ctx, points)


def _check_render(c: _Clause, m: Any, rep: Any, batch: Batch) -> None:
    b, n, ch = batch.targets.shape
    state, ctx = rep.init_state(b), rep.context(b, False)
    with torch.no_grad():
        out = m.render(_field(rep, state, ctx), batch.coords)
    c.require(isinstance(out, Tensor) and tuple(out.shape) == (b, n, ch),
              f"must return predictions (B, n, c) = {(b, n, ch)} for coords "
              f"{tuple(batch.coords.shape)}, got {_shape(out)}")
    c.require(_finite(out), "predictions are not finite")


def _check_objective(c: _Clause, m: Any, rep: Any, batch: Batch) -> Tensor | None:
    """Shape, finiteness and differentiability; returns the adapted codes (or None)."""
    from .meta import adapt

    b = batch.coords.shape[0]
    state, ctx = rep.init_state(b), rep.context(b, False)
    rep.zero_grad(set_to_none=True)
    loss = m.objective(_field(rep, state, ctx), batch)
    c.require(isinstance(loss, Tensor) and tuple(loss.shape) == (b,),
              f"must return per-item losses of shape (B,) = ({b},), got {_shape(loss)}")
    c.require(_finite(loss), f"losses are not finite: {loss.detach().tolist()}")
    c.require(loss.requires_grad, "the losses are not differentiable (no autograd graph: "
              "detached, or computed outside torch?)")
    loss.sum().backward()
    grads = [p.grad for p in rep.net.parameters()]
    c.require(all(g is not None for g in grads) and any(bool((g != 0).any()) for g in grads),
              "backward gives no gradient to the network parameters")
    c.require(all(_finite(g) for g in grads), "backward gives non-finite gradients")
    rep.zero_grad(set_to_none=True)
    state, ctx = adapt(rep, batch, m, steps=1)
    with torch.no_grad():
        after = m.objective(_field(rep, state, ctx), batch)
    c.require(_finite(after), "losses after one inner step are not finite")
    with torch.no_grad():
        return rep.code_values(state)


def _predictors(m: Any, rep: Any, signals: Sequence[Signal | None], codes: Tensor | None
                ) -> dict[int, Any]:
    """``predict`` per item index as the core builds it (``pipeline.predictor``).

    ``codes`` are the adapted codes of the signals that exist, in order; without them
    (objective broken) every item gets the initial code, so C9-C16 still run.
    """
    from .checkpoint import Checkpoint
    from .pipeline import predictor

    ck = Checkpoint(rep, str(getattr(m, "name", "")), {})
    present = [i for i, s in enumerate(signals) if s is not None]
    if codes is None or codes.shape[0] != len(present):
        codes = rep.code_values(rep.init_state(len(present))).detach()
    return {i: predictor(ck, m, codes[j]) for j, i in enumerate(present)}


def _dim(m: Any, attr: str) -> int:
    """The declared dimension, or 1 when it is unusable (reported under attributes)."""
    v = getattr(m, attr, None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1


def _safe_n_values(m: Any, s: Signal) -> int:
    try:
        return int(m.n_values(s))
    except Exception:  # noqa: BLE001 - reported under n_values
        return s.n_points


def _check_save(c: _Clause, m: Any, artifact: Any, out: Path) -> None:
    """No-clobber first, then ``overwrite=True``, with the keywords the CLI passes."""
    m.save([artifact], out, overwrite=False, provenance=dict(_PROVENANCE))
    first = _path_content(out)
    c.require(_non_empty(first), f"wrote nothing (or an empty file) at {out.name}")
    refused = False
    try:
        m.save([artifact], out, overwrite=False, provenance=dict(_PROVENANCE))
    except FileExistsError:
        refused = True
    intact = _path_content(out) == first
    c.require(refused and intact,
              f"saving again to the existing {out.name} with overwrite=False "
              + ("did not raise FileExistsError" if not refused else "")
              + (" and " if not refused and not intact else "")
              + ("changed the file" if not intact else ""))
    m.save([artifact], out, overwrite=True, provenance=dict(_PROVENANCE))
    c.require(_non_empty(_path_content(out)), f"overwrite=True left nothing at {out.name}")
