"""Cut the vendored train / validation / held-out test crops from the shared Earth texture.

Why crops of one map: the image modality needs many small real images of one kind to
meta-learn from, and the only real photograph these machines can reach is the 2048×1024
Earth day map in the PyPI ``pyvista`` wheel (``/work/shared/data/2k_earth_daymap.jpg``).

Held out means *other places*: the split is by longitude band, so no test crop shares a
pixel, or a region, with a training crop.

* train      x0 < 1280        (180°W–45°E: the Americas, Europe, Africa)
* validation 1280 ≤ x0 < 1536 (45°E–90°E: Arabia, Iran, India, Central Asia)
* test       x0 ≥ 1600        (101°E–180°: East and South-East Asia, Indonesia, Australia)

Only textured tiles are kept (mean RGB standard deviation above ``--min-std``: open ocean
and ice sheets are flat) between 67.5°N and 67.5°S. Tile origins are offset by 3 px from the
source JPEG's 8×8 block grid, so re-compressing a crop with JPEG gets no free ride from
the source's own block boundaries.

Usage: ``python make_crops.py [--source PATH]`` (re-running rewrites the same files).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mscn_core.atomic import save_bytes_atomic, write_atomic

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[2] / "shared" / "data" / "2k_earth_daymap.jpg"
SPLITS = {"train": (0, 1280, 40), "val": (1280, 1536, 8), "test": (1600, 2048, 16)}
TILE, OFFSET = 32, 3
ROWS = (128, 896)  # 67.5°N .. 67.5°S on the 1024-row map

README = """# Image crops for the `image` example plugin

{n} RGB crops of {tile}×{tile} pixels, PNG, cut by `../make_crops.py` from
`2k_earth_daymap.jpg` ({w}×{h}), the Earth day-map texture shipped in the PyPI `pyvista`
wheel (`pyvista/examples/`), where it is credited to **Solar System Scope
(https://www.solarsystemscope.com/textures/), licence CC-BY 4.0**. These crops are a
modified (cropped) excerpt of that work and are distributed under the same licence:
attribute "Earth texture © Solar System Scope, CC-BY 4.0" when you reuse them.

Source file SHA-256: `{sha}`.

The split is by region (longitude band of the equirectangular map), so the held-out test
crops show other places than the training crops, never overlapping ones:

| split | folder | crops | map columns (x0) | longitudes | regions |
|---|---|---|---|---|---|
| train | `train/` | {n_train} | 0–1279 | 180°W–45°E | the Americas, Europe, Africa |
| validation | `val/` | {n_val} | 1280–1535 | 45°E–90°E | Arabia, Iran, India, Central Asia |
| test (held out) | `test/` | {n_test} | 1600–2047 | 101°E–180° | E & SE Asia, Australia |

File names give the crop's top-left pixel in the map (`x0451_y0355.png`); `crops.json`
lists every crop with its split, pixel box and centre longitude/latitude. Tiles are
textured ones (mean RGB std > {min_std}) between 67.5°N and 67.5°S, picked at random (seed
{seed}) from a {tile}-px grid offset by {offset} px from the source's 8×8 JPEG blocks.

Rebuild: `python ../make_crops.py` (needs `/work/shared/data/2k_earth_daymap.jpg`).

## Files

{listing}
"""


def candidate_tiles(rgb: np.ndarray, min_std: float) -> list[tuple[int, int, float]]:
    """(x0, y0, std) of every textured grid tile inside the latitude band."""
    h, w, _ = rgb.shape
    out = []
    for y0 in range(ROWS[0] + OFFSET, ROWS[1] - TILE + 1, TILE):
        for x0 in range(OFFSET, w - TILE + 1, TILE):
            std = float(rgb[y0:y0 + TILE, x0:x0 + TILE].std(axis=(0, 1)).mean())
            if std > min_std:
                out.append((x0, y0, std))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--out", type=Path, default=HERE / "data")
    ap.add_argument("--min-std", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import hashlib

    raw = args.source.read_bytes()
    with Image.open(args.source) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w, _ = rgb.shape
    rng = np.random.default_rng(args.seed)
    tiles = candidate_tiles(rgb.astype(np.float64), args.min_std)
    manifest = []
    for split, (lo, hi, n) in SPLITS.items():
        pool = [t for t in tiles if lo <= t[0] and t[0] + TILE <= hi]
        pick = sorted(rng.choice(len(pool), size=n, replace=False))
        (args.out / split).mkdir(parents=True, exist_ok=True)
        for i in pick:
            x0, y0, std = pool[i]
            name = f"x{x0:04d}_y{y0:04d}.png"
            crop = Image.fromarray(rgb[y0:y0 + TILE, x0:x0 + TILE])
            write_atomic(args.out / split / name,
                         lambda tmp, c=crop: c.save(tmp, format="PNG", optimize=True),
                         overwrite=True)
            cx, cy = x0 + TILE / 2, y0 + TILE / 2
            manifest.append({"split": split, "file": f"{split}/{name}", "x0": x0, "y0": y0,
                             "width": TILE, "height": TILE, "mean_std": round(std, 2),
                             "lon": round(cx / w * 360 - 180, 2),
                             "lat": round(90 - cy / h * 180, 2)})
    save_bytes_atomic((json.dumps(manifest, indent=1) + "\n").encode(),
                      args.out / "crops.json", overwrite=True)
    listing = "\n".join(f"- `{m['file']}` ({m['lon']:+.1f}°, {m['lat']:+.1f}°)"
                        for m in manifest)
    text = README.format(n=len(manifest), tile=TILE, w=w, h=h,
                         sha=hashlib.sha256(raw).hexdigest(), min_std=args.min_std,
                         seed=args.seed, offset=OFFSET, listing=listing,
                         **{f"n_{s}": SPLITS[s][2] for s in SPLITS})
    save_bytes_atomic(text.encode(), args.out / "README.md", overwrite=True)
    print(f"wrote {len(manifest)} crops under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
