"""Rate–distortion of the example ``image`` modality on held-out crops: MSCN, JPEG, JPEG 2000.

One run: meta-train image checkpoints (one per ``--budgets`` value) on the vendored train
crops of examples/mscn-image-plugin (32×32 crops of an Earth texture, validation on the
val crops), then on the 16 held-out test crops (other regions of the map):

* MSCN through the real codec: ``encode_items`` → bytes → ``decode_stream`` → uint8 PNG
  arrays, at bit depths 2..8. Bits per pixel (bpp) three ways: **whole file** with all 16
  crops in ONE .mscn stream (header, item metadata, checkpoint hash, CRC: amortised over
  16 crops), whole file with **one .mscn per crop** (what a single image costs), and the
  entropy-coded **payload** alone.
* JPEG (Pillow/libjpeg, optimised Huffman tables; 4:2:0 and 4:4:4 chroma) over a quality
  sweep, and JPEG 2000 (Pillow/OpenJPEG, 9/7 wavelet, one quality layer at a target rate)
  over a rate sweep, on the same crops: one file per crop (whole file and entropy-coded
  payload without headers), and one file holding the 16 crops as a 4×4 mosaic (JPEG: the
  crops align with its 16×16 MCUs; JPEG 2000: one 32×32 tile per crop) so that headers
  are amortised as in the MSCN stream.

PSNR is on 8-bit RGB (peak 255, MSE over the three channels) of the decoded image, per
crop, then averaged ("psnr") and pooled over crops ("psnr_pooled", from the mean MSE).
The mean-colour image (24 bits per crop, 0.023 bpp) is the floor every codec must clear.

The plugin comes from the registry (the installed ``mscn-image-plugin`` distribution) if
it is installed, else the example module is imported from its folder and the registry
lookup in ``decode_stream`` is redirected to it; the JSON says which.

Usage: ``python bench/rd_image.py [--quick]`` → bench/results/rd_image[_quick].json, .png.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

EXAMPLE = C.ROOT / "examples" / "mscn-image-plugin"
DATA = EXAMPLE / "data"
TILE = 32
JPEG_QUALITIES = (1, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95)
J2K_BPP = (0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="64,128", help="one checkpoint per budget")
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--w0", type=float, default=10.0,
                    help="SIREN frequency, first and hidden layers (30 is for larger grids)")
    ap.add_argument("--lr-init", default="0.3,0.9",
                    help="initial MetaSGD rates U(low, high): the paper's 0.005-0.1 stays on "
                         "the mean-colour plateau in a few hundred steps")
    ap.add_argument("--outer-steps", type=int, default=1500)
    ap.add_argument("--outer-lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--points-per-item", type=int, default=512)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; these networks are tiny and 2 OpenMP threads on a "
                         "loaded 2-core machine ran 10x slower than 1")
    ap.add_argument("--no-save-checkpoints", action="store_true",
                    help="do not keep bench/results/rd_image_budget*.safetensors")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: one budget (64), 100 outer steps, bits 2,4,6,8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.budgets, args.bits, args.outer_steps, args.val_every = "64", "2,4,6,8", 100, 50
    tag = "_quick" if args.quick else ""
    args.out = Path(args.out or C.RESULTS / f"rd_image{tag}.json")
    args.png = args.out.with_suffix(".png")
    args.tag = tag
    return args


# -- the plugin ---------------------------------------------------------------------------
def load_plugin():
    """The registry's ``image`` modality, else the example module imported from its folder."""
    from mscn_core import pipeline as P
    from mscn_core.registry import ModalityError, get_modality

    try:
        m = get_modality("image")
        from importlib.metadata import version

        return m, f"installed distribution mscn-image-plugin {version('mscn-image-plugin')}"
    except ModalityError:
        sys.path.insert(0, str(EXAMPLE))
        from mscn_image_plugin import ImageModality

        real = P.get_modality
        P.get_modality = lambda name: ImageModality() if name == "image" else real(name)
        return ImageModality(), ("imported from examples/mscn-image-plugin (not installed); "
                                 "decode_stream's registry lookup redirected to it")


def crops(split: str) -> list[Path]:
    return sorted((DATA / split).glob("*.png"))


def rgb(path_or_bytes) -> np.ndarray:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


def mse255(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def quality(truths: list[np.ndarray], recons: list[np.ndarray]) -> dict:
    """Mean PSNR over crops and pooled PSNR (mean MSE), peak 255."""
    mses = [mse255(t, r) for t, r in zip(truths, recons, strict=True)]
    ps = [10 * math.log10(255**2 / max(m, 1e-12)) for m in mses]
    return {"psnr": float(np.mean(ps)), "psnr_min": float(np.min(ps)),
            "psnr_pooled": 10 * math.log10(255**2 / max(float(np.mean(mses)), 1e-12))}


# -- MSCN ---------------------------------------------------------------------------------
def train(m, budget: int, args) -> object:
    from mscn_core.checkpoint import checkpoint_bytes, save_checkpoint
    from mscn_core.meta import TrainConfig
    from mscn_core.methods import MethodConfig
    from mscn_core.pipeline import train_checkpoint
    from mscn_core.siren import SirenConfig

    lo, hi = (float(v) for v in args.lr_init.split(","))
    tr = [it for p in crops("train") for it in m.read(p)]
    va = [it for p in crops("val") for it in m.read(p)]
    ck = train_checkpoint(
        m, tr, va, SirenConfig(depth=args.depth, width=args.width, w0=args.w0, w0_first=args.w0),
        MethodConfig(budget=budget, lr_init_low=lo, lr_init_high=hi),
        TrainConfig(outer_steps=args.outer_steps, outer_lr=args.outer_lr,
                    batch_size=args.batch_size, points_per_item=args.points_per_item,
                    val_every=args.val_every, progress=False, seed=0),
        info={"benchmark": "rd_image"})
    if args.no_save_checkpoints:
        checkpoint_bytes(ck)  # sets ck.sha256, which streams refer to
    else:
        save_checkpoint(ck, C.RESULTS / f"rd_image{args.tag}_budget{budget}.safetensors")
    return ck


def mscn_points(ck, m, paths: list[Path], bits_list, label: str) -> list[dict]:
    """One stream of all crops per bit depth, decoded from the bytes; and one file per crop."""
    from mscn_core import pipeline as P

    items = [it for p in paths for it in m.read(p)]
    truths = [it.pixels for it in items]

    class Anonymous(type(m)):  # what the stream costs without the file names it carries
        def item_template(self, item, options=None):
            return {k: v for k, v in super().item_template(item, options).items()
                    if k != "name"}

    n_px = sum(t.shape[0] * t.shape[1] for t in truths)
    points = []
    for bits in bits_list:
        t0 = time.perf_counter()
        data, rep = P.encode_items(ck, m, items, bits=bits, with_metrics=False)
        dec = P.decode_stream(data, ck)
        seconds = time.perf_counter() - t0
        single = [len(P.encode_items(ck, m, [it], bits=bits, with_metrics=False)[0])
                  for it in items]
        header = int.from_bytes(data[6:10], "little")
        anonymous = P.encode_items(ck, Anonymous(), items, bits=bits, with_metrics=False)[0]
        q = quality(truths, dec.artifacts)
        points.append({
            "codec": label, "param": bits, "param_name": "bits",
            "bpp_whole_file": 8 * len(data) / n_px,
            "bpp_one_file_per_crop": 8 * sum(single) / n_px,
            "bpp_payload": 8 * rep.payload_bytes / n_px,
            "bpp_whole_file_without_file_names": 8 * len(anonymous) / n_px,
            "n_bytes_stream": len(data), "payload_bytes": rep.payload_bytes,
            "stream_header_bytes_zlib": header,
            "bytes_one_file_per_crop_mean": float(np.mean(single)),
            "code_size": ck.rep.code_size(), "encode_decode_seconds": seconds, **q})
        C.log(f"  {label} {bits} bits: {points[-1]['bpp_whole_file']:.3f} bpp stream, "
              f"{points[-1]['bpp_one_file_per_crop']:.3f} per-crop file, "
              f"{points[-1]['bpp_payload']:.3f} payload, PSNR {q['psnr']:.2f} dB")
    return points


# -- classical codecs ---------------------------------------------------------------------
def jpeg_payload(data: bytes) -> int:
    """Entropy-coded bytes: from the end of the (single) SOS header to EOI."""
    pos = 2
    while pos < len(data):
        if data[pos] != 0xFF:
            raise ValueError("not a marker")
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            return len(data) - (pos + 2 + length) - 2
        pos += 2 + length
    raise ValueError("no SOS marker")


def j2k_payload(data: bytes) -> int:
    """Bytes after each tile-part's SOD marker (FF93), up to the next SOT or EOC."""
    total, pos = 0, data.find(b"\xff\x90")  # first SOT ends the main header
    while pos != -1 and data[pos:pos + 2] == b"\xff\x90":
        psot = int.from_bytes(data[pos + 6:pos + 10], "big")  # tile-part length, SOT included
        sod = data.find(b"\xff\x93", pos)
        end = pos + psot if psot else len(data) - 2
        total += end - (sod + 2)
        pos = end
    return total


def encode_jpeg(img: np.ndarray, q: int, subsampling: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q, optimize=True,
                              subsampling=subsampling)
    return buf.getvalue()


def encode_j2k(img: np.ndarray, bpp: float, tile: int | None = None) -> bytes:
    """Raw codestream (no JP2 boxes), 9/7 wavelet, one quality layer.

    ``bpp`` targets the *payload*: OpenJPEG's rate counts the headers too (about 1.1 bpp
    on a 32×32 crop), so the ratio it gets adds the header size of a probe encoding;
    otherwise every target below the header cost gives the same file.
    """
    h, w = img.shape[:2]
    levels = max(1, min(5, int(math.log2(min(tile or h, tile or w))) - 2))

    def enc(ratio: float) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG2000", no_jp2=True, irreversible=True,
                                  quality_mode="rates", quality_layers=[ratio],
                                  num_resolutions=levels + 1,
                                  **({"tile_size": (tile, tile)} if tile else {}))
        return buf.getvalue()

    probe = enc(24.0 / 8.0)
    header_bits = 8 * (len(probe) - j2k_payload(probe))
    return enc(24.0 * h * w / (bpp * h * w + header_bits))


def mosaic(imgs: list[np.ndarray]) -> np.ndarray:
    side = math.isqrt(len(imgs))
    assert side * side == len(imgs), "mosaic needs a square number of crops"
    rows = [np.concatenate(imgs[r * side:(r + 1) * side], axis=1) for r in range(side)]
    return np.concatenate(rows, axis=0)


def unmosaic(img: np.ndarray, n: int) -> list[np.ndarray]:
    side = math.isqrt(n)
    return [img[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            for r in range(side) for c in range(side)]


def classical_points(truths: list[np.ndarray]) -> list[dict]:
    n_px = sum(t.shape[0] * t.shape[1] for t in truths)
    sweeps = [("jpeg-420", q, "quality", lambda x, q=q: encode_jpeg(x, q, 2), jpeg_payload)
              for q in JPEG_QUALITIES]
    sweeps += [("jpeg-444", q, "quality", lambda x, q=q: encode_jpeg(x, q, 0), jpeg_payload)
               for q in JPEG_QUALITIES]
    sweeps += [("jpeg2000", b, "target bpp", lambda x, b=b, t=None: encode_j2k(x, b, t),
                j2k_payload) for b in J2K_BPP]
    points = []
    for codec, param, pname, enc, payload in sweeps:
        files = [enc(t) for t in truths]
        recons = [rgb(f) for f in files]
        whole = enc(mosaic(truths)) if codec.startswith("jpeg-") else \
            encode_j2k(mosaic(truths), param, TILE)
        q_mosaic = quality(truths, unmosaic(rgb(whole), len(truths)))
        points.append({
            "codec": codec, "param": param, "param_name": pname,
            "bpp_one_file_per_crop": 8 * sum(map(len, files)) / n_px,
            "bpp_payload": 8 * sum(payload(f) for f in files) / n_px,
            "bpp_whole_file": 8 * len(whole) / n_px,
            "bytes_one_file_per_crop_mean": float(np.mean([len(f) for f in files])),
            "n_bytes_mosaic": len(whole), **quality(truths, recons),
            "mosaic": {k: q_mosaic[k] for k in ("psnr", "psnr_pooled")}})
    return points


# -- comparison -----------------------------------------------------------------------------
def envelope(points: list[dict], rate: str, psnr: str = "psnr") -> list[tuple[float, float]]:
    """Upper envelope (bpp ascending, best PSNR so far): generous to the codec."""
    out, best = [], -math.inf
    for b, p in sorted((pt[rate], pt[psnr]) for pt in points):
        if p > best:
            out.append((b, p))
            best = p
    return out


def psnr_at(env: list[tuple[float, float]], bpp: float) -> float | None:
    """The envelope's PSNR at ``bpp`` (log-rate interpolation); None below its lowest rate."""
    if not env or bpp < env[0][0]:
        return None
    for (b0, p0), (b1, p1) in zip(env, env[1:], strict=False):
        if b0 <= bpp <= b1:
            return p0 + (p1 - p0) * math.log(bpp / b0) / math.log(b1 / b0)
    return env[-1][1]


def comparison(mscn: list[dict], classical: list[dict]) -> list[dict]:
    """For each MSCN point, what JPEG / JPEG 2000 reach at the same rate, counted alike."""
    rows = []
    for p in mscn:
        row = {"codec": p["codec"], "bits": p["param"], "mscn_psnr": p["psnr"]}
        for rate, mscn_rate, cl_rate in (
                ("stream_vs_mosaic", "bpp_whole_file", "bpp_whole_file"),
                ("file_per_crop", "bpp_one_file_per_crop", "bpp_one_file_per_crop"),
                ("payload", "bpp_payload", "bpp_payload")):
            row[f"{rate}_bpp"] = p[mscn_rate]
            for codec in ("jpeg-420", "jpeg-444", "jpeg2000"):
                pts = [c for c in classical if c["codec"] == codec]
                if rate == "stream_vs_mosaic":
                    pts = [{**c, "psnr": c["mosaic"]["psnr"]} for c in pts]
                row[f"{rate}_{codec}_psnr"] = psnr_at(envelope(pts, cl_rate), p[mscn_rate])
        rows.append(row)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = [("bpp_whole_file", "whole file, all 16 crops in one file\n(MSCN stream; JPEG/"
               "JPEG 2000 4×4 mosaic)"),
              ("bpp_one_file_per_crop", "whole file, one file per 32×32 crop"),
              ("bpp_payload", "entropy-coded payload only (no headers)")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), sharey=True)
    styles = {"jpeg-420": ("tab:blue", "s"), "jpeg-444": ("tab:cyan", "D"),
              "jpeg2000": ("tab:green", "^")}
    mscn_colours = iter(["tab:red", "tab:purple", "tab:orange", "tab:brown"])
    codecs = list(dict.fromkeys(p["codec"] for p in result["points"]))
    colours = {c: styles.get(c, (None, "o"))[0] or next(mscn_colours) for c in codecs}
    for ax, (rate, title) in zip(axes, panels, strict=True):
        for c in codecs:
            pts = sorted((p for p in result["points"] if p["codec"] == c),
                         key=lambda p: p[rate])
            ys = [p["mosaic"]["psnr"] if rate == "bpp_whole_file" and "mosaic" in p
                  else p["psnr"] for p in pts]
            ax.plot([p[rate] for p in pts], ys, marker=styles.get(c, (None, "o"))[1],
                    color=colours[c], label=c, ms=4)
        ref = result["reference_mean_colour"]
        ax.axhline(ref["psnr"], color="grey", ls=":", lw=1)
        ax.text(0.02, ref["psnr"] + 0.3, "mean colour of each crop", color="grey", fontsize=8,
                transform=ax.get_yaxis_transform())
        if rate == "bpp_payload":
            ax.plot([ref["bpp_payload"]], [ref["psnr"]], "k*", ms=8,
                    label="mean colour (24 bits/crop)")
        ax.set_xscale("log")
        ax.set_xticks([0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10])
        xs = [p[rate] for p in result["points"]]
        xs += [ref["bpp_payload"]] if rate == "bpp_payload" else []
        ax.set_xlim(min(xs) / 1.2, max(xs) * 1.2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bits per pixel")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("PSNR (dB, 8-bit RGB, mean over 16 held-out crops)")
    axes[0].legend(fontsize=8, loc="upper left")
    axes[2].legend(fontsize=8, loc="upper left")
    fig.suptitle("image modality (examples/mscn-image-plugin), held-out 32×32 Earth crops "
                 f"(E/SE Asia, Australia): MSCN ({result['config']['outer_steps']} outer "
                 f"steps, {result['config']['depth']}×{result['config']['width']} SIREN) vs "
                 "JPEG and JPEG 2000")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    C.setup_torch(args.threads)
    m, plugin_source = load_plugin()
    budgets = [int(b) for b in args.budgets.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    test = crops("test")
    truths = [rgb(p) for p in test]
    means = [np.broadcast_to(np.rint(t.reshape(-1, 3).mean(0)), t.shape) for t in truths]
    n_px = sum(t.shape[0] * t.shape[1] for t in truths)
    result: dict = {
        "benchmark": "rd_image", "quick": args.quick, "machine": C.machine_info(),
        "plugin": plugin_source,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "png", "tag")},
        "data": {"train": len(crops("train")), "val": len(crops("val")),
                 "test": [p.name for p in test], "pixels_test": n_px,
                 "what": "32×32 crops of the 2k Earth day map (CC-BY 4.0, Solar System Scope); "
                         "test crops are from other longitudes (101°E–180°) than the train "
                         "crops (180°W–45°E); see examples/mscn-image-plugin/data/README.md"},
        "psnr": "10·log10(255² / MSE) on the decoded 8-bit RGB image, mean over crops "
                "(psnr_pooled: from the mean MSE)",
        "rates": {"bpp_whole_file": "MSCN: one .mscn stream of all 16 crops; JPEG/JPEG 2000: "
                                    "one file with the 16 crops as a 4×4 mosaic",
                  "bpp_one_file_per_crop": "every crop its own file (all headers paid 16×)",
                  "bpp_payload": "MSCN: entropy-coded modulations; JPEG: scan data after the "
                                 "SOS header; JPEG 2000: tile data after SOD"},
        "reference_mean_colour": {**quality(truths, means), "bpp_payload": 24 / TILE**2},
        "checkpoints": {}, "points": [],
    }

    def save() -> None:
        C.write_json(args.out, result)

    C.log("JPEG and JPEG 2000 sweeps on the held-out crops")
    t0 = time.perf_counter()
    classical = classical_points(truths)
    result["classical_seconds"] = time.perf_counter() - t0
    result["points"] += classical
    save()
    for budget in budgets:
        C.log(f"meta-training budget {budget}: {args.depth}×{args.width} SIREN, "
              f"{args.outer_steps} outer steps")
        t0 = time.perf_counter()
        ck = train(m, budget, args)
        train_s = time.perf_counter() - t0
        label = f"mscn-budget{budget}"
        result["checkpoints"][label] = {
            "sha256": ck.sha256, "code_size": ck.rep.code_size(), "train_seconds": train_s,
            **{k: ck.info["train"][k] for k in ("best_val_loss", "best_step", "steps_run",
                                                "rollbacks")}}
        C.log(f"  trained in {train_s:.0f} s, best val loss {ck.info['train']['best_val_loss']:.4g}"
              f" at step {ck.info['train']['best_step']}")
        result["points"] += mscn_points(ck, m, test, bits_list, label)
        save()

    mscn = [p for p in result["points"] if p["codec"].startswith("mscn")]
    result["comparison"] = comparison(mscn, classical)
    lines = ["| codec | param | stream/mosaic bpp | per-crop-file bpp | payload bpp | PSNR dB "
             "| mosaic PSNR dB |", "|" + "---|" * 7]
    for p in result["points"]:
        lines.append(f"| {p['codec']} | {p['param']} | {p['bpp_whole_file']:.3f} | "
                     f"{p['bpp_one_file_per_crop']:.3f} | {p['bpp_payload']:.3f} | "
                     f"{p['psnr']:.2f} | "
                     + (f"{p['mosaic']['psnr']:.2f} |" if "mosaic" in p else "– |"))
    result["markdown_table"] = "\n".join(lines)
    plot(result, args.png)
    result["plot"] = str(args.png.relative_to(C.ROOT)) if args.png.is_relative_to(C.ROOT) \
        else str(args.png)
    save()

    print(result["markdown_table"])
    print(f"\nmean colour (24 bits/crop): PSNR {result['reference_mean_colour']['psnr']:.2f} dB")
    print("\nJPEG / JPEG 2000 PSNR (upper envelope) at each MSCN point's rate, counted alike "
          "(– : that codec cannot go that low):")
    fmt = lambda v: f"{v:6.2f}" if v is not None else "     –"  # noqa: E731
    print(f"{'codec':<16}{'bits':>4}{'PSNR':>7} | {'stream':>7}{'j420':>7}{'j444':>7}"
          f"{'j2k':>7} | {'file':>7}{'j420':>7}{'j444':>7}{'j2k':>7} | {'payload':>7}"
          f"{'j420':>7}{'j444':>7}{'j2k':>7}")
    for r in result["comparison"]:
        cells = ""
        for rate in ("stream_vs_mosaic", "file_per_crop", "payload"):
            cells += f" | {r[f'{rate}_bpp']:7.3f}" + "".join(
                f"{fmt(r[f'{rate}_{c}_psnr']):>7}" for c in ("jpeg-420", "jpeg-444", "jpeg2000"))
        print(f"{r['codec']:<16}{r['bits']:>4}{r['mscn_psnr']:7.2f}{cells}")
    print(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    C.run_script(main, __file__)
