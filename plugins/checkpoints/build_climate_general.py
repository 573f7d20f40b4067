"""Rebuild the general climate checkpoints; no arguments: the default (make climate-checkpoint).

One network for any variable, level and date: meta-trained on the diverse real fields
vendored in datasets/data/climate_general/ (made by
`python -m mscn_datasets.make_vendored`, provenance in datasets/data/README.md), every
field scaled by its own [min, max] (`--scaling field`, two numbers per field in a stream).

Split by file and date, never by ensemble member: train/ = earlier dates of each file
(and the single-time files), val/ (keep-best) = later dates of the same files. The test
sets of bench/sphere_vs_sh.py (ERA5 2017-01-01, COADS Jan-Mar, the T42 U300, MPI-OM and
geodesic files) are never in either.

    python plugins/checkpoints/build_climate_general.py [--outer-steps N] [--resume]
    python plugins/checkpoints/build_climate_general.py --sh-degree -1   # the plain one
    python plugins/checkpoints/build_climate_general.py --budget 64      # or 1024

No arguments (= ``--budget 192 --sh-degree 7``, what `make climate-checkpoint` passes):
``climate_general_b192_sh7.safetensors``, the sphere modality's ``default_checkpoint``
(what ``mscn fit/evaluate/encode`` and ``ds.mscn`` use without a checkpoint): each
field's degree-7 spherical-harmonic fit (64 coefficients) plus 192 modulations for what it
misses -- 256 numbers per field in all (DESIGN §8's SH-base route).

``--sh-degree -1`` (or ``--budget 256``): the plain recipe, 256 modulations and no SH
base, ``climate_general.safetensors`` (the ``--general`` checkpoint of
bench/sphere_vs_sh.py). ``--budget 64`` and ``--budget 1024`` build the plain recipe at
those budgets (``climate_general_b64/_b1024.safetensors``, gitignored, for the 64 / 1024
rows of bench/sphere_vs_sh.py through ``--extra``); 1024 modulations need more than the
640 shift dimensions of a 6x128 network, so that one is 6x256 (chosen from the budget:
there is no width flag). Without ``--budget`` the budget is what leaves 256 numbers per
field beside the SH base, 256 - (L+1)²; without ``--sh-degree`` the degree is 7 when no
``--budget`` is given, else -1 (none).
"""

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "datasets" / "data" / "climate_general"
OUTER_STEPS = 1800  # ~14 minutes on 1 thread of a shared 2-core machine (README)


DEFAULT_SH_DEGREE = 7  # no arguments: the sphere modality's default checkpoint
NUMBERS_PER_FIELD = 256  # modulations + SH coefficients when --budget is not given


def recipe(budget: int | None = None, sh_degree: int | None = None) -> tuple[int, int]:
    """(modulations, SH degree) from the command line's ``--budget``/``--sh-degree``:
    neither: the default checkpoint (192, 7); a budget alone: the plain recipe (no SH
    base); a degree alone: 256 numbers per field in all."""
    if sh_degree is None:
        sh_degree = DEFAULT_SH_DEGREE if budget is None else -1
    if budget is None:
        budget = NUMBERS_PER_FIELD - ((sh_degree + 1) ** 2 if sh_degree >= 0 else 0)
    return budget, sh_degree


def paths(budget: int, sh_degree: int = -1) -> tuple[Path, Path]:
    """(checkpoint, training log) of the checkpoint with ``budget`` modulations (and an
    SH base of degree ``sh_degree``)."""
    stem = "climate_general" if budget == 256 else f"climate_general_b{budget}"
    if sh_degree >= 0:
        stem += f"_sh{sh_degree}"
    return HERE / f"{stem}.safetensors", HERE / f"{stem}.train.jsonl"


def width_for(budget: int) -> int:
    """128 while the budget fits a 6x128 network's 640 shifts, else 256."""
    return 128 if budget <= 640 else 256


def args_for(outer_steps: int, threads: int, budget: int = 256, sh_degree: int = -1
             ) -> list[str]:
    out, log = paths(budget, sh_degree)
    return [
        "meta-train", "--modality", "sphere",
        "--data", str(DATA / "train" / "*.nc"), "--val-data", str(DATA / "val" / "*.nc"),
        "--scaling", "field", "--sh-degree", str(sh_degree),
        # the calibration config of DESIGN §8 (the paper's 15×512 runs for days on GPUs)
        "--depth", "6", "--width", str(width_for(budget)), "--w0", "30", "--w0-first", "30",
        "--method", "mscn", "--budget", str(budget), "--inner-steps", "3",
        "--lr-init-low", "0.05", "--lr-init-high", "0.5",
        "--outer-steps", str(outer_steps), "--outer-lr", "3e-4", "--batch-size", "8",
        "--points-per-item", "2048", "--val-every", "100", "--val-points", "2048",
        "--save-every", "100", "--seed", "0", "--threads", str(threads),
        "--log-path", str(log), "-o", str(out), "--overwrite",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outer-steps", type=int, default=OUTER_STEPS)
    # 1 (the shipped run): another process on a 2-core machine makes 2 threads' OpenMP
    # spin-waits ~8x slower; on a quiet machine --threads 2 runs ~1.5x faster
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run")
    ap.add_argument("--budget", type=int, default=None,
                    help="modulations (default: 256 - (L+1)², i.e. 192 with the default "
                         "SH base of degree 7: the CLI's default checkpoint)")
    ap.add_argument("--sh-degree", type=int, default=None,
                    help="spherical-harmonic base degree L ((L+1)² coefficients per field "
                         "besides the modulations; -1: none, the plain recipe; default 7 "
                         "without --budget, else -1)")
    a = ap.parse_args()
    budget, sh_degree = recipe(a.budget, a.sh_degree)
    cmd = args_for(a.outer_steps, a.threads, budget, sh_degree)
    print(f"building {paths(budget, sh_degree)[0].name} ({budget} modulations, SH base "
          f"degree {sh_degree})", file=sys.stderr)
    if a.resume:
        cmd.append("--resume")
    else:
        paths(budget, sh_degree)[1].unlink(missing_ok=True)
    return subprocess.call([sys.executable, "-m", "mscn_core.cli", *cmd])


if __name__ == "__main__":
    sys.exit(main())
