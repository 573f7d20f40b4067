"""mscn_datasets: readers for real data, plus small vendored real-data subsets."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR", "vendored_path"]

DATA_DIR = Path(__file__).resolve().parent / "data"


def vendored_path(name: str) -> Path:
    """Path of a vendored data file shipped in ``mscn_datasets/data`` (see its README).

    Why a function: callers (tests, demo) must not hard-code the install layout.
    Raises FileNotFoundError listing what is available if ``name`` is not there.
    """
    p = DATA_DIR / name
    if not p.exists():
        have = sorted(x.name for x in DATA_DIR.iterdir()) if DATA_DIR.is_dir() else []
        raise FileNotFoundError(f"no vendored file {name!r} in {DATA_DIR}; available: {have}")
    return p
