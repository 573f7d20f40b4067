"""Rebuild the vendored mesh subset ``datasets/data/meshes/`` from the shared meshes.

Run from the repository root::

    .venv/bin/python datasets/make_vendored_meshes.py [SOURCE_DIR] --overwrite

``SOURCE_DIR`` defaults to ``../shared/data/meshes`` (relative to the repository root).
Every closed (trimesh ``is_watertight``) mesh there, plus two open ones kept for robustness
tests, is read with :func:`mscn_datasets.meshes.load_mesh` (cleaned, outward normals),
decimated with open3d's quadric decimation to at most ``--max-faces`` faces and written as
binary PLY under its own name. Each result is read back and must still be closed (for the
closed ones) and close to the original: the Chamfer-L1 between original and copy is
measured point-to-mesh in the unit frame (no sampling floor) and recorded in README.md.
If a copy fails (not closed, or Chamfer above ``CHAMFER_MAX``) larger targets are tried,
up to the original mesh. Deterministic: same inputs, same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import trimesh

from mscn_core.atomic import write_atomic
from mscn_datasets.meshes import MeshDataError, _decimate, load_mesh, normalise

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).resolve().parent / "data" / "meshes"
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "meshes"

MAX_FACES = 6000
CHAMFER_MAX = 0.0015  # unit frame; 15 % of the project's Chamfer-L1 target (0.01)
OPEN = ("mushroom", "CesiumMilkTruck")
SPLIT = {"test": ["bunny00", "cow", "elk", "pinion", "knot1"],
         "val": ["camel", "spool", "helmet"],
         "open": list(OPEN)}
MAX_TOTAL_BYTES = 6_000_000

CGAL = ("CGAL demo data, Debian `libcgal-demo` 5.5.1 (`data/meshes/`); terms in that "
        "package's debian/copyright")
SOURCES = {
    "armadillo": "Stanford Armadillo via Debian `libcgal-demo` 5.5.1; Stanford 3D Scanning "
                 "Repository: research use with credit",
    "bunny00": "closed Stanford Bunny via Debian `libcgal-demo` 5.5.1; Stanford 3D Scanning "
               "Repository: research use with credit",
    "CesiumMilkTruck": "Cesium Milk Truck glTF sample via Debian `assimp-testmodels` "
                       "(exported to OBJ with `assimp export`); CC-BY 4.0, © Cesium",
    "jeep1": "Debian `assimp-testmodels` (exported to OBJ with `assimp export`)",
}


def chamfer_point_to_mesh(a: trimesh.Trimesh, b: trimesh.Trimesh, n: int = 100_000) -> float:
    """0.5 * (mean dist of a's samples to mesh b + b's samples to mesh a), exact distances."""
    import open3d as o3d

    def one_way(src: trimesh.Trimesh, dst: trimesh.Trimesh, seed: int) -> float:
        pts, _ = trimesh.sample.sample_surface(src, n, seed=seed)
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor(dst.vertices.astype(np.float32)),
                            o3d.core.Tensor(dst.faces.astype(np.uint32)))
        d = scene.compute_distance(o3d.core.Tensor(pts.astype(np.float32))).numpy()
        return float(d.mean())

    return 0.5 * (one_way(a, b, 1) + one_way(b, a, 2))


def ply_bytes(mesh: trimesh.Trimesh) -> bytes:
    """Binary PLY: float32 xyz + int32 faces, nothing else."""
    m = trimesh.Trimesh(mesh.vertices.astype(np.float32).astype(np.float64), mesh.faces,
                        process=False)
    return trimesh.exchange.ply.export_ply(m, encoding="binary", vertex_normal=False,
                                           include_attributes=False)


def _edge_report(mesh: trimesh.Trimesh) -> str:
    _, counts = np.unique(mesh.edges_sorted, axis=0, return_counts=True)
    return (f"{int(np.sum(counts == 1))} boundary edges, "
            f"{int(np.sum(counts > 2))} edges shared by more than two faces")


def vendor_one(src: Path, out_dir: Path, closed: bool, overwrite: bool) -> dict:
    original = load_mesh(src, max_faces=None)
    unit_orig, frame = normalise(original)
    n0 = len(original.faces)
    targets = [t for t in (MAX_FACES, 9000, 12000, 18000) if t < n0] + [n0]
    tried = []
    for target in targets:
        mesh = original if target >= n0 else _decimate(original, target)
        blob = ply_bytes(mesh)
        out = out_dir / f"{src.stem}.ply"
        write_atomic(out, lambda tmp, blob=blob: Path(tmp).write_bytes(blob), overwrite=True)
        back = load_mesh(out, max_faces=None)
        unit_back = trimesh.Trimesh(frame.to_unit(back.vertices), back.faces, process=False)
        ch = 0.0 if target >= n0 else chamfer_point_to_mesh(unit_orig, unit_back)
        ok = (back.is_watertight or not closed) and ch <= CHAMFER_MAX
        tried.append({"target": target, "faces": len(back.faces),
                      "watertight": bool(back.is_watertight), "chamfer_l1": ch})
        if ok:
            return {"name": src.stem, "source_file": src.name, "original_faces": n0,
                    "faces": len(back.faces), "vertices": len(back.vertices),
                    "watertight": bool(back.is_watertight), "chamfer_l1": ch,
                    "bytes": out.stat().st_size, "tried": tried,
                    "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    out.unlink()
    return {"name": src.stem, "dropped": True, "tried": tried}


def readme(rows: list[dict], skipped: list[str], source: Path) -> str:
    lines = [
        "# Vendored meshes",
        "",
        "Small binary-PLY copies of real meshes from the shared data folder, so that tests",
        "and demos run on a fresh clone. Every closed mesh there is here, decimated with",
        f"open3d's quadric decimation to at most {MAX_FACES} faces (larger only where that",
        "broke closedness or moved the surface by more than the Chamfer limit below), plus",
        "two open meshes (`split.json` key `open`) kept for robustness tests of the inside",
        "test: `mushroom` is refused by `check_inside_test` (its holes make the inside",
        "ambiguous), `CesiumMilkTruck` passes (8 boundary edges).",
        "",
        "Meshes went through `mscn_datasets.meshes.load_mesh` first: vertices merged,",
        "degenerate and duplicate faces dropped, closed meshes wound outwards (e.g.",
        "`ellipe0.003` is inside out upstream). Coordinates are the originals (float32).",
        "",
        "Chamfer-L1: between original and copy in the unit frame (bounding box centred,",
        "longest side 1), point-to-mesh from 100,000 area-uniform samples each way, so",
        f"without a sampling floor; limit {CHAMFER_MAX} (the project's target for a",
        "reconstruction is 0.01).",
        "",
        "Rebuild (deterministic):",
        "",
        "    .venv/bin/python datasets/make_vendored_meshes.py ../shared/data/meshes --overwrite",
        "",
        "| name | source / licence note | original faces | vendored faces | watertight | "
        "Chamfer-L1 of decimation | bytes |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        note = SOURCES.get(r["name"], CGAL)
        lines.append(f"| {r['name']} | {note} | {r['original_faces']} | {r['faces']} | "
                     f"{'yes' if r['watertight'] else 'no'} | {r['chamfer_l1']:.5f} | "
                     f"{r['bytes']} |")
    lines += ["", f"Source folder: `{source.name}/` of the shared data (its README.md has the",
              "full provenance table).", ""]
    if skipped:
        lines += ["Not vendored (open meshes other than the two above; see",
                  "`check_inside_test` for how each is treated):", ""]
        lines += [f"- {s}" for s in skipped]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", nargs="?", default=str(DEFAULT_SRC))
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--overwrite", action="store_true",
                    help="replace existing files (needed to rebuild)")
    args = ap.parse_args(argv)
    source, out_dir = Path(args.source), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.overwrite and any(out_dir.glob("*.ply")):
        print(f"{out_dir} already has meshes; pass --overwrite to rebuild", file=sys.stderr)
        return 2
    rows, skipped = [], []
    files = sorted(p for p in source.iterdir()
                   if p.suffix.lower() in (".off", ".obj", ".ply", ".stl"))
    for path in files:
        try:
            mesh = load_mesh(path, max_faces=None)
        except MeshDataError as exc:
            skipped.append(f"`{path.name}`: {exc}")
            continue
        closed = bool(mesh.is_watertight)
        if not closed and path.stem not in OPEN:
            skipped.append(f"`{path.name}`: not watertight ({len(mesh.faces)} faces, "
                           f"{_edge_report(mesh)})")
            continue
        row = vendor_one(path, out_dir, closed, args.overwrite)
        if row.get("dropped"):
            skipped.append(f"`{path.name}`: no decimation stayed closed and close "
                           f"({row['tried']})")
            continue
        rows.append(row)
        print(f"{row['name']:18s} {row['original_faces']:7d} -> {row['faces']:5d} faces  "
              f"watertight={row['watertight']!s:5s} chamfer={row['chamfer_l1']:.5f} "
              f"{row['bytes']:7d} B", flush=True)
    names = [r["name"] for r in rows]
    closed_names = [r["name"] for r in rows if r["watertight"]]
    held = set(SPLIT["test"]) | set(SPLIT["val"]) | set(SPLIT["open"])
    missing = sorted(held - set(names))
    if missing:
        raise SystemExit(f"split names not vendored: {missing}")
    split = {**SPLIT, "train": [n for n in closed_names if n not in held]}
    split_text = json.dumps(split, indent=1) + "\n"
    write_atomic(out_dir / "split.json", lambda t: Path(t).write_text(split_text), True)
    text = readme(rows, skipped, source)
    write_atomic(out_dir / "README.md", lambda t: Path(t).write_text(text), True)
    total = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    print(f"{len(rows)} meshes, {total} bytes in {out_dir}")
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"vendored meshes take {total} bytes > {MAX_TOTAL_BYTES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
