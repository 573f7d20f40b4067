"""The ``mscn`` command line: meta-train, fit, evaluate, encode, decode, view, inspect."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
import sys
import types
import typing
from pathlib import Path

from .meta import TrainConfig
from .methods import GRAD_IMPLS, METHODS, MethodConfig
from .siren import SirenConfig

# -- dataclass ⇄ argparse: every config field is a flag, defaults are the paper's --------


def _flag_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _flag_type(args[0])
        return lambda s: None if s.lower() == "none" else inner(s)
    if tp is bool:
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    return tp


def field_docs(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each dataclass field: one place documents a setting."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs = {}
    for m in re.finditer(r"^\s+(\w+):[^=\n]+=[^#\n]*#\s*(.+)$", source, re.MULTILINE):
        docs[m.group(1)] = m.group(2).strip()
    return docs


def add_config_flags(parser: argparse.ArgumentParser, cls, title: str, skip=()) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        doc = docs.get(f.name, "").replace("%", "%%")
        kw = {"type": _flag_type(hints[f.name]), "default": f.default,
              "metavar": f.name.upper(), "help": f"{doc} (default: {f.default})".lstrip()}
        choices = {"method": METHODS, "grad_impl": GRAD_IMPLS}.get(f.name)
        if choices:
            kw["choices"] = choices
            del kw["metavar"]  # argparse then shows {a,b,…}
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"{title}.{f.name}", **kw)


def config_from_args(args: argparse.Namespace, cls, title: str):
    values = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(title + ".")}
    return cls(**values)


# -- commands --------------------------------------------------------------------------


def _modality(name: str | None, path: str | None):
    from .registry import get_modality, guess_modality

    return get_modality(name or guess_modality(path))


def _read_items(modality, paths, args) -> list:
    items = []
    for p in paths:
        items += modality.read(p, var=getattr(args, "var", None), sel=getattr(args, "sel", None))
    if not items:
        raise SystemExit(f"error: no items found in {', '.join(map(str, paths))}")
    return items


def cmd_modalities(args) -> int:
    from .registry import list_modalities

    rows = list_modalities()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    print(f"{'name':<12} {'distribution':<18} {'version':<9} {'status':<7} {'in→out':<7} "
          "description")
    for r in rows:
        dims = f"{r.in_dim}→{r.out_dim}" if r.in_dim else "-"
        desc = r.description if r.status == "ok" else r.error
        print(f"{r.name:<12} {r.distribution:<18} {r.version:<9} {r.status:<7} {dims:<7} {desc}")
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


def _identity(item) -> str:
    """Which item this is (scalar coordinates and name), to keep splits disjoint."""
    coords = getattr(item, "coords", None)
    if coords is None:
        return str(id(item))
    scal = sorted((str(k), str(v.values)) for k, v in coords.items() if v.ndim == 0)
    return f"{getattr(item, 'name', '')}|{scal}|{getattr(item, 'shape', '')}"


def cmd_meta_train(args) -> int:
    import random

    from .allocator import active_allocator
    from .checkpoint import save_checkpoint
    from .pipeline import train_checkpoint

    _refuse_existing(args)
    out = Path(args.output)
    modality = _modality(args.modality, args.data[0])
    items = _read_items(modality, args.data, args)
    if args.val_sel:
        val = _read_items(modality, args.val_data or args.data,
                          argparse.Namespace(var=args.var, sel=(args.sel or []) + args.val_sel))
        held = {_identity(v) for v in val}
        train = [i for i in items if _identity(i) not in held]  # never train on validation
        if not train:
            raise SystemExit("error: every training item is also a validation item")
    else:
        order = list(range(len(items)))
        random.Random(args.seed_split).shuffle(order)
        n_val = max(1, round(args.val_fraction * len(items))) if len(items) > 1 else 0
        val = [items[i] for i in order[:n_val]]
        train = [items[i] for i in order[n_val:]] or val
    siren = config_from_args(args, SirenConfig, "siren")
    method = config_from_args(args, MethodConfig, "method")
    tcfg = config_from_args(args, TrainConfig, "train")
    print(f"meta-training {method.method} on {len(train)} items ({len(val)} for validation), "
          f"{siren.depth}×{siren.width} SIREN", file=sys.stderr)
    ck = train_checkpoint(modality, train, val, siren, method, tcfg,
                          info={"data": [str(p) for p in args.data], "var": args.var,
                                "sel": args.sel, "command": " ".join(sys.argv)})
    digest = save_checkpoint(ck, out, overwrite=True)
    print(json.dumps({"checkpoint": str(out), "sha256": digest, **ck.info["train"],
                      "allocator": active_allocator()}, indent=2))
    return 0


def _fit(args, ck, modality, items):
    """Adapt items (3 MetaSGD steps); optionally quantised like the bitstream would be."""
    import torch

    from .pipeline import adapt_codes, predictor, quantize_codes

    signals = [modality.to_signal(i) for i in items]
    codes = adapt_codes(ck, modality, signals, steps=args.steps)
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


def _load(args):
    from .checkpoint import load_checkpoint
    from .registry import get_modality

    _refuse_existing(args)
    ck = load_checkpoint(args.checkpoint)
    modality = get_modality(ck.modality)
    modality.load_state(ck.modality_state)
    return ck, modality


def _summary(metrics: list[dict]) -> dict:
    keys = [k for k in metrics[0] if isinstance(metrics[0][k], int | float)]
    return {k: float(sum(m[k] for m in metrics) / len(metrics)) for k in keys}


def cmd_fit(args) -> int:
    ck, modality = _load(args)
    items = _read_items(modality, [args.file], args)
    signals, preds, metrics = _fit(args, ck, modality, items)
    recon = [modality.reconstruct(s.meta, p, args.resolution, template=i)
             for s, p, i in zip(signals, preds, items, strict=True)]
    modality.save(recon, args.output, overwrite=args.overwrite)
    print(json.dumps({"output": args.output, "items": len(items), "mean": _summary(metrics)},
                     indent=2))
    return 0


def cmd_evaluate(args) -> int:
    ck, modality = _load(args)
    rows, all_metrics = [], []
    for path in args.files:
        items = _read_items(modality, [path], args)
        _, _, metrics = _fit(args, ck, modality, items)
        for i, m in zip(items, metrics, strict=True):
            ident = {str(k): str(v.values) for k, v in getattr(i, "coords", {}).items()
                     if getattr(v, "ndim", 1) == 0}
            rows.append({"file": str(path), "item": ident, **m})
        all_metrics += metrics
    report = {"checkpoint": str(args.checkpoint), "bits": args.bits, "per_item": rows,
              "mean": _summary(all_metrics)}
    text = json.dumps(report, indent=2)
    if args.output:
        from .bitstream import save_bytes_atomic

        save_bytes_atomic(text.encode(), args.output, overwrite=args.overwrite)
    print(text if args.verbose or not args.output else json.dumps(report["mean"], indent=2))
    return 0


def cmd_encode(args) -> int:
    from .bitstream import save_bytes_atomic
    from .pipeline import encode_items

    ck, modality = _load(args)
    items = _read_items(modality, [args.file], args)
    data, rep = encode_items(ck, modality, items, bits=args.bits, metadata=args.metadata)
    save_bytes_atomic(data, args.output, overwrite=args.overwrite)
    print(json.dumps({"output": args.output, "items": len(items), "bytes": rep.n_bytes,
                      "payload_bytes": rep.payload_bytes, "values": rep.n_values,
                      "bits_per_value": rep.bits_per_value,
                      "payload_bits_per_value": rep.payload_bits_per_value,
                      "mean": _summary(rep.metrics)}, indent=2))
    return 0


def cmd_decode(args) -> int:
    from .checkpoint import load_checkpoint
    from .pipeline import decode_stream

    _refuse_existing(args)
    ck = load_checkpoint(args.checkpoint)
    data = Path(args.file).read_bytes()
    modality, artifacts, stream = decode_stream(data, ck, args.resolution)
    n_values = sum(math.prod(getattr(a, "shape", (0,))) for a in artifacts)
    for a in artifacts:  # provenance travels with the artifact where it has attributes
        if isinstance(getattr(a, "attrs", None), dict):
            a.attrs["mscn_bits_per_value"] = 8 * len(data) / max(n_values, 1)
            a.attrs["mscn_checkpoint_sha256"] = ck.sha256
    modality.save(artifacts, args.output, overwrite=args.overwrite)
    print(json.dumps({"output": args.output, "items": stream.n_items, "bytes": len(data),
                      "bits": stream.bits, "modality": stream.modality,
                      "bits_per_value": 8 * len(data) / max(n_values, 1)}, indent=2))
    return 0


def _globe_stats(truth, recon) -> dict:
    """PSNR on the checkpoint's scaling (kept in the recon's attrs), RMSE, bits if decoded."""
    import numpy as np

    from mscn_viewers.globe import error_on_truth_grid

    err = np.asarray(error_on_truth_grid(truth, recon).values, dtype=np.float64)
    rmse = float(np.sqrt(np.nanmean(err**2)))
    stats = {}
    lo, hi = recon.attrs.get("mscn_scale_min"), recon.attrs.get("mscn_scale_max")
    if lo is not None and hi is not None and rmse > 0:
        stats["psnr"] = 20 * math.log10((float(hi) - float(lo)) / rmse)
    stats["rmse"] = rmse
    if "mscn_bits_per_value" in recon.attrs:
        stats["bits_per_value"] = float(recon.attrs["mscn_bits_per_value"])
    return stats


def cmd_view_globe(args) -> int:
    from mscn_datasets import climate
    from mscn_viewers.globe import render_globe, rotating_globe_gif

    _refuse_existing(args)
    truth = climate.field_items([args.truth], var=args.var, sel=args.sel)
    recon = climate.field_items([args.recon], var=args.var or str(truth[0].name), sel=args.sel)
    if not 0 <= args.index < len(truth):
        raise SystemExit(f"error: --index {args.index} out of range (0..{len(truth) - 1})")
    t = truth[args.index]
    r = recon[args.index] if len(recon) == len(truth) else recon[0]
    path = render_globe(t, r, args.output, title=args.title, stats=_globe_stats(t, r),
                        overwrite=args.overwrite)
    print(path)
    if args.gif:
        print(rotating_globe_gif(r, args.gif))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mscn", description="Meta-Learning Sparse Compression Networks: meta-learn a "
        "shared SIREN, represent each signal by a few hundred sparse modulations, write "
        "them to a real bitstream and decode them back.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("modalities", help="list installed modality plugins and their status")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_modalities)

    s = sub.add_parser("inspect", help="print a checkpoint's config, method, budget and gates")
    s.add_argument("checkpoint")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    def data_flags(s):
        s.add_argument("--var", help="variable to use (default: the only one with lat/lon)")
        s.add_argument("--sel", action="append", metavar="DIM=VALUE",
                       help="select along a dimension, e.g. --sel isobaricInhPa=850 (repeatable)")

    def out_flags(s):
        s.add_argument("-o", "--output", required=True, help="output file")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output")

    s = sub.add_parser("meta-train", help="meta-learn a checkpoint (codec) from data files")
    s.add_argument("--modality", help="modality plugin (default: guessed from the first file)")
    s.add_argument("--data", nargs="+", required=True, metavar="FILE")
    data_flags(s)
    out_flags(s)
    s.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of items held out for validation/keep-best (default 0.1)")
    s.add_argument("--seed-split", type=int, default=0, help="seed of the train/val split")
    s.add_argument("--val-sel", action="append", metavar="DIM=VALUE",
                   help="validation items: --sel plus these (overriding), e.g. number=7; "
                   "replaces the random split")
    s.add_argument("--val-data", nargs="+", metavar="FILE",
                   help="files for the validation items (default: --data)")
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

    s = sub.add_parser("fit", help="represent every field of a file; write the reconstruction")
    s.add_argument("file")
    data_flags(s)
    fit_flags(s)
    out_flags(s)
    s.add_argument("--resolution", type=float, default=None,
                   help="write on a global grid of this spacing (degrees) instead of the input's")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("evaluate", help="metrics per item and mean, as JSON")
    s.add_argument("files", nargs="+")
    data_flags(s)
    fit_flags(s)
    s.add_argument("-o", "--output", help="write the JSON report here")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("-v", "--verbose", action="store_true", help="print per-item rows too")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("encode", help="compress a file into an .mscn bitstream")
    s.add_argument("file")
    data_flags(s)
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--bits", type=int, default=6, help="quantisation bits 2..8 (default 6)")
    s.add_argument("--metadata", choices=("full", "cf"), default="full",
                   help="item metadata kept in the stream: every attribute (full) or the "
                   "CF essentials only (cf: units, names, calendar; fewer bytes)")
    out_flags(s)
    s.set_defaults(func=cmd_encode)

    s = sub.add_parser("decode", help="rebuild the artifact (e.g. NetCDF) from an .mscn file")
    s.add_argument("file")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--resolution", type=float, default=None,
                   help="decode onto a global grid of this spacing (degrees)")
    out_flags(s)
    s.set_defaults(func=cmd_decode)

    s = sub.add_parser("view", help="render results to PNG")
    vsub = s.add_subparsers(dest="viewer", required=True, metavar="VIEWER")
    g = vsub.add_parser("globe", help="truth / reconstruction / error on maps and globes")
    g.add_argument("truth", help="original NetCDF")
    g.add_argument("recon", help="reconstructed NetCDF (from mscn fit or decode)")
    data_flags(g)
    g.add_argument("--index", type=int, default=0, help="which field (item) to show")
    g.add_argument("--title", default=None)
    g.add_argument("--gif", default=None, help="also write a rotating-globe GIF here")
    out_flags(g)
    g.set_defaults(func=cmd_view_globe)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .bitstream import BitstreamError
    from .checkpoint import CheckpointError
    from .registry import ModalityError

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
