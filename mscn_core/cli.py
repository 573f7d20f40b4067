"""The ``mscn`` command line: meta-train, fit, evaluate, encode, decode, view, inspect.

The CLI knows no modality: each plugin declares its options as a dataclass, and once
the command's modality is known (``--modality``, the checkpoint, or the file) those
options become flags of the command, so ``mscn fit --checkpoint CKPT --help`` lists them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import glob
import hashlib
import inspect
import json
import os
import random
import re
import shlex
import signal
import stat
import sys
import threading
import traceback
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# -- dataclass ⇄ argparse: every config field is a flag, defaults are the paper's --------


def _flag_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _flag_type(args[0])
        return lambda s: None if s.lower() == "none" else inner(s)
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0])
    if tp is bool:
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    return tp


def field_docs(cls) -> dict[str, str]:
    """Each dataclass field's ``# comment``, trailing or on the lines just above it:
    one place documents a setting, for the code and for ``--help``."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines():
        comment = re.match(r"^\s+#\s?(.*)$", line)
        if comment:
            above.append(comment.group(1).strip())
            continue
        m = re.match(r"^\s+(\w+):[^=\n]+=[^#\n]*(?:#\s*(.+))?$", line)
        if m:
            docs[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        above = []
    return docs


def add_config_flags(parser: argparse.ArgumentParser, cls, title: str, skip=(),
                     prefix: str | None = None) -> None:
    """Every field of dataclass ``cls`` as ``--field-name``; lists repeat, Literals choose."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = docs.get(f.name, "").replace("%", "%%")
        kw = {"type": _flag_type(tp), "default": default, "metavar": f.name.upper(),
              "help": f"{doc} (default: {default})".lstrip()}
        if typing.get_origin(tp) is list:
            inner = typing.get_args(tp)
            kw.update(action="append", default=None, type=inner[0] if inner else str)
        choices = None
        if f.name in ("method", "grad_impl"):  # only the method config has these
            from .methods import GRAD_IMPLS, REGISTRY

            choices = {"method": tuple(REGISTRY), "grad_impl": GRAD_IMPLS}[f.name]
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
        if choices:
            kw["choices"] = choices
            del kw["metavar"]  # argparse then shows {a,b,…}
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"{prefix or title}.{f.name}",
                           **kw)


def config_from_args(args: argparse.Namespace, cls, title: str):
    values = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(title + ".")}
    for f in dataclasses.fields(cls):  # repeatable flags given no times: the field's default
        if values.get(f.name, 0) is None and f.default is dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return cls(**values)


@dataclasses.dataclass
class ScratchConfig:
    """``mscn fit`` without a checkpoint: COIN-style fitting. A CPU-sized network by
    default (the paper's 15×512 takes hours per item on CPU without meta-learning)."""

    depth: int = 6  # layers including the linear output layer
    width: int = 128  # units per hidden layer
    w0: float = 30.0  # SIREN frequency
    coin_steps: int = 1000  # Adam steps per item (COIN; --steps overrides)
    coin_lr: float = 1e-4  # Adam learning rate


# -- one error path: expected failures are one line and exit 2 -----------------------------


class CommandError(ValueError):
    """An expected failure already worded for the user (``<file>: <problem>``): exit 2."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT as an exception, so ``finally`` blocks (temp file removal) run.

    A KeyboardInterrupt, not a SystemExit: plugin loading reports a plugin's SystemExit
    as a broken plugin, and ``except Exception`` must not swallow a signal either.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.kept: str | None = None  # what the command kept on purpose (resumable state)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While inside: SIGTERM and SIGINT raise :class:`Interrupted` (once; repeats are
    ignored so the cleanup they trigger is not itself cut short). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            if h is not None:
                signal.signal(s, h)


# Expected failures: bad input (ValueError: stream, checkpoint and plugin data errors),
# I/O (OSError), an unknown or broken modality, a missing optional dependency.
def _expected() -> tuple[type[BaseException], ...]:
    from .registry import ModalityError

    return (ValueError, OSError, ModalityError, ImportError)


def describe_error(err: BaseException) -> str:
    """``<file>: <problem>`` on one line (OSErrors carry the file in ``err.filename``)."""
    if isinstance(err, OSError) and err.filename is not None:
        names = [os.fsdecode(err.filename)]
        if err.filename2 is not None:
            names.append(os.fsdecode(err.filename2))
        text = f"{': '.join(names)}: {err.strerror or err}"
    else:
        text = str(err) or type(err).__name__
    return re.sub(r"\s*\n\s*", " ", text).strip()


def _stdout_closed() -> bool:
    """Whether our stdout is a pipe whose reader went away (``mscn … | head``)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True  # cannot tell: assume it is stdout, the usual case


def guarded(command: str | None, func: Callable[[], int | None], debug: bool = False) -> int:
    """Run ``func`` the way every mscn command runs, and return its exit code.

    Why: a user should see one line, never a traceback, for anything they can fix.
    Expected failures (see ``_expected``): ``mscn CMD: error: <file>: <problem>``, exit 2;
    anything else: ``mscn CMD: internal error: <Type>: <msg>``, exit 1; SIGINT/SIGTERM:
    temp files removed, one line, exit 130/143. ``debug``: the traceback too.
    A BrokenPipeError on stdout propagates (``entry.console`` exits quietly).
    """
    prefix = f"mscn {command}" if command else "mscn"
    with signals_raise():
        try:
            return int(func() or 0)
        except Interrupted as sig:
            name = signal.Signals(sig.signum).name
            print(f"{prefix}: interrupted ({name}); {sig.kept or 'nothing written'}",
                  file=sys.stderr)
            return 128 + sig.signum
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted; nothing written", file=sys.stderr)
            return 128 + signal.SIGINT
        except BrokenPipeError as err:
            if _stdout_closed():
                raise
            return _report(prefix, err, debug)
        except Exception as err:  # noqa: BLE001 - the one place every failure is reported
            return _report(prefix, err, debug)


def _report(prefix: str, err: Exception, debug: bool) -> int:
    if debug:
        traceback.print_exception(err)
    if isinstance(err, _expected()):
        print(f"{prefix}: error: {describe_error(err)}", file=sys.stderr)
        return 2
    hint = "" if debug else " (run with --debug for the traceback)"
    print(f"{prefix}: internal error: {type(err).__name__}: {describe_error(err)}{hint}",
          file=sys.stderr)
    return 1


@contextlib.contextmanager
def _about(path: str | os.PathLike[str]) -> Iterator[None]:
    """Name ``path`` in a data error that does not name it already."""
    try:
        yield
    except ValueError as err:
        msg = str(err)
        if str(path) in msg or Path(path).name in msg:
            raise
        raise CommandError(f"{path}: {msg}") from err


def check_input(path: str | os.PathLike[str], folder_ok: bool = False) -> Path:
    """Refuse an input that is missing, unreadable, or a folder where a file is needed.

    Why: fail in the first second with the file named, not deep inside a reader.
    ``folder_ok``: data arguments (a folder of items, or a store that is a folder).
    """
    path = Path(path)
    if not path.exists():
        why = ("a dangling symbolic link" if os.path.lexists(path)
               else "no such file or directory")
        raise FileNotFoundError(errno.ENOENT, why, str(path))
    if path.is_dir():
        if not folder_ok:
            raise IsADirectoryError(errno.EISDIR, "is a directory; a file is needed here",
                                    str(path))
        try:
            with os.scandir(path) as entries:
                next(entries, None)
        except OSError as err:
            raise PermissionError(err.errno or errno.EACCES, "cannot read this folder "
                                  f"({err.strerror})", str(path)) from err
        return path
    if stat.S_ISREG(path.stat().st_mode):  # not a FIFO or device: opening may block
        if not os.access(path, os.R_OK):
            raise PermissionError(errno.EACCES, "not readable (permission denied)", str(path))
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise type(err)(err.errno, err.strerror or str(err), str(path)) from err
    return path


def _check_outputs(args: argparse.Namespace) -> None:
    """Every file the command will write, checked before any work (one rule set)."""
    from .atomic import check_output

    overwrite = getattr(args, "overwrite", False)
    if getattr(args, "output", None):  # a plugin may write a folder here (one mscn wrote
        check_output(args.output, overwrite, folder_ok=True)  # is replaced: --overwrite)
    if getattr(args, "gif", None):
        check_output(args.gif, overwrite)
    log = getattr(args, "train.log_path", None)
    if log:  # appended to, not replaced: existing is fine
        check_output(log, overwrite=True)


def _check_inputs(args: argparse.Namespace) -> None:
    """Every file the command will read, checked before any work."""
    data = {"fit": ["file"], "encode": ["files"], "evaluate": ["files"],
            "meta-train": ["data", "val_data"]}.get(args.command, [])
    files = {"decode": ["file"], "inspect": ["file"]}.get(args.command, [])
    if getattr(args, "checkpoint", None):
        check_input(args.checkpoint)
    for dest in files:
        check_input(getattr(args, dest))
    if args.command == "view":
        for p in args.targets[-2:]:
            check_input(p, folder_ok=True)
    for dest in data:
        value = getattr(args, dest, None) or []
        for p in [value] if isinstance(value, str) else value:
            for m in glob_paths(p) if is_pattern(p) else [p]:  # a quoted glob: its matches
                check_input(m, folder_ok=True)


# -- commands --------------------------------------------------------------------------

OPTIONS = "opt"  # argparse dest prefix of the modality's own options


def cmd_modalities(args) -> int:
    from .registry import list_modalities

    rows = list_modalities()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    print(f"{'name':<12} {'distribution':<22} {'version':<9} {'status':<7} {'in→out':<7} "
          "description")
    for r in rows:
        dims = f"{r.in_dim}→{r.out_dim}" if r.in_dim else "-"
        desc = r.description if r.status == "ok" else r.error
        extra = []
        if r.status == "ok" and r.viewer:
            extra.append("viewer")
        if r.note:
            extra.append(r.note)
        tail = f"  [{'; '.join(extra)}]" if extra else ""
        print(f"{r.name:<12} {r.distribution:<22} {r.version:<9} {r.status:<7} {dims:<7} "
              f"{desc}{tail}")
    return 0


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= size - 8


def cmd_inspect(args) -> int:
    """A checkpoint or an ``.mscn`` stream (told apart by the stream's magic bytes)."""
    from .bitstream import MAGIC

    path = Path(args.file)
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:len(MAGIC)] == MAGIC:
        return _inspect_stream(args)
    if not _looks_like_safetensors(head, path.stat().st_size):
        raise CommandError(f"{path}: neither an mscn checkpoint nor an .mscn stream (not a "
                           "safetensors file, no MSCN magic)")
    if args.checkpoint:
        raise CommandError(f"{path} is a checkpoint; --checkpoint is for checking a stream "
                           "against one")
    return _inspect_checkpoint(args)


def _inspect_checkpoint(args) -> int:
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(args.file)
    cfg = ck.config
    sparsity = ck.rep.describe_sparsity()
    out = {"path": str(args.file), "kind": "checkpoint", "sha256": ck.sha256,
           "format_version": cfg["format_version"], "modality": ck.modality,
           "method": ck.rep.cfg.method,
           "budget": ck.rep.cfg.budget, "architecture": cfg["siren"],
           "method_config": cfg["method_config"], "sparsity": sparsity,
           "modality_state": ck.modality_state, "info": ck.info,
           "codec_tensors": sorted(ck.codec)[:6] + (["…"] if len(ck.codec) > 6 else [])}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    a = cfg["siren"]
    print(f"checkpoint  {args.file}  (sha256 {ck.sha256[:16]}…, "
          f"format v{cfg['format_version']})")
    print(f"modality    {ck.modality}")
    print(f"method      {ck.rep.cfg.method}   budget {ck.rep.cfg.budget}   "
          f"inner steps {ck.rep.cfg.inner_steps}")
    print(f"network     {a['depth']}×{a['width']} SIREN, w0 {a['w0']} (first {a['w0_first']}), "
          f"{a['in_dim']}→{a['out_dim']}")
    print(f"code size   {sparsity.get('code_size')} values per item")
    if sparsity.get("per_layer_nonzero") is not None:
        print(f"non-zero gates per layer  {sparsity['per_layer_nonzero']}")
    train = ck.info.get("train")  # free-form provenance: shown as found, never trusted
    if isinstance(train, dict) and train:
        loss = train.get("best_val_loss")
        loss = f"{loss:.3g}" if isinstance(loss, int | float) else loss
        print(f"training    {train.get('steps_run')} outer steps, best validation loss "
              f"{loss} at step {train.get('best_step')}, {train.get('rollbacks')} rollbacks")
    if ck.info.get("codec"):  # validated with the checkpoint (the codec reads it)
        codec = ck.info["codec"]
        print(f"codec       bits {codec['bit_depths']}, clip ±{codec['clip_sigma']}σ, "
              f"fitted on {codec.get('fitted_on_items', '?')} items"
              + (f" after {codec['refine_steps']} refine steps (encode's default)"
                 if codec.get("refine_steps") else ""))
    for k, v in ck.modality_state.items():
        print(f"{k:<11} {json.dumps(v)[:300]}")
    return 0


def _merged(common: dict, rest: dict) -> dict:
    """An item's metadata: the stream's shared part with the item's own on top."""
    out = dict(common)
    for k, v in rest.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = _merged(out[k], v) if both else v
    return out


def _inspect_stream(args) -> int:
    from .bitstream import read_bitstream

    data = Path(args.file).read_bytes()
    with _about(args.file):
        stream = read_bitstream(data)
    common = stream.extra.get("common")
    common = common if isinstance(common, dict) else {}
    items = []
    for i, (meta, payload) in enumerate(zip(stream.items_meta, stream.payloads, strict=True)):
        m = _merged(common, meta)
        n = m.get("n_values")
        label = next((m[k] for k in ("name", "label")
                      if isinstance(m.get(k), str | int | float)), None)
        items.append({"index": i, "payload_bytes": len(payload),
                      "n_values": n if isinstance(n, int) and n > 0 else None,
                      "label": label})
    counts = [it["n_values"] for it in items]
    n_values = sum(counts) if counts and None not in counts else None
    out = {"path": str(args.file), "kind": "stream", "format_version": stream.version,
           "modality": stream.modality, "bits": stream.bits, "n_items": stream.n_items,
           "bytes": len(data), "payload_bytes": stream.payload_bytes,
           "checkpoint_sha256": stream.checkpoint_hash, "n_values": n_values,
           "bits_per_value": 8 * len(data) / n_values if n_values else None,
           "payload_bits_per_value": 8 * stream.payload_bytes / n_values if n_values else None,
           "items": items}
    if args.checkpoint:
        digest = hashlib.sha256()
        with open(args.checkpoint, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        out["checkpoint"] = {"path": str(args.checkpoint), "sha256": digest.hexdigest(),
                             "matches": digest.hexdigest() == stream.checkpoint_hash}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"stream      {args.file}  (format v{stream.version})")
    print(f"modality    {stream.modality}")
    print(f"bits        {stream.bits}")
    print(f"items       {stream.n_items}")
    print(f"size        {len(data)} bytes: {stream.payload_bytes} payload, "
          f"{len(data) - stream.payload_bytes} header and checksum")
    if n_values:
        print(f"values      {n_values}: {out['bits_per_value']:.4g} bits per value "
              f"({out['payload_bits_per_value']:.4g} for the payload alone)")
    print(f"needs       checkpoint sha256 {stream.checkpoint_hash}")
    if "checkpoint" in out:
        ck = out["checkpoint"]
        verdict = ("matches" if ck["matches"] else
                   f"does NOT match (its sha256 is {ck['sha256'][:16]}…)")
        print(f"checkpoint  {ck['path']} {verdict}")
    shown = 20
    for it in items[:shown]:
        label = f"  {it['label']}" if it["label"] is not None else ""
        values = f", {it['n_values']} values" if it["n_values"] else ""
        print(f"item {it['index']:<6}{label}  {it['payload_bytes']} bytes{values}")
    if len(items) > shown:
        print(f"…           {len(items) - shown} more items (--json lists all)")
    return 0


def is_pattern(path: str | os.PathLike[str]) -> bool:
    """A glob pattern (``*``, ``?``, ``[``) that is not itself an existing path."""
    return glob.has_magic(str(path)) and not os.path.lexists(path)


def glob_paths(pattern: str | os.PathLike[str]) -> list[Path]:
    """What a quoted pattern matches (``**`` = any depth), sorted; hidden names need a
    leading dot in the pattern, as in the shell. Nothing matched: a one-line error."""
    found = sorted(Path(m) for m in glob.glob(str(pattern), recursive=True))
    if not found:
        raise FileNotFoundError(errno.ENOENT, "no files match this pattern", str(pattern))
    return found


def expand_paths(modality, paths) -> list[Path]:
    """Files as given; a glob pattern (quoted, so the shell leaves it) becomes the files and
    stores it matches; a folder (not itself a store the modality opens) becomes every file
    under it the modality can open, sorted (ShapeNet-style trees of one item per file)."""
    out: list[Path] = []
    for given in paths:
        if is_pattern(given):  # folders a pattern matches: only stores the modality opens
            out += [m for m in glob_paths(given)
                    if not m.is_dir() or modality.guess_can_open(m)]
            continue
        p = Path(given)
        if p.is_dir() and not modality.guess_can_open(p):
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and modality.guess_can_open(f))
            if not found:
                raise FileNotFoundError(f"{p}: no files the {modality.name!r} modality "
                                        "can read in this folder")
            out += found
        else:
            out.append(p)
    return list(dict.fromkeys(out))  # a file two patterns match is read once


def _read_items(modality, paths, options, lazy: bool = False) -> Sequence:
    """The items of every path, in order. ``lazy`` and a modality that offers
    ``scan``/``load``: references now, values when a step indexes them."""
    from .streaming import lazy_items, offers_streaming

    items: list = []
    paths = expand_paths(modality, paths)
    stream = lazy and offers_streaming(modality)
    for p in paths:
        with _about(p):
            items += modality.scan(p, options) if stream else modality.read(p, options)
    if not items:
        raise CommandError(f"{', '.join(map(str, paths))}: no items found")
    return lazy_items(modality, items, options) if stream else items


def cmd_meta_train(args) -> int:
    """Meta-train and save a checkpoint; ``--nproc N`` re-runs this command as N ranks.

    Distributed: under torchrun (or ``--nproc``, see ``distributed.launch``) every rank
    reads the data and trains its share of each batch; only rank 0 writes and prints.
    State files go to ``OUTPUT.train/`` (``--state-dir``), with the JSONL log
    (``OUTPUT.train/metrics.jsonl`` unless ``--log-path``) created at the first state save.
    """
    from . import distributed

    nproc = getattr(args, "nproc", None) or 1
    if nproc > 1 and distributed.env_world_size() == 1:
        batch = getattr(args, "train.batch_size", nproc)
        if nproc > batch:
            raise CommandError(f"--nproc {nproc} exceeds --batch-size {batch}: each process "
                               "needs at least one item of every batch")
        return distributed.launch(_without_nproc(args.argv), nproc)
    try:
        return _meta_train(args)
    finally:
        distributed.shutdown()


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _meta_train(args) -> int:
    from . import distributed
    from .allocator import active_allocator
    from .checkpoint import save_checkpoint
    from .pipeline import train_checkpoint

    out = Path(args.output)
    modality, options = args.modality_obj, args.options
    from .streaming import MAX_VAL_ITEMS, is_lazy, item_labels, subset

    items = _read_items(modality, args.data, options, lazy=True)  # lazy where offered
    val_options = options.validation() if hasattr(options, "validation") else None
    if val_options is not None or args.val_data:
        val = _read_items(modality, args.val_data or args.data,
                          val_options if val_options is not None else options, lazy=True)
        from .modality import Modality

        if getattr(type(modality), "item_label", None) is Modality.item_label:
            if not args.val_data or set(map(str, args.val_data)) & set(map(str, args.data)):
                raise ValueError(f"modality {modality.name!r} cannot tell its items apart "
                                 "(no item_label); give --val-data files that are not in "
                                 "--data")
            train = items
        else:
            held = set(item_labels(modality, val))  # lazy items: labels from references
            train = subset(items, [j for j, lab in enumerate(item_labels(modality, items))
                                   if lab not in held])  # never on val
        if not train:
            raise CommandError(f"{', '.join(map(str, args.data))}: every training item is "
                               "also a validation item")
    else:
        order = list(range(len(items)))
        random.Random(args.seed_split).shuffle(order)
        n_val = max(1, round(args.val_fraction * len(items))) if len(items) > 1 else 0
        if is_lazy(items) and n_val > MAX_VAL_ITEMS:  # validation signals stay in memory
            print(f"validating on {MAX_VAL_ITEMS} items, not {n_val} (--val-fraction of "
                  "streamed data is capped)", file=sys.stderr)
            n_val = MAX_VAL_ITEMS
        val = subset(items, order[:n_val])
        train = subset(items, order[n_val:]) or val
    from .meta import TrainConfig
    from .methods import MethodConfig
    from .siren import SirenConfig

    siren = config_from_args(args, SirenConfig, "siren")
    method = config_from_args(args, MethodConfig, "method")
    tcfg = config_from_args(args, TrainConfig, "train")
    tcfg.state_dir = tcfg.state_dir or f"{out}.train"
    default_log = tcfg.log_path is None
    if default_log:
        tcfg.log_path = str(Path(tcfg.state_dir) / "metrics.jsonl")
    from .atomic import check_output
    from .trainstate import has_state, state_files

    # state files are written late (first save): refuse an unwritable place now
    state_dir = Path(tcfg.state_dir)
    check_output(state_files(state_dir)[0] if state_dir.is_dir() else state_dir,
                 overwrite=True)
    if not tcfg.resume and has_state(tcfg.state_dir) and not args.overwrite:
        raise CommandError(f"{tcfg.state_dir}: holds the training state of an earlier run; "
                           "pass --resume to continue it or --overwrite to start over")
    if tcfg.resume:  # refuse before any work (meta_train checks again, with the model)
        from .meta import fingerprint
        from .trainstate import check_resumable

        arch = dataclasses.replace(siren, in_dim=modality.in_dim, out_dim=modality.out_dim)
        n_val = len(val) or max(1, len(train) // 8)  # as meta_train counts it
        check_resumable(tcfg.state_dir, fingerprint(arch, method, tcfg, len(train), n_val))
    distributed.init_from_env(tcfg.device)
    main = distributed.is_main()
    if main and not tcfg.resume:  # a fresh run: nothing of an earlier one may be resumed
        for old in (*state_files(tcfg.state_dir), *([tcfg.log_path] if default_log else [])):
            Path(old).unlink(missing_ok=True)
    if main:
        print(f"meta-training {method.method} on {len(train)} {modality.name} items "
              f"({len(val)} for validation), {siren.depth}×{siren.width} SIREN"
              + (f", {distributed.world_size()} processes" if distributed.world_size() > 1
                 else ""), file=sys.stderr)
    info = {"data": [str(p) for p in args.data], "command": " ".join(sys.argv)}
    if options is not None:
        info["options"] = dataclasses.asdict(options)
    try:
        ck = train_checkpoint(modality, train, val, siren, method, tcfg, info=info,
                              codec_refine_steps=args.codec_refine_steps,
                              options=options)
    except Interrupted as sig:  # the saved state is the point of saving it: say so
        if main and has_state(tcfg.state_dir):
            sig.kept = f"training state kept in {tcfg.state_dir}; continue with --resume"
        raise
    if not main:  # wait for rank 0's codec fit and save: all ranks leave the group together
        distributed.barrier()
        return 0
    digest = save_checkpoint(ck, out, overwrite=args.overwrite)
    distributed.barrier()
    t = ck.info["train"]
    where = [f"checkpoint {out}"]
    if Path(tcfg.log_path).exists():
        where.append(f"log {tcfg.log_path}")
    states = [str(p) for p in state_files(tcfg.state_dir) if p.exists()]
    if states:
        where.append(f"state {', '.join(states)}")
    if tcfg.tensorboard_dir:
        where.append(f"TensorBoard {tcfg.tensorboard_dir}")
    print(f"meta-training done: best validation loss {t['best_val_loss']:.4g} at step "
          f"{t['best_step']}, {t['steps_run']} steps, {t['rollbacks']} rollbacks, "
          f"{t['seconds']:.1f} s; " + "; ".join(where), file=sys.stderr)
    print(json.dumps({"checkpoint": str(out), "sha256": digest, **t,
                      "allocator": active_allocator()}, indent=2))
    return 0


def _fit(args, ck, modality, items, desc: str = "fit"):
    """Adapt items (3 MetaSGD steps); optionally quantised like the bitstream would be.

    Returns the signals, their predictors, their metrics and the predictions of all
    their points (what the metrics scored)."""
    import torch

    from .pipeline import (
        adapt_codes,
        check_refinable,
        predictor,
        quantize_codes,
        refine_codes,
        refine_settings,
        warn_unfamiliar,
    )

    args.refine_steps, args.refine_grow = refine_settings(ck, args.refine_steps,
                                                          args.refine_grow)
    check_refinable(ck.rep, args.refine_steps, args.refine_lr)
    signals = [modality.to_signal(i, args.options) for i in items]
    codes = adapt_codes(ck, modality, signals, steps=args.steps,
                        points_per_step=args.points_per_step, desc=desc)
    if args.steps is None:  # the record is of the meta-learned steps' fits
        warn_unfamiliar(ck, modality, signals, codes, args.points_per_step)
    codes = refine_codes(ck, modality, signals, codes, args.refine_steps, args.refine_lr,
                         bits=args.bits, rate_cap=not args.refine_grow,
                         points_per_step=args.points_per_step,
                         desc=f"{desc}: refine")
    if args.bits:
        _, codes = quantize_codes(ck, codes, args.bits)
    preds = [predictor(ck, modality, c) for c in codes]
    metrics, outputs = [], []
    for s, p in zip(signals, preds, strict=True):
        with torch.no_grad():
            outputs.append(p(s.coords))
        metrics.append(modality.metrics(s, outputs[-1]))
    return signals, preds, metrics, outputs


def _provenance(args, ck, **more) -> dict:
    """What made an output, for the plugin's ``save`` to record in its own format."""
    return {"checkpoint_sha256": ck.sha256,
            "command": shlex.join(["mscn", *getattr(args, "argv", [])]), **more}


def _from_scratch(args, modality, items):
    """No checkpoint: a COIN-style network per item, fitted from scratch with Adam."""
    from .checkpoint import Checkpoint
    from .methods import MethodConfig, build_representation
    from .siren import SirenConfig

    siren = config_from_args(args, ScratchConfig, "scratch")
    print(f"no --checkpoint: fitting a {siren.depth}×{siren.width} SIREN from scratch per item "
          f"({args.steps or siren.coin_steps} Adam steps, COIN-style)", file=sys.stderr)
    modality.fit_state(items)
    arch = SirenConfig(in_dim=modality.in_dim, out_dim=modality.out_dim, width=siren.width,
                       depth=siren.depth, w0=siren.w0, w0_first=siren.w0)
    rep = build_representation(arch, MethodConfig(method="coin", coin_steps=siren.coin_steps,
                                                  coin_lr=siren.coin_lr))
    ck = Checkpoint(rep, modality.name, modality.state(), info={"from_scratch": True})
    ck.sha256 = "none (fitted from scratch)"
    return ck


def _stream_modality(path: str) -> str:
    """The modality a stream names in its header (checked, so a damaged stream is
    reported as such here, not as an unknown modality)."""
    from .bitstream import read_bitstream

    with _about(path):
        return read_bitstream(Path(path).read_bytes()).modality


def _stream_checkpoint(path: str) -> Path:
    """The checkpoint a stream names, by its sha256, in the catalog's folders (the ones
    plugins ship, then ``MSCN_CHECKPOINTS``): ``decode`` needs no ``--checkpoint``."""
    from .bitstream import read_bitstream
    from .catalog import find_checkpoint

    with _about(path):
        digest = read_bitstream(Path(path).read_bytes()).checkpoint_hash
    try:
        return find_checkpoint(digest)
    except FileNotFoundError as err:
        raise CommandError(f"{path}: {err}; or pass --checkpoint") from None


def _use_default_checkpoint(args) -> None:
    """No ``--checkpoint`` for fit/evaluate/encode: the modality's shipped default, where
    it declares one (``default_checkpoint``, a file name the catalog finds), said once."""
    if args.command not in ("fit", "evaluate", "encode"):
        return  # decode: the stream names its checkpoint
    default = getattr(args.modality_obj, "default_checkpoint", None)
    if getattr(args, "from_scratch", False):
        if args.checkpoint is not None:
            raise CommandError("--from-scratch and --checkpoint exclude each other")
        return
    if args.checkpoint is not None or not default or getattr(args, "_default_said", False):
        return
    from .catalog import find_named

    args.checkpoint, args._default_said = str(find_named(default)), True
    print(f"using {args.checkpoint} (the {args.modality_obj.name} modality's default; "
          "--checkpoint to choose another" + (", --from-scratch for none)"
                                              if args.command == "fit" else ")"),
          file=sys.stderr)


def _load(args):
    from .checkpoint import load_checkpoint

    _use_default_checkpoint(args)
    if args.checkpoint is None and args.command == "fit":
        return None, args.modality_obj
    if args.checkpoint is None and args.command == "decode":
        args.checkpoint = str(_stream_checkpoint(args.file))
        print(f"using {args.checkpoint} (the stream's checkpoint, found by its sha256)",
              file=sys.stderr)
    if args.checkpoint is None:
        raise CommandError(f"--checkpoint is required (the {args.modality_obj.name} modality "
                           "ships no default checkpoint)")
    ck = load_checkpoint(args.checkpoint)
    modality = args.modality_obj
    if modality.name != ck.modality:
        raise ValueError(f"{args.checkpoint} is a {ck.modality!r} checkpoint, not "
                         f"{modality.name!r}")
    modality.load_state(ck.modality_state)
    return ck, modality


def _summary(metrics: list[dict]) -> dict:
    """Per-metric mean over items (numbers only): every command's ``mean``."""
    if not metrics:
        return {}
    keys = [k for k in metrics[0] if isinstance(metrics[0][k], int | float)]
    return {k: float(sum(m[k] for m in metrics) / len(metrics)) for k in keys}


def cmd_fit(args) -> int:
    _use_default_checkpoint(args)
    if args.checkpoint is None and args.bits:
        raise CommandError("--bits needs a --checkpoint (its quantiser and entropy model)")
    if args.checkpoint is None and args.refine_steps:
        raise CommandError("--refine-steps needs a --checkpoint (a meta-learned code to "
                           "refine); a fit from scratch takes --steps")
    ck, modality = _load(args)
    items = _read_items(modality, [args.file], args.options)
    if ck is None:
        ck = _from_scratch(args, modality, items)
    signals, preds, metrics, _ = _fit(args, ck, modality, items)
    recon = [modality.reconstruct(s.meta, p, args.options, template=i)
             for s, p, i in zip(signals, preds, items, strict=True)]
    modality.save(recon, args.output, overwrite=args.overwrite,
                  provenance=_provenance(args, ck, bits=args.bits))
    print(json.dumps({"output": args.output, "items": len(items), "mean": _summary(metrics)},
                     indent=2))
    return 0


def cmd_evaluate(args) -> int:
    """Metrics per item and their mean, with skill scores ``1 - MSE/MSE_ref`` (target
    units) against the unadapted network (``skill_vs_training_mean``) and, for plugins
    with ``reference_group``, the per-point mean of the evaluated items of a group
    (``skill_vs_climatology``)."""
    from .pipeline import group_mean_mse, initial_predictions, progress, skill, target_mse

    ck, modality = _load(args)
    rows, all_metrics, kept, groups = [], [], [], []
    group_of = getattr(modality, "reference_group", None)
    with progress(len(args.files), "evaluate", unit="file") as bar:
        for path in args.files:
            items = _read_items(modality, [path], args.options)
            signals, _, metrics, outputs = _fit(args, ck, modality, items,
                                                desc=f"evaluate {Path(path).name}")
            initial = initial_predictions(ck, modality, signals)
            for k, (i, m, s, out) in enumerate(zip(items, metrics, signals, outputs,
                                                   strict=True)):
                mse = target_mse(s, out)
                ref = target_mse(s, initial[k]) if initial else None
                rows.append({"file": str(path), "item": modality.item_label(i), **m,
                             "skill_vs_training_mean": skill(mse, ref)})
                g = group_of(i) if callable(group_of) else None
                kept.append((s, mse) if g is not None else (None, mse))
                groups.append(g)
            all_metrics += metrics
            bar.update()
    if any(g is not None for g in groups):
        held = [s for s, _ in kept if s is not None]
        refs = iter(group_mean_mse(held, [g for g in groups if g is not None]))
        for row, (s, mse) in zip(rows, kept, strict=True):
            row["skill_vs_climatology"] = skill(mse, next(refs)) if s is not None else None
    mean = _summary(all_metrics)
    for key in ("skill_vs_training_mean", "skill_vs_climatology"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            mean[key] = float(sum(values) / len(values))
    report = {"checkpoint": str(args.checkpoint), "bits": args.bits, "per_item": rows,
              "mean": mean}
    text = json.dumps(report, indent=2)
    if args.output:
        from .atomic import save_bytes_atomic

        save_bytes_atomic(text.encode(), args.output, overwrite=args.overwrite)
    print(text if args.verbose or not args.output else json.dumps(report["mean"], indent=2))
    return 0


def cmd_encode(args) -> int:
    """One input: one stream at ``-o FILE`` (as always). Several inputs, a pattern, or
    ``--workers``/``--scheduler``: ``-o`` is a folder and each input gets its own stream
    there (:mod:`mscn_core.archive`); every refusal comes before any encoding."""
    from .atomic import check_output, save_bytes_atomic

    several = (len(args.files) > 1 or any(map(is_pattern, args.files))
               or args.workers is not None or args.scheduler is not None)
    if not several:
        check_input(args.files[0], folder_ok=True)
        check_output(args.destination, args.overwrite)
        if args.summary:
            check_output(args.summary, args.overwrite)
        return _encode_one_stream(args)
    from . import archive

    if args.workers or args.scheduler is not None:
        archive.require_dask()
    inputs = expand_paths(args.modality_obj, args.files)
    for p in inputs:
        check_input(p, folder_ok=True)
    destination = Path(args.destination)
    if args.scheduler is not None:  # its workers may run elsewhere: no relative paths
        inputs, destination = [p.absolute() for p in inputs], destination.absolute()
    jobs = archive.plan_jobs(inputs, destination, args.overwrite)
    if args.summary:
        check_output(args.summary, args.overwrite)
    ck, modality = _load(args)
    local = args.scheduler is None and bool(args.workers)
    settings = archive.Settings(
        checkpoint=str(Path(args.checkpoint).absolute()), sha256=ck.sha256,
        modality=args.modality or ck.modality, options=args.options, bits=args.bits,
        points_per_step=args.points_per_step, max_abs_error=args.max_abs_error,
        max_rel_error=args.max_rel_error, refine_steps=args.refine_steps,
        refine_lr=args.refine_lr, refine_grow=args.refine_grow, overwrite=args.overwrite,
        threads=args.threads or (1 if local else None))  # one per single-threaded worker
    archive.remember(settings, ck, modality)  # a serial run loads it once, here
    if local:
        print(f"encoding {len(jobs)} inputs on a local cluster of {args.workers} workers",
              file=sys.stderr)
    elif args.scheduler is not None:
        print(f"encoding {len(jobs)} inputs on the cluster at {args.scheduler}",
              file=sys.stderr)

    def failed(row: dict) -> None:
        if "error" in row:
            print(f"mscn encode: error: {row['error']}", file=sys.stderr)

    try:
        report = archive.run_jobs(jobs, settings, workers=args.workers or 0,
                                  scheduler=args.scheduler, on_row=failed)
    except Interrupted as sig:  # some streams are complete: say which, not "nothing"
        report = getattr(sig, "summary", None)
        if report is None:
            raise
        print(json.dumps(report, indent=2))
        whole = report["encoded"] + len(report.get("written_while_stopping", []))
        print(f"mscn encode: interrupted ({signal.Signals(sig.signum).name}); {whole} of "
              f"{len(jobs)} streams complete, the others not written", file=sys.stderr)
        return 128 + sig.signum
    text = json.dumps(report, indent=2)
    if args.summary:
        save_bytes_atomic(text.encode(), args.summary, overwrite=args.overwrite)
    print(text)
    return 2 if report["failed"] else 0


def _encode_one_stream(args) -> int:
    from .atomic import save_bytes_atomic
    from .pipeline import encode_items

    ck, modality = _load(args)
    items = _read_items(modality, [args.files[0]], args.options)
    data, rep = encode_items(ck, modality, items, bits=args.bits, options=args.options,
                             points_per_step=args.points_per_step,
                             max_abs_error=args.max_abs_error,
                             max_rel_error=args.max_rel_error,
                             refine_steps=args.refine_steps, refine_lr=args.refine_lr,
                             refine_grow=args.refine_grow)
    save_bytes_atomic(data, args.destination, overwrite=args.overwrite)
    out = {"output": args.destination, "items": len(items), "bytes": rep.n_bytes,
           "payload_bytes": rep.payload_bytes, "values": rep.n_values,
           "bits_per_value": rep.bits_per_value,
           "payload_bits_per_value": rep.payload_bits_per_value}
    if rep.bounds is not None:  # achieved: before the plugin's output cast (see residual)
        out.update(residual_bytes=rep.residual_bytes,
                   error_bound=max(b["bound"] for b in rep.bounds),
                   max_abs_error=max(b["max_abs_error"] for b in rep.bounds))
    text = json.dumps({**out, "mean": _summary(rep.metrics)}, indent=2)
    if args.summary:
        save_bytes_atomic(text.encode(), args.summary, overwrite=args.overwrite)
    print(text)
    return 0


def cmd_decode(args) -> int:
    from .pipeline import decode_stream

    ck, _ = _load(args)
    data = Path(args.file).read_bytes()
    with _about(args.file):
        decoded = decode_stream(data, ck, args.options)
    provenance = _provenance(args, ck, bits=decoded.stream.bits,
                             bits_per_value=decoded.bits_per_value)
    if decoded.max_abs_error is not None:
        provenance["max_abs_error"] = decoded.max_abs_error
    decoded.modality.save(decoded.artifacts, args.output, overwrite=args.overwrite,
                          provenance=provenance)
    print(json.dumps({"output": args.output, "items": decoded.stream.n_items,
                      "bytes": len(data), "bits": decoded.stream.bits,
                      "modality": decoded.stream.modality,
                      "bits_per_value": decoded.bits_per_value}, indent=2))
    return 0


def cmd_view(args) -> int:
    from .modality import has_view

    modality = args.modality_obj
    if not has_view(modality):
        raise ValueError(f"modality {modality.name!r} offers no viewer")
    extra = {}
    if args.gif:
        if "animation" not in inspect.signature(modality.view).parameters:
            raise CommandError(f"the {modality.name!r} viewer makes no animations (--gif)")
        extra["animation"] = args.gif
    truth_path, recon_path = args.targets[-2:]
    truth = _read_items(modality, [truth_path], args.options)
    recon = _read_items(modality, [recon_path], args.options)
    if not args.index < len(truth):
        raise CommandError(f"{truth_path}: --index {args.index} out of range "
                           f"(0..{len(truth) - 1})")
    t = truth[args.index]
    r = recon[args.index] if len(recon) == len(truth) else recon[0]
    print(modality.view(t, r, args.output, args.options, overwrite=args.overwrite, **extra))
    return 0


# -- which modality a command line is about (before the full parse) ------------------

_VALUE_FLAGS = ("-o", "--output", "--gif", "--index")
MODALITY_COMMANDS = ("meta-train", "fit", "evaluate", "encode", "decode", "view")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive_int(text: str) -> int:
    """Parse-time check: a count that must be at least 1 (threads, points per step)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    """Parse-time check: steps and indices (``--steps -5`` used to act as 0)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    """Parse-time check: an error bound, finite and > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _bits(text: str) -> int:
    """Parse-time check: the quantiser bit depths a stream can hold."""
    from .bitstream import MAX_BITS, MIN_BITS

    value = _int(text)
    if not MIN_BITS <= value <= MAX_BITS:
        raise argparse.ArgumentTypeError(f"must be {MIN_BITS}..{MAX_BITS}, got {value}")
    return value


def _scan(argv: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
    """Command, the values of --modality/--checkpoint/--data, and leading positionals."""
    command, flags, positionals = None, {}, []
    flag_seen, skip = False, False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
        elif command is None:
            command = None if tok.startswith("-") else tok
        elif tok.partition("=")[0] in ("--modality", "--checkpoint", "--data"):
            key, eq, val = tok.partition("=")
            if not eq and i + 1 < len(argv):
                val, skip = argv[i + 1], True
            flags.setdefault(key, val)
        elif tok.startswith("-"):
            flag_seen = True
        elif not flag_seen or (command == "view" and argv[i - 1] not in _VALUE_FLAGS
                               and Path(tok).exists()):
            positionals.append(tok)  # view: TRUTH RECON may also follow flags
    return command, flags, positionals


def resolve_modality(argv: list[str]):
    """The modality a command is about: --modality, else the checkpoint's, else the
    file's (content sniffing); for ``view`` a leading viewer name. None: not known."""
    from .registry import get_modality, guess_modality, view_modality

    command, flags, positionals = _scan(argv)
    if command not in MODALITY_COMMANDS:
        return None
    asks_help = "-h" in argv or "--help" in argv
    name = flags.get("--modality")
    if name is None and command == "view" and len(positionals) >= 3:
        name = view_modality(positionals[0])
        if name is None:
            from .registry import ModalityError

            raise ModalityError(f"no installed modality offers a viewer called "
                                f"{positionals[0]!r}")
    if name is None and "--checkpoint" in flags and not (
            asks_help and not Path(flags["--checkpoint"]).is_file()):
        from .checkpoint import CheckpointError, read_config

        check_input(flags["--checkpoint"])  # missing or unreadable: say so, not "modality"
        try:
            name = read_config(flags["--checkpoint"])["modality"]
        except CheckpointError:
            return None  # the command reports it in full
    if name is None:
        path = flags.get("--data") or (positionals[-2] if command == "view" and
                                       len(positionals) >= 2 else
                                       positionals[0] if positionals else None)
        if path is None or (asks_help and not Path(path).exists()):
            return None
        if is_pattern(path):  # a quoted glob: guess from its first file (or store)
            found = glob_paths(path)
            path = next((f for f in found if f.is_file()), found[0])
        check_input(path, folder_ok=True)  # missing or unreadable: say so before guessing
        name = _stream_modality(path) if command == "decode" else guess_modality(path)
    return get_modality(name)


def build_parser(modality=None, light: bool = False) -> argparse.ArgumentParser:
    """The full parser; with a modality, its options become flags of its commands.

    ``light``: without the meta-training config flags (enough to list the commands).
    """
    p = argparse.ArgumentParser(
        prog="mscn", description="Meta-Learning Sparse Compression Networks: meta-learn a "
        "shared SIREN, represent each signal by a few hundred sparse modulations, write "
        "them to a real bitstream and decode them back.")
    p.add_argument("--version", action=_VersionAction, help="print the version and exit")
    p.add_argument("--debug", action="store_true", help="show the full traceback of a "
                   "failure (also accepted after the command)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    hint = ("the modality's own options are listed once the "
            "modality is known: add --modality NAME or --checkpoint CKPT to --help")

    s = sub.add_parser("modalities", help="list installed modality plugins and their status")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_modalities)

    s = sub.add_parser("inspect", help="print a checkpoint's config, method, budget and "
                       "gates, or an .mscn stream's header")
    s.add_argument("file", metavar="FILE", help="a checkpoint or an .mscn stream")
    s.add_argument("--checkpoint", metavar="CKPT",
                   help="for a stream: say whether it was encoded with this checkpoint")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    def modality_flags(s):
        threads_flag(s)
        s.add_argument("--modality", metavar="NAME",
                       help="modality plugin, NAME or DIST:NAME (default: the checkpoint's, "
                       "else guessed from the file)")
        opts = getattr(modality, "options", None) if modality is not None else None
        if isinstance(opts, type) and dataclasses.is_dataclass(opts):
            add_config_flags(s, opts, f"{modality.name} options", prefix=OPTIONS)

    def threads_flag(s):
        s.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                       help="CPU threads for torch (default: torch's; 1 is often fastest for "
                       "small networks on a busy machine)")

    def out_flags(s):
        s.add_argument("-o", "--output", required=True, help="output file")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output")

    def budget_flag(s):
        s.add_argument("--points-per-step", type=_positive_int, default=None, metavar="N",
                       help="samples per inner step for items larger than that (bounded "
                       "memory; default: the modality's)")

    def refine_flags(s):
        s.add_argument("--refine-steps", type=_nonnegative_int, default=None, metavar="N",
                       help="after the meta-learned steps, N Adam steps on each item's coded "
                       "values (same positions, same stream format; best iterate kept): "
                       "slower encoding, better on items unlike the training set "
                       "(default: the steps the checkpoint's codec was fitted after, "
                       "shown by `mscn inspect`; 0, the paper's, for most)")
        # default None = pipeline.REFINE_LR (the parser must not import torch for it; a test
        # keeps this help's number equal to it)
        s.add_argument("--refine-lr", type=_positive_float, default=None, metavar="LR",
                       help="Adam learning rate of --refine-steps (default 0.01, measured by "
                       "bench/refine_steps.py)")
        s.add_argument("--refine-grow", action=argparse.BooleanOptionalAction, default=None,
                       help="with --bits: let --refine-steps make the payload bigger (without "
                       "it only iterates costing no more bits than the meta-learned codes "
                       "are kept, which on items unlike the training set is often none; "
                       "default: on for a checkpoint whose codec was fitted on refined "
                       "codes, else off)")

    s = sub.add_parser("meta-train", help="meta-learn a checkpoint (codec) from data files",
                       epilog=hint)
    s.add_argument("--data", nargs="+", required=True, metavar="FILE")
    out_flags(s)
    s.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of items held out for validation/keep-best (default 0.1)")
    s.add_argument("--seed-split", type=int, default=0, help="seed of the train/val split")
    s.add_argument("--val-data", nargs="+", metavar="FILE",
                   help="validation items from these files (never trained on) instead of a "
                   "random split")
    s.add_argument("--codec-refine-steps", type=_nonnegative_int, default=0, metavar="N",
                   help="fit the quantiser and entropy models on the training items' codes "
                   "after N refine steps, and make N encode's default --refine-steps for "
                   "this checkpoint (default 0: the meta-learned codes)")
    modality_flags(s)
    if not light:  # the engine's configs need torch: not for the top-level --help
        from .meta import TrainConfig
        from .methods import MethodConfig
        from .siren import SirenConfig

        add_config_flags(s, SirenConfig, "siren", skip=("in_dim", "out_dim"))
        add_config_flags(s, MethodConfig, "method")
        add_config_flags(s, TrainConfig, "train", skip=("resume",))
    s.add_argument("--resume", action="store_true", dest="train.resume",
                   help="continue an interrupted run from its state file (OUTPUT.train/"
                   "state.pt, else state.prev.pt): the same checkpoint as an uninterrupted "
                   "run; refused if the settings differ")
    s.add_argument("--nproc", type=_positive_int, default=None, metavar="N",
                   help="train on N processes of this machine (torch.distributed: gloo on "
                   "CPU, nccl on CUDA), same result as one; or launch with torchrun")
    s.set_defaults(func=cmd_meta_train)

    def fit_flags(s):
        s.add_argument("--checkpoint", default=None,
                       help="meta-learned checkpoint (default: the modality's shipped "
                       "default, where it has one; fit without either: from scratch)")
        s.add_argument("--steps", type=_nonnegative_int, default=None,
                       help="inner steps (default: the checkpoint's, 3)")
        s.add_argument("--bits", type=_bits, default=None,
                       help="quantise modulations to this many bits (2..8), as the bitstream "
                       "would")
        budget_flag(s)
        refine_flags(s)

    s = sub.add_parser("fit", help="represent every item of a file; write the reconstruction "
                       "(without --checkpoint: a network fitted from scratch, COIN-style)",
                       epilog=hint)
    s.add_argument("file")
    fit_flags(s)
    s.add_argument("--from-scratch", action="store_true",
                   help="no checkpoint: fit a network from scratch per item (see below), "
                   "also where the modality ships a default checkpoint")
    add_config_flags(s, ScratchConfig, "from scratch (no --checkpoint)", prefix="scratch")
    out_flags(s)
    modality_flags(s)
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("evaluate", help="metrics per item and mean, as JSON", epilog=hint)
    s.add_argument("files", nargs="+")
    fit_flags(s)
    s.add_argument("-o", "--output", help="write the JSON report here")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("-v", "--verbose", action="store_true", help="print per-item rows too")
    modality_flags(s)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("encode", help="compress a file into an .mscn bitstream (many files: "
                       "one each, optionally on a dask cluster)", epilog=hint)
    s.add_argument("files", nargs="+", metavar="FILE",
                   help="one input: one stream at -o FILE; several (folders, patterns): one "
                   "stream each, -o names the output folder (DIR/<name>.mscn)")
    s.add_argument("--checkpoint", default=None,
                   help="meta-learned checkpoint (default: the modality's shipped default, "
                   "where it has one)")
    scale = s.add_argument_group("many inputs (needs the 'scale' extra for a cluster)")
    where = scale.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_nonnegative_int, default=None, metavar="N",
                       help="encode on a dask LocalCluster of N single-threaded worker "
                       "processes (0: one after the other, here); -o is a folder")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="encode on an existing dask cluster (tcp://HOST:8786); the "
                       "workers must see the inputs, checkpoint and -o folder at the same "
                       "paths; -o is a folder")
    scale.add_argument("--summary", default=None, metavar="FILE.json",
                       help="also write the JSON summary here")
    s.add_argument("--bits", type=_bits, default=6, help="quantisation bits 2..8 (default 6)")
    bound = s.add_mutually_exclusive_group()
    bound.add_argument("--max-abs-error", type=_positive_float, default=None, metavar="E",
                       help="guarantee |decoded - input| <= E at every valid point (the "
                       "artifact's units) by also coding the residual")
    bound.add_argument("--max-rel-error", type=_positive_float, default=None, metavar="R",
                       help="as --max-abs-error with E = R x (max - min) of each item's "
                       "valid values")
    budget_flag(s)
    refine_flags(s)
    # its own dest: a folder is a valid -o here, checked by cmd_encode, not _check_outputs
    s.add_argument("-o", "--output", required=True, dest="destination", metavar="OUTPUT",
                   help="output file (several inputs: output folder, which must exist)")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    modality_flags(s)
    s.set_defaults(func=cmd_encode)

    s = sub.add_parser("decode", help="rebuild the artifacts from an .mscn file",
                       epilog=hint)
    s.add_argument("file")
    s.add_argument("--checkpoint", default=None,
                   help="the checkpoint the stream was encoded with (default: found by the "
                   "sha256 the stream names, among the checkpoints plugins ship and the "
                   "folders in MSCN_CHECKPOINTS)")
    out_flags(s)
    modality_flags(s)
    s.set_defaults(func=cmd_decode)

    s = sub.add_parser("view", help="render truth beside reconstruction to PNG", epilog=hint,
                       usage="mscn view [VIEWER] TRUTH RECON -o PNG [options]")
    s.add_argument("targets", nargs="+", metavar="[VIEWER] TRUTH RECON",
                   help="optional viewer or modality name, the original file "
                   "and the reconstruction (from mscn fit or decode)")
    s.add_argument("--index", type=_nonnegative_int, default=0,
                   help="which item of the files to show (from 0)")
    s.add_argument("--gif", default=None,
                   help="also write an animation here, when the viewer makes one")
    out_flags(s)
    modality_flags(s)
    s.set_defaults(func=cmd_view)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a plugin name conflict, a field outside the training range) as one line."""
    print(f"mscn: warning: {message}", file=sys.stderr if file is None else file)


class _VersionAction(argparse.Action):
    """``--version``: read from the installed metadata only when asked (keeps --help fast)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    """``mscn <version> (torch <version>)``, without importing torch."""
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"mscn {version('mscn')} (torch {version('torch')})"


def main(argv: list[str] | None = None) -> int:
    """The ``mscn`` command; returns its exit code (0 ok, 1 internal error, 2 bad input or
    usage, 128+N killed by signal N). ``--debug`` anywhere: tracebacks for failures."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    warnings.showwarning = _one_line_warning
    command = _scan(argv)[0]
    return guarded(command, lambda: _run(argv, command), debug=debug)


def _run(argv: list[str], command: str | None) -> int:
    modality = resolve_modality(argv) if command in MODALITY_COMMANDS else None
    # Only meta-train has the engine's config flags (they import torch): every other
    # command, and the top-level --help, gets the light parser.
    args = build_parser(modality, light=command != "meta-train").parse_args(argv)
    args.argv = argv  # for provenance (the command line that made an output)
    if args.command in MODALITY_COMMANDS:
        if modality is None:
            need = {"meta-train": "--modality", "view": "--modality",
                    "fit": "--checkpoint or --modality"}.get(args.command, "--checkpoint")
            raise CommandError(f"cannot tell the modality; pass {need}")
        args.modality_obj = modality
        opts = getattr(modality, "options", None)
        args.options = (config_from_args(args, opts, OPTIONS)
                        if isinstance(opts, type) and dataclasses.is_dataclass(opts) else None)
        if args.command == "view" and len(args.targets) not in (2, 3):
            raise CommandError("give TRUTH RECON, optionally after a viewer name")
    _check_outputs(args)  # before any work: a refusal after the compute loses the run
    _check_inputs(args)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    from mscn_core.entry import console

    console()
