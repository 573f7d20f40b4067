"""Shape metrics as defined by Occupancy Networks (Mescheder et al. 2019), unit cube.

Point-to-point on surface samples (``scipy.spatial.cKDTree``), Euclidean distances (not
squared). Sampling sets a floor: two independent samplings of the *same* surface with n
points each are about ``0.5 * sqrt(area / n)`` apart on average (≈ 0.003 for a sphere of
radius 0.5 and n = 100,000), so a Chamfer-L1 near that is as good as it gets at that n.
"""

from __future__ import annotations

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from mscn_datasets.meshes import surface_points

__all__ = ["mesh_metrics", "volumetric_iou", "voxel_accuracy"]


def _is_empty(mesh: trimesh.Trimesh | None) -> bool:
    return mesh is None or len(mesh.faces) == 0 or float(mesh.area) <= 0.0


def mesh_metrics(pred: trimesh.Trimesh, truth: trimesh.Trimesh, n_points: int = 100_000,
                 seed: int = 0, fscore_threshold: float = 0.01) -> dict[str, float]:
    """Chamfer-L1, accuracy, completeness, normal consistency and F-score of ``pred``.

    ``accuracy``: mean distance from pred samples to the nearest truth sample;
    ``completeness``: truth → pred; ``chamfer_l1`` = their mean; ``normal_consistency``:
    mean ``|cos|`` between a sample's face normal and its nearest neighbour's, averaged
    both ways; ``fscore``: harmonic mean of precision (pred samples within the threshold
    of truth) and recall (truth within the threshold of pred), in [0, 1]; ``precision``
    and ``recall`` are returned too. An empty ``pred`` (a decoder that found no surface)
    gives NaN distances and normal consistency, precision = recall = fscore = 0 and
    ``empty`` = 1.0 (0.0 otherwise), so a mean over shapes cannot hide it.
    """
    if _is_empty(truth):
        raise ValueError("truth mesh is empty")
    if _is_empty(pred):
        nan = float("nan")
        return {"chamfer_l1": nan, "accuracy": nan, "completeness": nan,
                "normal_consistency": nan, "fscore": 0.0, "precision": 0.0, "recall": 0.0,
                "empty": 1.0}
    p, pn = surface_points(pred, n_points, seed=seed)
    t, tn = surface_points(truth, n_points, seed=seed + 1)
    d_pt, i_pt = cKDTree(t).query(p)  # pred → truth
    d_tp, i_tp = cKDTree(p).query(t)  # truth → pred
    accuracy, completeness = float(d_pt.mean()), float(d_tp.mean())
    nc_p = np.abs(np.sum(pn * tn[i_pt], axis=1)).mean()
    nc_t = np.abs(np.sum(tn * pn[i_tp], axis=1)).mean()
    precision = float(np.mean(d_pt < fscore_threshold))
    recall = float(np.mean(d_tp < fscore_threshold))
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"chamfer_l1": 0.5 * (accuracy + completeness), "accuracy": accuracy,
            "completeness": completeness, "normal_consistency": float(0.5 * (nc_p + nc_t)),
            "fscore": float(f), "precision": precision, "recall": recall, "empty": 0.0}


def _pair(pred_occ, truth_occ) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(pred_occ, dtype=bool), np.asarray(truth_occ, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"occupancy shapes differ: {a.shape} vs {b.shape}")
    return a, b


def volumetric_iou(pred_occ: np.ndarray, truth_occ: np.ndarray) -> float:
    """|pred ∧ truth| / |pred ∨ truth| over any-shaped bool arrays; both empty → 1.0."""
    a, b = _pair(pred_occ, truth_occ)
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


def voxel_accuracy(pred_occ: np.ndarray, truth_occ: np.ndarray) -> float:
    """Fraction of cells where pred and truth agree."""
    a, b = _pair(pred_occ, truth_occ)
    return float(np.mean(a == b)) if a.size else 1.0
