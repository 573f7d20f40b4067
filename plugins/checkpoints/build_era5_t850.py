"""Rebuild the shipped ERA5 t850 checkpoint from the vendored data: `make checkpoint`.

Training: ensemble members 0-6 (28 fields), validation/keep-best: member 7 (4 fields).
Members 8 and 9 are never seen: `make demo` and bench/sphere_quality.py use them.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "datasets" / "data" / "era5_t_z_3deg_2017-01-01_float32.nc"

ARGS = [
    "meta-train", "--modality", "sphere", "--data", str(DATA), "--var", "t",
    "--sel", "isobaricInhPa=850", "--sel", "number=0,1,2,3,4,5,6", "--val-sel", "number=7",
    # scaled-down CPU config (the paper's 15×512 runs for days on accelerators)
    "--depth", "6", "--width", "128", "--w0", "30", "--w0-first", "30",
    "--method", "mscn", "--budget", "256", "--inner-steps", "3",
    "--outer-steps", "600", "--outer-lr", "3e-4", "--batch-size", "8",
    "--points-per-item", "2048", "--val-every", "50", "--seed", "0",
    "--log-path", str(HERE / "era5_t850.train.jsonl"),
    "-o", str(HERE / "era5_t850.safetensors"), "--overwrite",
]

if __name__ == "__main__":
    (HERE / "era5_t850.train.jsonl").unlink(missing_ok=True)
    sys.exit(subprocess.call([sys.executable, "-m", "mscn_core.cli", *ARGS]))
