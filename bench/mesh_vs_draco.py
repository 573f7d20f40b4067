"""Held-out meshes through the real MSCN codec vs Draco: bytes against Chamfer-L1.

One run, on the "test" meshes of datasets/data/meshes/split.json (bunny00, cow, elk,
pinion, knot1; never seen in meta-training or validation):

* **MSCN** with the shipped SDF checkpoint (plugins/checkpoints/shapes_sdf.safetensors):
  one ``.mscn`` file per mesh, ``encode_items`` at every bit depth in ``--bits`` (with the
  checkpoint's default encode-time refinement: 3 meta-learned steps then 300 refine steps,
  its codec fitted on such codes; JSON ``encode_refine_steps_and_grow``), then
  ``decode_stream`` of *those bytes* (the registry's sdf plugin, marching cubes at
  ``--resolution``³ over the padded box [-0.55, 0.55]³ of the unit frame). Bytes: the
  whole file (magic, zlib header with the checkpoint hash and the item's frame, payload,
  CRC) and the entropy-coded payload alone. The decoded Shape's mesh is in the unit frame
  of the frame carried by the stream; that this is the truth's unit frame is *checked* by
  also going through the original frame (``original_mesh()`` then ``truth.frame.to_unit``)
  and comparing vertices and Chamfer both ways (JSON: ``frame_check``).
* **Draco** (DracoPy, ``compression_level=10``, position quantisation 2..16 bits) on the
  ORIGINAL vendored mesh in the file's coordinates (``load_mesh``: the file as read and
  cleaned), decoded with ``DracoPy.decode``, moved into the truth's unit frame.
* **Marching-cubes floor**: the truth mesh re-meshed by marching cubes of its exact signed
  distance (``signed_distance`` on the same lattice, ``marching_cubes``) at the same
  resolution: the Chamfer any SDF codec decoded at that resolution starts from.

Metrics (``mscn_datasets.shape_metrics.mesh_metrics``, Occupancy Networks' definitions in
the unit cube, 100k surface samples each way, seed 0): Chamfer-L1, F-score at 1 %, normal
consistency. Sampling alone sets a floor of about 0.5·sqrt(area/n) ≈ 0.002–0.003.

Comparison (DESIGN §7: "≥ 10× smaller than Draco at equal Chamfer"): for each MSCN point
the Draco bytes that reach the same Chamfer-L1 on Draco's lower envelope (bytes ascending,
Chamfer strictly improving), log(bytes) interpolated linearly in Chamfer between the two
neighbouring Draco points; ratio = Draco bytes / MSCN bytes (whole file; also vs the
payload). Off the ends of the Draco curve: MSCN better than Draco's best → Draco "reaches"
it only at its best point (ratio is a lower bound, flag ``mscn_better_than_any_draco_point``);
MSCN worse than Draco's coarsest point → ratio vs Draco's smallest file, flag
``mscn_worse_than_any_draco_point`` (an upper bound on the real advantage).

Usage (each number in the JSON comes from this one command)::

    .venv/bin/python bench/mesh_vs_draco.py [--quick]

→ bench/results/mesh_vs_draco[_quick].json and .png. ``--quick``: 2 meshes, bits 4,6,8,
resolution 64, Draco q 4,8,11,14; with no shipped checkpoint it meta-trains a tiny one
(4×64, 20 outer steps; numbers meaningless, a smoke test of the pipeline).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHIPPED_SDF = C.ROOT / "plugins" / "checkpoints" / "shapes_sdf.safetensors"
METRIC_KEYS = ("chamfer_l1", "fscore", "normal_consistency", "accuracy", "completeness",
               "empty")
GOAL_RATIO = 10.0
GOAL_CHAMFER = 0.01


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(SHIPPED_SDF))
    ap.add_argument("--meshes", default=None, help="comma list (default: split 'test')")
    ap.add_argument("--bits", default="3,4,5,6,7,8")
    ap.add_argument("--draco-q", default=",".join(str(q) for q in range(2, 17)))
    ap.add_argument("--resolution", type=int, default=128, help="marching cubes N (N³)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 meshes, bits 4,6,8, resolution 64")
    ap.add_argument("--replot", action="store_true",
                    help="redo the comparison, tables and plot from the existing JSON")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.bits, args.resolution, args.draco_q = "4,6,8", 64, "4,8,11,14"
    tag = "_quick" if args.quick else ""
    args.out = Path(args.out or C.RESULTS / f"mesh_vs_draco{tag}.json")
    args.png = args.out.with_suffix(".png")
    return args


def pick(metrics: dict) -> dict:
    return {k: float(metrics[k]) for k in METRIC_KEYS}


# -- the checkpoint -----------------------------------------------------------------------
def tiny_checkpoint(m):
    """--quick without the shipped file: a 4×64 SIREN, 20 outer steps on 4 train meshes."""
    from mscn_core.checkpoint import checkpoint_bytes
    from mscn_core.meta import TrainConfig
    from mscn_core.methods import MethodConfig
    from mscn_core.pipeline import train_checkpoint
    from mscn_core.siren import SirenConfig
    from mscn_datasets.meshes import load_split, read_shapes, vendored_mesh
    from mscn_plugins.sdf import SdfOptions

    split = load_split()
    opts = SdfOptions(near_samples=20_000, metric_grid=32)
    tr = [read_shapes(vendored_mesh(n))[0] for n in split["train"][:4]]
    va = [read_shapes(vendored_mesh(n))[0] for n in split["val"][:1]]
    ck = train_checkpoint(m, tr, va, SirenConfig(depth=4, width=64, w0=30.0, w0_first=30.0),
                          MethodConfig(budget=64, lr_init_low=0.05, lr_init_high=0.5),
                          TrainConfig(outer_steps=20, outer_lr=3e-4, batch_size=4,
                                      points_per_item=1024, val_every=10, progress=False),
                          info={"benchmark": "mesh_vs_draco --quick"}, options=opts)
    checkpoint_bytes(ck)
    return ck


# -- MSCN through the codec ---------------------------------------------------------------
def cached_signals(m):
    """``to_signal`` computed once per mesh (it is deterministic: seeded by the item's name);
    every bit depth then re-runs the real ``encode_items`` on the same signal."""
    real, cache = m.to_signal, {}

    def to_signal(item, options=None):
        if item.name not in cache:
            cache[item.name] = real(item, options)
        return cache[item.name]

    m.to_signal = to_signal
    return m


def frame_check(truth, shape) -> dict:
    """The decoded mesh in the unit frame vs the same mesh via the original frame."""
    from mscn_datasets.shape_metrics import mesh_metrics

    orig = shape.original_mesh()
    back = truth.frame.to_unit(orig.vertices)
    via = orig.copy()
    via.vertices = back
    truth_orig = truth.original_mesh()
    m_via = mesh_metrics(via, truth.mesh)
    m_orig = mesh_metrics(orig, truth_orig)
    return {
        "stream_frame": shape.frame.as_dict(), "truth_frame": truth.frame.as_dict(),
        "max_abs_vertex_diff_unit": float(np.max(np.abs(back - shape.mesh.vertices)))
        if len(back) else 0.0,
        "chamfer_l1_via_original_frame": float(m_via["chamfer_l1"]),
        "chamfer_l1_original_units": float(m_orig["chamfer_l1"]),
        "chamfer_l1_original_units_over_scale": float(m_orig["chamfer_l1"] / truth.frame.scale),
    }


def header_json(data: bytes) -> str:
    """The stream's header JSON (zlib-compressed in the file), for the record."""
    from mscn_core.bitstream import inflate_header_text

    n = int.from_bytes(data[6:10], "little")
    return inflate_header_text(data[10:10 + n]).decode()


def moved_frame_check(ck, m, truth, bits: int, opts) -> dict:
    """The vendored meshes are stored nearly in the unit frame already (frame ≈ identity),
    so the frame check above is weak; here the same mesh is declared to live at scale 37
    around (10, −3, 5): the decoded file-frame mesh must come back there."""
    from mscn_core import pipeline as P
    from mscn_datasets.meshes import Frame, Shape
    from mscn_datasets.shape_metrics import mesh_metrics

    frame = Frame(center=np.array([10.0, -3.0, 5.0]), scale=37.0)
    moved = Shape(f"{truth.name}@moved", truth.source, frame, truth.mesh, None,
                  truth.watertight)
    data, _ = P.encode_items(ck, m, [moved], bits=bits, with_metrics=False, options=opts)
    shape = P.decode_stream(data, ck, opts).artifacts[0]
    unit = mesh_metrics(shape.mesh, truth.mesh)["chamfer_l1"]
    orig = mesh_metrics(shape.original_mesh(), moved.original_mesh())["chamfer_l1"]
    return {"declared_frame": frame.as_dict(), "decoded_frame": shape.frame.as_dict(),
            "bits": bits, "n_bytes": len(data), "chamfer_l1_unit": float(unit),
            "chamfer_l1_file_units": float(orig),
            "chamfer_l1_file_units_over_scale": float(orig / frame.scale),
            "decoded_bbox_file_units": shape.original_mesh().bounds.tolist()
            if len(shape.mesh.faces) else None}


def mscn_points(ck, m, truth, bits_list, opts) -> list[dict]:
    from mscn_core import pipeline as P
    from mscn_datasets.shape_metrics import mesh_metrics

    points = []
    for bits in bits_list:
        t0 = time.perf_counter()
        data, rep = P.encode_items(ck, m, [truth], bits=bits, with_metrics=False, options=opts)
        t1 = time.perf_counter()
        dec = P.decode_stream(data, ck, opts)
        t2 = time.perf_counter()
        shape = dec.artifacts[0]
        met = pick(mesh_metrics(shape.mesh, truth.mesh))
        pt = {"codec": "mscn", "param": bits, "param_name": "bits", "n_bytes": len(data),
              "payload_bytes": rep.payload_bytes,
              "stream_header_bytes_zlib": int.from_bytes(data[6:10], "little"),
              "bits_per_vertex": 8 * len(data) / rep.n_values,
              "code_size": ck.rep.code_size(), "decoded_vertices": len(shape.mesh.vertices),
              "decoded_faces": len(shape.mesh.faces),
              "encode_seconds": t1 - t0, "decode_seconds": t2 - t1, **met}
        if bits == bits_list[-1] or bits == bits_list[0]:
            pt["frame_check"] = frame_check(truth, shape)
            pt["header_json"] = header_json(data)
        points.append(pt)
        C.log(f"  mscn {bits} bits: {len(data)} B ({rep.payload_bytes} payload), "
              f"Chamfer {met['chamfer_l1']:.4f}, F {met['fscore']:.3f}")
    return points


# -- Draco ----------------------------------------------------------------------------------
def draco_points(original, truth, qs) -> list[dict]:
    import DracoPy
    import trimesh

    from mscn_datasets.shape_metrics import mesh_metrics

    points = []
    for q in qs:
        t0 = time.perf_counter()
        blob = DracoPy.encode(np.asarray(original.vertices), np.asarray(original.faces),
                              quantization_bits=q, compression_level=10)
        t1 = time.perf_counter()
        d = DracoPy.decode(blob)
        t2 = time.perf_counter()
        mesh = trimesh.Trimesh(truth.frame.to_unit(np.asarray(d.points, dtype=np.float64)),
                               np.asarray(d.faces, dtype=np.int64), process=False)
        met = pick(mesh_metrics(mesh, truth.mesh))
        points.append({"codec": "draco", "param": q, "param_name": "quantization_bits",
                       "n_bytes": len(blob), "bits_per_vertex": 8 * len(blob) /
                       len(original.vertices), "encode_seconds": t1 - t0,
                       "decode_seconds": t2 - t1, **met})
    C.log("  draco: " + ", ".join(f"q{p['param']} {p['n_bytes']} B {p['chamfer_l1']:.4f}"
                                  for p in points))
    return points


def mc_floor(truth, resolution: int) -> dict:
    """Marching cubes of the truth's exact SDF on the decoder's lattice."""
    t0 = time.perf_counter()
    metrics = C.exact_sdf_floor(truth.mesh, resolution)
    return {"resolution": resolution, "seconds": time.perf_counter() - t0, **pick(metrics)}


def truth_vs_itself(truth) -> float:
    from mscn_datasets.shape_metrics import mesh_metrics

    return float(mesh_metrics(truth.mesh, truth.mesh)["chamfer_l1"])


# -- comparison -------------------------------------------------------------------------------
def envelope(points: list[dict]) -> list[tuple[float, float]]:
    """Draco's lower envelope: (bytes, Chamfer), bytes ascending, Chamfer strictly falling."""
    out, best = [], math.inf
    for b, c in sorted((p["n_bytes"], p["chamfer_l1"]) for p in points
                       if p["chamfer_l1"] is not None and math.isfinite(p["chamfer_l1"])):
        if c < best:
            out.append((float(b), float(c)))
            best = c
    return out


def draco_bytes_at(env: list[tuple[float, float]], chamfer: float) -> tuple[float, str]:
    """Draco bytes reaching ``chamfer`` (log-bytes linear in Chamfer) and how it was found."""
    if chamfer >= env[0][1]:
        return env[0][0], "mscn_worse_than_any_draco_point"
    if chamfer <= env[-1][1]:
        return env[-1][0], "mscn_better_than_any_draco_point"
    for (b0, c0), (b1, c1) in zip(env, env[1:], strict=False):
        if c1 <= chamfer <= c0:
            t = (c0 - chamfer) / (c0 - c1)
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0))), "interpolated"
    raise AssertionError("unreachable")


def compare(mesh_results: dict) -> dict:
    rows, per_mesh = [], {}
    for name, r in mesh_results.items():
        env = envelope(r["draco"])
        mine = []
        for p in r["mscn"]:
            c = p["chamfer_l1"]
            if c is None or not math.isfinite(c):
                row = {"mesh": name, "bits": p["param"], "mscn_bytes": p["n_bytes"],
                       "mscn_chamfer_l1": None, "how": "mscn_empty_mesh", "ratio": None}
            else:
                db, how = draco_bytes_at(env, c)
                row = {"mesh": name, "bits": p["param"], "mscn_bytes": p["n_bytes"],
                       "mscn_payload_bytes": p["payload_bytes"], "mscn_chamfer_l1": c,
                       "draco_bytes_at_equal_chamfer": db, "how": how,
                       "ratio": db / p["n_bytes"], "ratio_vs_payload": db / p["payload_bytes"]}
            rows.append(row)
            mine.append(row)
        ok = [x for x in mine if x["ratio"] is not None]
        # An interpolated ratio is a measurement; off Draco's worst end it is only a bound.
        measured = [x for x in ok if x["how"] != "mscn_worse_than_any_draco_point"]
        best = max(measured or ok, key=lambda x: x["ratio"]) if ok else None
        per_mesh[name] = {
            "best_ratio": best["ratio"] if best else None,
            "best_ratio_bits": best["bits"] if best else None,
            "best_ratio_how": best["how"] if best else None,
            "best_ratio_vs_payload": max(x["ratio_vs_payload"] for x in ok) if ok else None,
            "best_mscn_chamfer_l1": min((x["mscn_chamfer_l1"] for x in ok), default=None),
            "draco_best_chamfer_l1": env[-1][1], "draco_smallest_bytes": env[0][0],
            "draco_smallest_chamfer_l1": env[0][1],
            "goal_10x_met": bool(best and best["ratio"] >= GOAL_RATIO
                                 and best["how"] != "mscn_worse_than_any_draco_point"),
            "chamfer_goal_met": bool(ok and min(x["mscn_chamfer_l1"] for x in ok)
                                     <= GOAL_CHAMFER),
        }
    ratios = [v["best_ratio"] for v in per_mesh.values() if v["best_ratio"] is not None]
    by_bits = {}
    for b in sorted({r["bits"] for r in rows}):
        rs = [r["ratio"] for r in rows if r["bits"] == b and r["ratio"] is not None]
        by_bits[b] = float(np.median(rs)) if rs else None
    median = float(np.median(ratios)) if ratios else None
    return {"rows": rows, "per_mesh": per_mesh, "median_best_ratio": median,
            "median_ratio_by_bits": by_bits,
            "goal": f"Draco bytes / MSCN bytes ≥ {GOAL_RATIO:g} at equal Chamfer-L1 "
                    f"(DESIGN §7), and Chamfer-L1 ≤ {GOAL_CHAMFER}",
            "goal_met": bool(median is not None and median >= GOAL_RATIO
                             and all(v["goal_10x_met"] for v in per_mesh.values())),
            "chamfer_goal_met_on": [k for k, v in per_mesh.items() if v["chamfer_goal_met"]]}


# -- plot -----------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    names = list(result["meshes"])
    ncol = min(3, len(names))
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 4.4 * nrow), squeeze=False)
    res = result["config"]["resolution"]
    for ax, name in zip(axes.flat, names, strict=False):
        r = result["meshes"][name]
        dr = sorted(r["draco"], key=lambda p: p["n_bytes"])
        ms = sorted(r["mscn"], key=lambda p: p["n_bytes"])
        dx, dy = [p["n_bytes"] for p in dr], [p["chamfer_l1"] for p in dr]
        qs, bs = result["config"]["draco_quantization_bits"], result["config"]["bits"]
        ax.plot(dx, dy, "s-", color="tab:blue", ms=4,
                label=f"Draco, position bits q = {min(qs)}…{max(qs)}")
        ax.plot([x / GOAL_RATIO for x in dx], dy, "--", color="tab:blue", lw=1, alpha=0.5,
                label="Draco bytes ÷ 10 (the goal)")
        for p in dr:
            if p["param"] in (min(qs), 4, 6, 8, 12, max(qs)):
                ax.annotate(f"q{p['param']}", (p["n_bytes"], p["chamfer_l1"]), fontsize=7,
                            color="tab:blue", xytext=(3, 3), textcoords="offset points")
        mx = [p["n_bytes"] for p in ms if p["chamfer_l1"] is not None]
        my = [p["chamfer_l1"] for p in ms if p["chamfer_l1"] is not None]
        ax.plot(mx, my, "o-", color="tab:red", ms=4,
                label=f"MSCN .mscn file, {min(bs)}…{max(bs)} bits/modulation")
        for p in ms:
            if p["chamfer_l1"] is not None and p["param"] in (min(bs), max(bs)):
                ax.annotate(f"{p['param']}b", (p["n_bytes"], p["chamfer_l1"]), fontsize=7,
                            color="tab:red", xytext=(3, -9), textcoords="offset points")
        ax.axhline(r["mc_floor"]["chamfer_l1"], color="k", ls=":", lw=1)
        ax.text(0.02, r["mc_floor"]["chamfer_l1"] * 1.06,
                f"exact SDF → marching cubes {res}³", fontsize=7,
                transform=ax.get_yaxis_transform())
        ax.axhline(GOAL_CHAMFER, color="tab:green", ls="-.", lw=1)
        ax.text(0.02, GOAL_CHAMFER * 1.06, "Chamfer goal 0.01", fontsize=7, color="tab:green",
                transform=ax.get_yaxis_transform())
        ax.axhline(r["truth_vs_itself_chamfer_l1"], color="grey", ls="-", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.margins(x=0.1)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        pm = result["comparison"]["per_mesh"][name]
        ratio, how = pm["best_ratio"], pm["best_ratio_how"] or ""
        bound = {"mscn_worse_than_any_draco_point": "≤ ",
                 "mscn_better_than_any_draco_point": "≥ "}.get(how, "")
        ax.set_title(f"{name} ({r['n_vertices']} vertices): Draco/MSCN bytes at equal "
                     f"Chamfer {'–' if ratio is None else f'{bound}{ratio:.1f}×'}", fontsize=9)
        ax.set_xlabel("bytes per mesh (whole file)")
        ax.set_ylabel("Chamfer-L1 (unit cube, log)")
        ax.grid(alpha=0.3, which="both")
    spare = list(axes.flat)[len(names):]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare:
        cmp = result["comparison"]
        spare[0].legend(handles, labels, fontsize=9, loc="upper left", frameon=False)
        med = cmp["median_best_ratio"]
        spare[0].text(0.0, 0.62, f"median over meshes of the best Draco/MSCN ratio: "
                      f"{med:.1f}×\n(goal ≥ {GOAL_RATIO:g}× at equal Chamfer: "
                      f"{'met' if cmp['goal_met'] else 'NOT met'})\n"
                      "≤: MSCN is worse than Draco's coarsest file, so the ratio\n"
                      "is only an upper bound (vs that file)\n"
                      "dotted black: truth's exact SDF meshed by marching cubes\n"
                      "grey: truth vs itself (sampling floor of the metric)",
                      fontsize=8.5, va="top", transform=spare[0].transAxes)
    else:
        axes.flat[0].legend(fontsize=7, loc="upper right")
    ck = result["checkpoint"]
    fig.suptitle(f"held-out meshes: MSCN ({ck['siren']}, {ck['code_size']} modulations, "
                 f"decoded at {res}³) vs Draco (compression level 10)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    import DracoPy

    from mscn_core import pipeline as P
    from mscn_core.checkpoint import load_checkpoint
    from mscn_core.registry import get_modality
    from mscn_datasets.meshes import load_mesh, load_split, read_shapes, vendored_mesh
    from mscn_plugins.sdf import SdfOptions

    args = parse_args(argv)
    if args.replot:
        import json

        return report(json.loads(args.out.read_text()), args)
    C.setup_torch(args.threads)
    t_start = time.perf_counter()
    names = args.meshes.split(",") if args.meshes else load_split()["test"]
    if args.quick and not args.meshes:
        names = names[:2]
    bits_list = [int(b) for b in args.bits.split(",")]
    qs = [int(q) for q in args.draco_q.split(",")]
    m = get_modality("sdf")
    ck_path = Path(args.checkpoint)
    if ck_path.is_file():
        ck = load_checkpoint(ck_path)
        ck_source = str(ck_path.relative_to(C.ROOT)) if ck_path.is_relative_to(C.ROOT) \
            else str(ck_path)
    elif args.quick:
        C.log(f"{ck_path} missing: meta-training a tiny checkpoint (smoke test only)")
        ck = tiny_checkpoint(m)
        ck_source = "tiny 4×64 checkpoint trained by --quick (shipped one missing)"
    else:
        raise SystemExit(f"{ck_path} does not exist: build it (make shape-checkpoints) or "
                         "pass --checkpoint")
    m.load_state(ck.modality_state)
    cached_signals(m)
    opts = SdfOptions(resolution=args.resolution)
    sc = ck.rep.siren_cfg
    result: dict = {
        "benchmark": "mesh_vs_draco", "quick": args.quick, "machine": C.machine_info(),
        "command": " ".join([".venv/bin/python bench/mesh_vs_draco.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "config": {"bits": bits_list, "draco_quantization_bits": qs,
                   "draco_compression_level": 10, "resolution": args.resolution,
                   "marching_cubes_box": "[-0.55, 0.55]^3 of the unit frame (padded box)",
                   "metrics": "mesh_metrics: 100k surface samples each way, seed 0, "
                              "F-score threshold 0.01 (unit cube)",
                   "sdf_options": {k: getattr(opts, k) for k in
                                   ("resolution", "metric_grid", "near_samples")}},
        "checkpoint": {"source": ck_source, "sha256": ck.sha256,
                       "siren": f"{sc.depth}×{sc.width}, w0 {sc.w0}",
                       "method": ck.rep.cfg.method, "code_size": ck.rep.code_size(),
                       "inner_steps": ck.rep.cfg.inner_steps,
                       "encode_refine_steps_and_grow": list(P.refine_settings(ck)),
                       "train": ck.info.get("train", {})},
        "draco": f"DracoPy {getattr(DracoPy, '__version__', '2.2')} on the original mesh "
                 "(file coordinates, load_mesh), positions only",
        "meshes": {},
    }

    def save() -> None:
        C.write_json(args.out, result)

    for name in names:
        C.log(f"{name}")
        path = vendored_mesh(name)
        truth = read_shapes(path)[0]
        original = load_mesh(path)
        r = {"file": str(path.relative_to(C.ROOT)), "n_vertices": len(original.vertices),
             "n_faces": len(original.faces), "file_bytes": path.stat().st_size,
             "frame": truth.frame.as_dict(), "watertight": truth.watertight}
        t0 = time.perf_counter()
        r["mc_floor"] = mc_floor(truth, args.resolution)
        r["truth_vs_itself_chamfer_l1"] = truth_vs_itself(truth)
        C.log(f"  marching-cubes floor {r['mc_floor']['chamfer_l1']:.4f}, sampling floor "
              f"{r['truth_vs_itself_chamfer_l1']:.4f}")
        r["draco"] = draco_points(original, truth, qs)
        r["mscn"] = mscn_points(ck, m, truth, bits_list, opts)
        if name == names[0]:
            r["moved_frame_check"] = moved_frame_check(ck, m, truth, bits_list[-1], opts)
            C.log(f"  moved-frame check: {r['moved_frame_check']}")
        r["seconds"] = time.perf_counter() - t0
        result["meshes"][name] = r
        save()

    result["seconds"] = time.perf_counter() - t_start
    return report(result, args)


def report(result: dict, args) -> int:
    """Comparison, tables and plot from the measurements (also ``--replot``)."""
    mach = result["machine"]
    result["device"] = (f"CPU, {mach['cpus']} cores shared with other jobs, "
                        f"{mach['torch_threads']} torch thread(s)")
    result["comparison"] = cmp = compare(result["meshes"])
    lines = ["| mesh | bits | MSCN bytes (payload) | MSCN Chamfer | F-score | NC | Draco bytes "
             "at equal Chamfer | Draco/MSCN | note |", "|" + "---|" * 9]
    for row in cmp["rows"]:
        p = next(x for x in result["meshes"][row["mesh"]]["mscn"] if x["param"] == row["bits"])
        lines.append(
            f"| {row['mesh']} | {row['bits']} | {row['mscn_bytes']} ({p['payload_bytes']}) | "
            f"{p['chamfer_l1']:.4f} | {p['fscore']:.3f} | {p['normal_consistency']:.3f} | "
            + (f"{row['draco_bytes_at_equal_chamfer']:.0f} | {row['ratio']:.2f}× | "
               f"{row['how'].replace('_', ' ')} |" if row["ratio"] is not None
               else "– | – | empty mesh |"))
    result["markdown_table"] = "\n".join(lines)
    summary = ["| mesh | vertices | Draco coarsest q bytes / Chamfer | Draco finest q bytes / "
               "Chamfer | MC floor Chamfer | best MSCN Chamfer | best Draco/MSCN (bits) | how "
               "| ≥ 10×? |", "|" + "---|" * 9]
    for name, pm in cmp["per_mesh"].items():
        r = result["meshes"][name]
        top = max(r["draco"], key=lambda p: p["param"])
        low = min(r["draco"], key=lambda p: p["param"])
        summary.append(
            f"| {name} | {r['n_vertices']} | {low['n_bytes']} / {low['chamfer_l1']:.4f} | "
            f"{top['n_bytes']} / {top['chamfer_l1']:.4f} | "
            f"{r['mc_floor']['chamfer_l1']:.4f} | {pm['best_mscn_chamfer_l1']:.4f} | "
            f"{pm['best_ratio']:.2f}× ({pm['best_ratio_bits']}) | "
            f"{pm['best_ratio_how'].replace('_', ' ')} | "
            f"{'yes' if pm['goal_10x_met'] else 'NO'} |")
    result["markdown_summary"] = "\n".join(summary)
    plot(result, args.png)
    result["plot"] = str(args.png.relative_to(C.ROOT)) if args.png.is_relative_to(C.ROOT) \
        else str(args.png)
    C.write_json(args.out, result)
    print(result["markdown_table"])
    print()
    print(result["markdown_summary"])
    print(f"\nmedian best ratio Draco/MSCN: {cmp['median_best_ratio']:.2f}× "
          f"(goal {GOAL_RATIO:g}×: {'met' if cmp['goal_met'] else 'NOT met'}); "
          f"{result['seconds']:.0f} s")
    print(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    C.run_script(main, __file__)
