"""The ``mscn`` command line: meta-train, fit, evaluate, encode, decode, view, inspect.

The CLI knows no modality: each plugin declares its options as a dataclass, and once
the command's modality is known (``--modality``, the checkpoint, or the file) those
options become flags of the command, so ``mscn fit --checkpoint CKPT --help`` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import random
import re
import sys
import types
import typing
import warnings
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


def cmd_inspect(args) -> int:
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(args.checkpoint)
    cfg = ck.config
    sparsity = ck.rep.describe_sparsity()
    out = {"path": str(args.checkpoint), "sha256": ck.sha256, "format_version":
           cfg["format_version"], "modality": ck.modality, "method": ck.rep.cfg.method,
           "budget": ck.rep.cfg.budget, "architecture": cfg["siren"],
           "method_config": cfg["method_config"], "sparsity": sparsity,
           "modality_state": ck.modality_state, "info": ck.info,
           "codec_tensors": sorted(ck.codec)[:6] + (["…"] if len(ck.codec) > 6 else [])}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    a = cfg["siren"]
    print(f"checkpoint  {args.checkpoint}  (sha256 {ck.sha256[:16]}…, "
          f"format v{cfg['format_version']})")
    print(f"modality    {ck.modality}")
    print(f"method      {ck.rep.cfg.method}   budget {ck.rep.cfg.budget}   "
          f"inner steps {ck.rep.cfg.inner_steps}")
    print(f"network     {a['depth']}×{a['width']} SIREN, w0 {a['w0']} (first {a['w0_first']}), "
          f"{a['in_dim']}→{a['out_dim']}")
    print(f"code size   {sparsity.get('code_size')} values per item")
    if sparsity.get("per_layer_nonzero") is not None:
        print(f"non-zero gates per layer  {sparsity['per_layer_nonzero']}")
    train = ck.info.get("train", {})
    if train:
        print(f"training    {train.get('steps_run')} outer steps, best validation loss "
              f"{train.get('best_val_loss'):.3g} at step {train.get('best_step')}, "
              f"{train.get('rollbacks')} rollbacks")
    if ck.info.get("codec"):
        codec = ck.info["codec"]
        print(f"codec       bits {codec['bit_depths']}, clip ±{codec['clip_sigma']}σ, "
              f"fitted on {codec['fitted_on_items']} items")
    for k, v in ck.modality_state.items():
        print(f"{k:<11} {json.dumps(v)[:300]}")
    return 0


def expand_paths(modality, paths) -> list[Path]:
    """Files as given; a folder (not itself a store the modality opens) becomes every file
    under it the modality can open, sorted (ShapeNet-style trees of one item per file)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not modality.guess_can_open(p):
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and modality.guess_can_open(f))
            if not found:
                raise FileNotFoundError(f"{p}: no files the {modality.name!r} modality "
                                        "can read in this folder")
            out += found
        else:
            out.append(p)
    return out


def _read_items(modality, paths, options) -> list:
    items = []
    paths = expand_paths(modality, paths)
    for p in paths:
        items += modality.read(p, options)
    if not items:
        raise SystemExit(f"error: no items found in {', '.join(map(str, paths))}")
    return items


def cmd_meta_train(args) -> int:
    from .allocator import active_allocator
    from .checkpoint import save_checkpoint
    from .pipeline import train_checkpoint

    _refuse_existing(args)
    out = Path(args.output)
    modality, options = args.modality_obj, args.options
    items = _read_items(modality, args.data, options)
    val_options = options.validation() if hasattr(options, "validation") else None
    if val_options is not None or args.val_data:
        val = _read_items(modality, args.val_data or args.data,
                          val_options if val_options is not None else options)
        from .modality import Modality

        if getattr(type(modality), "item_label", None) is Modality.item_label:
            if not args.val_data or set(map(str, args.val_data)) & set(map(str, args.data)):
                raise ValueError(f"modality {modality.name!r} cannot tell its items apart "
                                 "(no item_label); give --val-data files that are not in "
                                 "--data")
            train = items
        else:
            held = {modality.item_label(v) for v in val}
            train = [i for i in items if modality.item_label(i) not in held]  # never on val
        if not train:
            raise SystemExit("error: every training item is also a validation item")
    else:
        order = list(range(len(items)))
        random.Random(args.seed_split).shuffle(order)
        n_val = max(1, round(args.val_fraction * len(items))) if len(items) > 1 else 0
        val = [items[i] for i in order[:n_val]]
        train = [items[i] for i in order[n_val:]] or val
    from .meta import TrainConfig
    from .methods import MethodConfig
    from .siren import SirenConfig

    siren = config_from_args(args, SirenConfig, "siren")
    method = config_from_args(args, MethodConfig, "method")
    tcfg = config_from_args(args, TrainConfig, "train")
    print(f"meta-training {method.method} on {len(train)} {modality.name} items ({len(val)} "
          f"for validation), {siren.depth}×{siren.width} SIREN", file=sys.stderr)
    info = {"data": [str(p) for p in args.data], "command": " ".join(sys.argv)}
    if options is not None:
        info["options"] = dataclasses.asdict(options)
    ck = train_checkpoint(modality, train, val, siren, method, tcfg, info=info,
                          options=options)
    digest = save_checkpoint(ck, out, overwrite=True)
    print(json.dumps({"checkpoint": str(out), "sha256": digest, **ck.info["train"],
                      "allocator": active_allocator()}, indent=2))
    return 0


def _fit(args, ck, modality, items):
    """Adapt items (3 MetaSGD steps); optionally quantised like the bitstream would be."""
    import torch

    from .pipeline import adapt_codes, predictor, quantize_codes

    signals = [modality.to_signal(i, args.options) for i in items]
    codes = adapt_codes(ck, modality, signals, steps=args.steps,
                        points_per_step=args.points_per_step)
    if args.bits:
        _, codes = quantize_codes(ck, codes, args.bits)
    preds = [predictor(ck, modality, c) for c in codes]
    metrics = []
    for s, p in zip(signals, preds, strict=True):
        with torch.no_grad():
            metrics.append(modality.metrics(s, p(s.coords)))
    return signals, preds, metrics


def _refuse_existing(args) -> None:
    """Fail before any work if the output exists (the writers also refuse, atomically)."""
    out = getattr(args, "output", None)
    if out and Path(out).exists() and not getattr(args, "overwrite", False):
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")


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


def _load(args):
    from .checkpoint import load_checkpoint

    _refuse_existing(args)
    if args.checkpoint is None and args.command == "fit":
        return None, args.modality_obj
    if args.checkpoint is None:
        raise ValueError("--checkpoint is required")
    ck = load_checkpoint(args.checkpoint)
    modality = args.modality_obj
    if modality.name != ck.modality:
        raise ValueError(f"{args.checkpoint} is a {ck.modality!r} checkpoint, not "
                         f"{modality.name!r}")
    modality.load_state(ck.modality_state)
    return ck, modality


def _summary(metrics: list[dict]) -> dict:
    keys = [k for k in metrics[0] if isinstance(metrics[0][k], int | float)]
    return {k: float(sum(m[k] for m in metrics) / len(metrics)) for k in keys}


def cmd_fit(args) -> int:
    ck, modality = _load(args)
    items = _read_items(modality, [args.file], args.options)
    if ck is None:
        if args.bits:
            raise ValueError("--bits needs a --checkpoint (its quantiser and entropy model)")
        ck = _from_scratch(args, modality, items)
    signals, preds, metrics = _fit(args, ck, modality, items)
    recon = [modality.reconstruct(s.meta, p, args.options, template=i)
             for s, p, i in zip(signals, preds, items, strict=True)]
    modality.save(recon, args.output, overwrite=args.overwrite,
                  provenance={"checkpoint_sha256": ck.sha256})
    print(json.dumps({"output": args.output, "items": len(items), "mean": _summary(metrics)},
                     indent=2))
    return 0


def cmd_evaluate(args) -> int:
    ck, modality = _load(args)
    rows, all_metrics = [], []
    for path in args.files:
        items = _read_items(modality, [path], args.options)
        _, _, metrics = _fit(args, ck, modality, items)
        for i, m in zip(items, metrics, strict=True):
            rows.append({"file": str(path), "item": modality.item_label(i), **m})
        all_metrics += metrics
    report = {"checkpoint": str(args.checkpoint), "bits": args.bits, "per_item": rows,
              "mean": _summary(all_metrics)}
    text = json.dumps(report, indent=2)
    if args.output:
        from .atomic import save_bytes_atomic

        save_bytes_atomic(text.encode(), args.output, overwrite=args.overwrite)
    print(text if args.verbose or not args.output else json.dumps(report["mean"], indent=2))
    return 0


def cmd_encode(args) -> int:
    from .atomic import save_bytes_atomic
    from .pipeline import encode_items

    ck, modality = _load(args)
    items = _read_items(modality, [args.file], args.options)
    data, rep = encode_items(ck, modality, items, bits=args.bits, options=args.options,
                             points_per_step=args.points_per_step)
    save_bytes_atomic(data, args.output, overwrite=args.overwrite)
    print(json.dumps({"output": args.output, "items": len(items), "bytes": rep.n_bytes,
                      "payload_bytes": rep.payload_bytes, "values": rep.n_values,
                      "bits_per_value": rep.bits_per_value,
                      "payload_bits_per_value": rep.payload_bits_per_value,
                      "mean": _summary(rep.metrics)}, indent=2))
    return 0


def cmd_decode(args) -> int:
    from .pipeline import decode_stream

    ck, _ = _load(args)
    data = Path(args.file).read_bytes()
    decoded = decode_stream(data, ck, args.options)
    provenance = {"checkpoint_sha256": ck.sha256}
    if decoded.bits_per_value is not None:
        provenance["bits_per_value"] = decoded.bits_per_value
    decoded.modality.save(decoded.artifacts, args.output, overwrite=args.overwrite,
                          provenance=provenance)
    print(json.dumps({"output": args.output, "items": decoded.stream.n_items,
                      "bytes": len(data), "bits": decoded.stream.bits,
                      "modality": decoded.stream.modality,
                      "bits_per_value": decoded.bits_per_value}, indent=2))
    return 0


def cmd_view(args) -> int:
    from .modality import has_view

    _refuse_existing(args)
    modality = args.modality_obj
    if not has_view(modality):
        raise ValueError(f"modality {modality.name!r} offers no viewer")
    truth_path, recon_path = args.targets[-2:]
    truth = _read_items(modality, [truth_path], args.options)
    recon = _read_items(modality, [recon_path], args.options)
    if not 0 <= args.index < len(truth):
        raise SystemExit(f"error: --index {args.index} out of range (0..{len(truth) - 1})")
    t = truth[args.index]
    r = recon[args.index] if len(recon) == len(truth) else recon[0]
    extra = {}
    if args.gif:
        if "animation" not in inspect.signature(modality.view).parameters:
            raise ValueError(f"the {modality.name!r} viewer makes no animations (--gif)")
        extra["animation"] = args.gif
    print(modality.view(t, r, args.output, args.options, overwrite=args.overwrite, **extra))
    return 0


# -- which modality a command line is about (before the full parse) ------------------

_VALUE_FLAGS = ("-o", "--output", "--gif", "--index")
MODALITY_COMMANDS = ("meta-train", "fit", "evaluate", "encode", "decode", "view")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
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
    name = flags.get("--modality")
    if name is None and command == "view" and len(positionals) >= 3:
        name = view_modality(positionals[0])
        if name is None:
            from .registry import ModalityError

            raise ModalityError(f"no installed modality offers a viewer called "
                                f"{positionals[0]!r}")
    if name is None and "--checkpoint" in flags and Path(flags["--checkpoint"]).is_file():
        from .checkpoint import CheckpointError, read_config

        try:
            name = read_config(flags["--checkpoint"])["modality"]
        except CheckpointError:
            return None  # the command reports it in full
    if name is None:
        path = flags.get("--data") or (positionals[-2] if command == "view" and
                                       len(positionals) >= 2 else
                                       positionals[0] if positionals else None)
        if path is None or not Path(path).exists():
            return None
        name = guess_modality(path)
    return get_modality(name)


def build_parser(modality=None, light: bool = False) -> argparse.ArgumentParser:
    """The full parser; with a modality, its options become flags of its commands.

    ``light``: without the meta-training config flags (enough to list the commands).
    """
    p = argparse.ArgumentParser(
        prog="mscn", description="Meta-Learning Sparse Compression Networks: meta-learn a "
        "shared SIREN, represent each signal by a few hundred sparse modulations, write "
        "them to a real bitstream and decode them back.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    hint = ("the modality's own options are listed once the "
            "modality is known: add --modality NAME or --checkpoint CKPT to --help")

    s = sub.add_parser("modalities", help="list installed modality plugins and their status")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_modalities)

    s = sub.add_parser("inspect", help="print a checkpoint's config, method, budget and gates")
    s.add_argument("checkpoint")
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
    modality_flags(s)
    if not light:  # the engine's configs need torch: not for the top-level --help
        from .meta import TrainConfig
        from .methods import MethodConfig
        from .siren import SirenConfig

        add_config_flags(s, SirenConfig, "siren", skip=("in_dim", "out_dim"))
        add_config_flags(s, MethodConfig, "method")
        add_config_flags(s, TrainConfig, "train")
    s.set_defaults(func=cmd_meta_train)

    def fit_flags(s):
        s.add_argument("--checkpoint", required=True)
        s.add_argument("--steps", type=int, default=None,
                       help="inner steps (default: the checkpoint's, 3)")
        s.add_argument("--bits", type=int, default=None,
                       help="quantise modulations to this many bits, as the bitstream would")
        budget_flag(s)

    s = sub.add_parser("fit", help="represent every item of a file; write the reconstruction "
                       "(without --checkpoint: a network fitted from scratch, COIN-style)",
                       epilog=hint)
    s.add_argument("file")
    fit_flags(s)
    s._option_string_actions["--checkpoint"].required = False
    s._option_string_actions["--checkpoint"].help = ("meta-learned checkpoint (without it: "
                                                      "fit from scratch, see below)")
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

    s = sub.add_parser("encode", help="compress a file into an .mscn bitstream", epilog=hint)
    s.add_argument("file")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--bits", type=int, default=6, help="quantisation bits 2..8 (default 6)")
    budget_flag(s)
    out_flags(s)
    modality_flags(s)
    s.set_defaults(func=cmd_encode)

    s = sub.add_parser("decode", help="rebuild the artifacts from an .mscn file",
                       epilog=hint)
    s.add_argument("file")
    s.add_argument("--checkpoint", required=True)
    out_flags(s)
    modality_flags(s)
    s.set_defaults(func=cmd_decode)

    s = sub.add_parser("view", help="render truth beside reconstruction to PNG", epilog=hint,
                       usage="mscn view [VIEWER] TRUTH RECON -o PNG [options]")
    s.add_argument("targets", nargs="+", metavar="[VIEWER] TRUTH RECON",
                   help="optional viewer or modality name, the original file "
                   "and the reconstruction (from mscn fit or decode)")
    s.add_argument("--index", type=int, default=0, help="which item of the files to show")
    s.add_argument("--gif", default=None,
                   help="also write an animation here, when the viewer makes one")
    out_flags(s)
    modality_flags(s)
    s.set_defaults(func=cmd_view)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a plugin name conflict, a field outside the training range) as one line."""
    print(f"mscn: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _one_line_warning
    command = _scan(argv)[0]
    modality = None
    if command in MODALITY_COMMANDS:
        from .registry import ModalityError

        try:
            modality = resolve_modality(argv)
        except ModalityError as err:
            print(f"mscn {command}: error: {err}", file=sys.stderr)
            return 2
    args = build_parser(modality, light=command is None).parse_args(argv)
    from .bitstream import BitstreamError
    from .checkpoint import CheckpointError
    from .registry import ModalityError

    if args.command in MODALITY_COMMANDS:
        if modality is None:
            need = {"meta-train": "--modality", "view": "--modality",
                    "fit": "--checkpoint or --modality"}.get(args.command, "--checkpoint")
            print(f"mscn {args.command}: error: cannot tell the modality; pass {need}",
                  file=sys.stderr)
            return 2
        args.modality_obj = modality
        opts = getattr(modality, "options", None)
        args.options = (config_from_args(args, opts, OPTIONS)
                        if isinstance(opts, type) and dataclasses.is_dataclass(opts) else None)
        if args.command == "view" and len(args.targets) not in (2, 3):
            print("mscn view: error: give TRUTH RECON, optionally after a viewer name",
                  file=sys.stderr)
            return 2
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    known = (BitstreamError, CheckpointError, ModalityError, FileExistsError,
             FileNotFoundError, ValueError)
    try:
        return int(args.func(args) or 0)
    except known as err:
        print(f"mscn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from mscn_core.entry import console

    console()
