"""Occupancy grids (the paper's ShapeNet voxels): binvox / IM-NET HDF5 / any mesh in.

A mesh is voxelised at ``resolution``³ in its unit frame (bounding box centred, longest
side 1); a binvox file keeps its own translate/scale as the frame. Voxel ``[i, j, k]`` is
the network point ``2 × (−0.5 + (i + ½)/R, …)``, so the grid fills [−1, 1]³.

Loss: binary cross-entropy with logits ``LOGIT_SCALE·(f − ½)`` on *balanced* samples
(``balance`` of each step's samples from occupied voxels, the rest from empty ones). On
a grid that is ~90 % empty, uniform samples teach the network to say "empty" and still
score 90 % accuracy; balancing makes the few occupied voxels count. The price is a bias
towards "occupied" near the surface, which the IoU (reported beside the paper's voxel
accuracy) shows and accuracy hides. It is undone at decision time: a balanced classifier's
odds are the true odds times ``(b/(1−b))·((1−π)/π)`` for balance ``b`` and the grid's
occupied fraction ``π``, so a voxel is occupied when its probability exceeds the threshold
of :func:`occupied_level`. ``π`` travels with each item (meta ``occupied``, a few bytes);
streams without it decide at ½ as before (held-out bunny IoU 0.875 → 0.904, cow 0.73 →
0.88 after refinement).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mscn_core import limits
from mscn_core.modality import Modality, PredictFn, checkpoint_settings
from mscn_core.signals import Batch, Signal
from mscn_core.streaming import ItemRef

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from mscn_datasets import meshes

# torch (~1 s), trimesh and the mesh readers are imported by the functions that use them:
# listing plugins (``mscn modalities``) imports this module and must stay fast. A missing
# shapes extra still breaks the plugin here, at import, so the listing reports it.
_MISSING = [m for m in ("trimesh", "scipy") if importlib.util.find_spec(m) is None]
if _MISSING:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the voxel modality needs the shapes extra (pip install "
                      f"'mscn[shapes]'): No module named {_MISSING[0]!r}")

LOGIT_SCALE = 10.0  # raw output 0.5 ± 0.3 ↔ probability 0.05…0.95
MAX_SHIFT = 0.4  # most the decision level moves from a raw output of ½ (see occupied_level)


def _probability(raw: Tensor) -> np.ndarray:
    """Occupancy probability of the network's raw outputs (the loss's logits)."""
    import torch

    return torch.sigmoid(LOGIT_SCALE * (raw.double() - 0.5)).numpy()


def occupied_level(meta: dict, balance: float) -> float:
    """The probability above which a voxel is occupied: ½ corrected from the balanced
    training prior ``balance`` to the item's occupied fraction ``meta["occupied"]`` (½
    when absent: streams written before it). The correction is capped at a raw output of
    0.9 (probability 0.982), so an output on the occupied target (1) always counts as
    occupied, however sparse the grid."""
    frac = meta.get("occupied")
    if frac is None:
        return 0.5
    frac = min(max(float(frac), 1e-4), 1 - 1e-4)
    b = min(max(float(balance), 1e-4), 1 - 1e-4)
    logit = min(np.log(b / (1 - b)) + np.log((1 - frac) / frac), LOGIT_SCALE * MAX_SHIFT)
    return float(1 / (1 + np.exp(-logit)))
NET_SCALE = 2.0  # network coordinates = NET_SCALE × unit-frame coordinates
NPZ_MAGIC = b"PK\x03\x04"
MAX_RESOLUTION = 1024  # voxels per side an item may declare in a stream


@dataclass
class VoxelOptions:
    """Grid, sampling and output settings of the voxel modality."""

    resolution: int = 64  # voxels per side when a mesh is voxelised (ShapeNet: 64)
    # decode/fit: write the occupancy at this resolution instead of the item's
    output_resolution: int | None = None
    balance: float = 0.5  # share of each step's samples drawn from occupied voxels
    max_faces: int = 500_000  # larger meshes are decimated before voxelising
    # training augmentation: each mesh also as this many random rotations (seeded)
    rotations: int = 0
    # mscn view: open an interactive window too (needs a display)
    interactive: bool = False


def _opts(options: VoxelOptions | None) -> VoxelOptions:
    return options if options is not None else VoxelOptions()


def read_npz(path: str | os.PathLike) -> list[meshes.Shape]:
    """Our own .npz (``save``): occupancy (N, R, R, R), names and frames as JSON."""
    from mscn_datasets import meshes

    try:
        with np.load(path, allow_pickle=False) as z:
            occ = np.asarray(z["occupancy"]).astype(bool)
            info = json.loads(bytes(z["info"]).decode())
    except (OSError, ValueError, KeyError) as err:
        raise meshes.MeshDataError(f"{path}: not an mscn voxel .npz ({err})") from None
    if occ.ndim != 4 or len(set(occ.shape[1:])) != 1:
        raise meshes.MeshDataError(f"{path}: occupancy must be (N, R, R, R), got {occ.shape}")
    return [meshes.Shape(name=n, source=str(path), frame=meshes.Frame.from_dict(f),
                         mesh=None, occupancy=o, watertight=False)
            for o, n, f in zip(occ, info["names"], info["frames"], strict=True)]


def _array_header(f) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran order, dtype) of a .npy stream, leaving it at the first value."""
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    return read(f)


def _npz_header(path: str | os.PathLike) -> tuple[list, list, tuple, bool]:
    """Names, frames, occupancy shape and whether the occupancy is stored as a plain
    C-order array, read from an mscn .npz without its grids (lazy listing)."""
    import zipfile

    from mscn_datasets import meshes

    try:
        with zipfile.ZipFile(path) as z:
            with z.open("info.npy") as f:
                info = json.loads(bytes(np.lib.format.read_array(f, allow_pickle=False))
                                  .decode())
            with z.open("occupancy.npy") as f:
                shape, fortran, dtype = _array_header(f)
        names, frames = list(info["names"]), list(info["frames"])
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise meshes.MeshDataError(f"{path}: not an mscn voxel .npz ({err})") from None
    if len(shape) != 4 or len(set(shape[1:])) != 1:
        raise meshes.MeshDataError(f"{path}: occupancy must be (N, R, R, R), got {shape}")
    if not len(names) == len(frames) == shape[0]:
        raise meshes.MeshDataError(f"{path}: {shape[0]} grids but {len(names)} names and "
                                   f"{len(frames)} frames")
    return names, frames, tuple(shape), not fortran and not dtype.hasobject


def _npz_item(path: str | os.PathLike, i: int) -> meshes.Shape:
    """Grid ``i`` of an mscn .npz as :func:`read_npz` gives it, decompressing the archive
    only up to that grid (not holding the others)."""
    import zipfile

    from mscn_datasets import meshes

    names, frames, shape, plain = _npz_header(path)
    if not plain:  # not a layout to slice: the whole archive, once
        return read_npz(path)[i]
    with zipfile.ZipFile(path) as z, z.open("occupancy.npy") as f:
        dtype = _array_header(f)[2]
        n = int(np.prod(shape[1:])) * dtype.itemsize
        f.seek(f.tell() + i * n)
        raw = f.read(n)
    occ = np.frombuffer(raw, dtype=dtype).reshape(shape[1:]).astype(bool)
    return meshes.Shape(name=names[i], source=str(path), frame=meshes.Frame.from_dict(frames[i]),
                        mesh=None, occupancy=occ, watertight=False)


def _hdf5_item(path: str | os.PathLike, i: int) -> meshes.Shape:
    """Grid ``i`` of an IM-NET HDF5 file as :func:`meshes.read_voxels_hdf5` gives it."""
    import h5py

    from mscn_datasets import meshes

    meshes.voxels_hdf5_count(path)  # its checks, as read gives them
    path = Path(path)
    with h5py.File(path, "r") as f:
        ds = f["voxels"]
        grid = np.asarray(ds[i]).reshape(ds.shape[1:4]) > 0
    return meshes.Shape(name=f"{path.stem}#{i}", source=str(path), frame=meshes.Frame.identity(),
                        mesh=None, occupancy=np.ascontiguousarray(grid), watertight=False)


class VoxelModality(Modality):
    name = "voxel"
    header_words = ('"frame":[', '"voxel"')  # the stream header's preset dictionary: FROZEN
    description = "occupancy grids (binvox, IM-NET HDF5, or any mesh voxelised), 64³"
    in_dim = 3
    out_dim = 1
    file_extensions = (".binvox", ".h5", ".hdf5", ".npz")
    options = VoxelOptions
    points_per_step = 65536  # a 64³ grid (262k voxels) adapts on a quarter per step
    view_names = ("voxels",)

    def __init__(self) -> None:
        self.balance = VoxelOptions.balance
        self._from_checkpoint = False

    def guess_can_open(self, path: str | os.PathLike) -> bool:
        """binvox, HDF5 with a ``voxels`` dataset, or our .npz; meshes only when asked
        (``--modality voxel``): by default a mesh is the SDF modality's."""
        from mscn_datasets import meshes

        p = Path(path)
        if not p.is_file():
            return False
        if p.suffix.lower() == ".npz":
            return p.read_bytes()[:4] == NPZ_MAGIC
        return p.suffix.lower() not in meshes.MESH_EXTENSIONS and meshes.is_shape_file(p)

    def read(self, path: str | os.PathLike, options: VoxelOptions | None = None
             ) -> list[meshes.Shape]:
        from mscn_datasets import meshes

        o = _opts(options)
        if Path(path).suffix.lower() == ".npz":
            return read_npz(path)
        shapes = meshes.read_shapes(path, max_faces=o.max_faces)
        if o.rotations:
            shapes += [r for s in shapes if s.mesh is not None
                       for r in meshes.rotated_copies(s, o.rotations)]
        out = []
        for s in shapes:
            if s.occupancy is None:
                if not s.watertight:
                    meshes.check_inside_test(s.mesh, str(path))
                s = meshes.Shape(s.name, s.source, s.frame, s.mesh,
                                 meshes.voxelize(s.mesh, o.resolution), s.watertight)
            out.append(s)
        return out

    def scan(self, path: str | os.PathLike, options: VoxelOptions | None = None
             ) -> list[ItemRef]:
        """References to :meth:`read`'s items, in its order, without reading a grid or
        parsing a mesh: an HDF5 file's ``stem#i`` from its dataset's shape, an .npz's
        names from its small ``info`` member and its grids' header, a binvox's or mesh's
        stem (and a mesh's ``rotations`` copies, ``stem@rotK``). A mesh that cannot be
        read or is refused is found when its item is loaded."""
        from mscn_datasets import meshes

        o = _opts(options)
        key, stem = str(path), Path(path).stem
        if Path(path).suffix.lower() == ".npz":
            names = _npz_header(path)[0]
            return [ItemRef(("npz", key, i), str(n)) for i, n in enumerate(names)]
        kind = meshes.shape_file_kind(path)
        if kind == "hdf5":
            return [ItemRef(("hdf5", key, i), f"{stem}#{i}")
                    for i in range(meshes.voxels_hdf5_count(path))]
        if kind == "binvox":
            return [ItemRef(("binvox", key, None), stem)]
        return [ItemRef(("mesh", key, None), stem)] + [
            ItemRef(("mesh", key, k), meshes.rotated_name(stem, k)) for k in range(o.rotations)]

    def load(self, ref: ItemRef, options: VoxelOptions | None = None) -> meshes.Shape:
        """One item of :meth:`scan`, as :meth:`read` gives it: one grid of an .npz or
        HDF5 file, or a mesh (a rotated copy computed alone) voxelised after the same
        inside test (the original's too: ``read`` refuses the file when it fails)."""
        from mscn_datasets import meshes

        o = _opts(options)
        kind, path, k = ref.key
        if kind == "npz":
            return _npz_item(path, k)
        if kind == "hdf5":
            return _hdf5_item(path, k)
        if kind == "binvox":
            return meshes.read_binvox(path)
        shape = meshes.read_shapes(path, max_faces=o.max_faces)[0]
        todo = [shape] if k is None else [shape, meshes.rotated_copy(shape, k)]
        for s in todo:
            if s.mesh is not None and not s.watertight:
                meshes.check_inside_test(s.mesh, str(path))
        s = todo[-1]
        if s.occupancy is not None:  # the file turned out to hold a grid
            return s
        return meshes.Shape(s.name, s.source, s.frame, s.mesh,
                            meshes.voxelize(s.mesh, o.resolution), s.watertight)

    def item_label(self, item: meshes.Shape) -> str:
        return item.name

    # -- balance: from the options at meta-training, then kept in the checkpoint --------
    def state(self) -> dict:
        return {"balance": self.balance}

    def load_state(self, state: dict) -> None:
        self.balance = float(state.get("balance", self.balance))
        self._from_checkpoint = True

    # -- signals ----------------------------------------------------------------------
    def to_signal(self, item: meshes.Shape, options: VoxelOptions | None = None) -> Signal:
        import torch

        from mscn_datasets import meshes

        o = _opts(options)
        stored = {"balance": self.balance} if self._from_checkpoint else None
        self.balance = checkpoint_settings(o, ("balance",), stored)["balance"]
        occ = np.asarray(item.occupancy, dtype=bool)
        r = occ.shape[0]
        if occ.ndim != 3 or occ.shape != (r, r, r):
            raise ValueError(f"{item.name}: occupancy must be a cube (R, R, R), got {occ.shape}")
        if not occ.any():
            raise ValueError(f"{item.name}: the occupancy grid is empty")
        pts = meshes.grid_points(r, 0.5, centres=True)
        meta = {"name": item.name, "frame": item.frame.as_list(), "resolution": r,
                "occupied": float(f"{occ.mean():.4g}")}
        return Signal(torch.from_numpy(NET_SCALE * pts),
                      torch.from_numpy(occ.reshape(-1, 1).astype(np.float32)), None, meta)

    def sample(self, signal: Signal, n: int, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Balanced: ``balance`` of the samples from occupied voxels, the rest empty."""
        import torch

        occupied = signal.targets[:, 0] > 0.5
        on, off = occupied.nonzero().squeeze(1), (~occupied).nonzero().squeeze(1)
        k = int(round(self.balance * n)) if len(off) else n
        k = k if len(on) else 0
        pick = torch.cat([on[torch.randint(max(len(on), 1), (k,), generator=generator)],
                          off[torch.randint(max(len(off), 1), (n - k,), generator=generator)]])
        return signal.coords[pick], signal.targets[pick], torch.ones(n)

    def objective(self, field, batch: Batch) -> Tensor:
        import torch.nn.functional as F

        logits = LOGIT_SCALE * (self.render(field, batch.coords) - 0.5)
        bce = F.binary_cross_entropy_with_logits(logits, batch.targets,
                                                 reduction="none").mean(dim=-1)
        return (bce * batch.weights).sum(dim=1) / batch.weights.sum(dim=1).clamp_min(1e-12)

    def n_values(self, signal: Signal) -> int:
        """Voxels of the grid: bits per value are bits per voxel."""
        return signal.n_points

    def metrics(self, signal: Signal, pred: Tensor) -> dict[str, float]:
        """Voxel accuracy (the paper's) and IoU (telling on mostly-empty grids)."""
        from mscn_datasets import shape_metrics

        p = _probability(pred.detach().reshape(-1)) > occupied_level(signal.meta, self.balance)
        t = signal.targets.reshape(-1).numpy() > 0.5
        return {"accuracy": shape_metrics.voxel_accuracy(p, t),
                "iou": shape_metrics.volumetric_iou(p, t),
                "occupied_fraction": float(t.mean())}

    # -- artifacts --------------------------------------------------------------------
    def check_meta(self, meta: dict, options: VoxelOptions | None = None) -> int:
        """Name, frame and grid resolution as :meth:`reconstruct` uses them; the values
        are the voxels of the output grid (``output_resolution`` or the item's).

        The frame is ``[cx, cy, cz, scale]`` (float32 precision, see
        ``meshes.Frame.as_list``); streams written before that layout (a
        ``{"center", "scale"}`` object) still decode."""
        from mscn_datasets import meshes

        if not isinstance(meta.get("name"), str):
            raise ValueError(f"name must be a string, got {type(meta.get('name')).__name__}")
        meshes.Frame.from_meta(meta.get("frame"))
        frac = meta.get("occupied")
        if frac is not None and not (isinstance(frac, int | float) and not isinstance(
                frac, bool) and 0 < frac <= 1):
            raise ValueError(f"occupied must be a fraction in (0, 1], got {frac!r}")
        r = limits.check_count(meta.get("resolution"), "resolution", 2, MAX_RESOLUTION)
        out = _opts(options).output_resolution
        r = limits.check_count(out, "output resolution", 2) if out else r  # as reconstruct
        return limits.check_output_values(r**3, f"a {r}^3 grid")

    def reconstruct(self, meta: dict, predict: PredictFn, options: VoxelOptions | None = None,
                    template: meshes.Shape | None = None) -> meshes.Shape:
        """Occupancy at any resolution, and its marching-cubes mesh (unit frame)."""
        import torch

        from mscn_datasets import meshes

        if template is None:
            self.check_meta(meta, options)  # a stream's meta: validated before any allocation
        r = _opts(options).output_resolution or int(meta["resolution"])
        if r < 2:
            raise ValueError(f"output resolution must be >= 2, got {r}")
        pts = torch.from_numpy(NET_SCALE * meshes.grid_points(r, 0.5, centres=True))
        prob = _probability(predict(pts).reshape(r, r, r))
        level = occupied_level(meta, self.balance)
        if not (prob > level).any():  # the item had occupied voxels: never decode none
            level = min(level, 0.5)
        mesh = meshes.marching_cubes(prob, level, 0.5 - 0.5 / r, inside_negative=False)
        frame = template.frame if template is not None else meshes.Frame.from_meta(meta["frame"])
        return meshes.Shape(name=meta["name"], source="mscn reconstruction", frame=frame,
                            mesh=mesh, occupancy=prob > level,
                            watertight=bool(mesh.is_watertight))

    def save(self, artifacts: list[meshes.Shape], path: str | os.PathLike,
             overwrite: bool = False, provenance: dict | None = None) -> Path:
        """By extension: .npz (all items, frames), .binvox (one item, original frame),
        .h5 (IM-NET layout), or a mesh format (marching cubes, original frame)."""
        from mscn_core.atomic import write_atomic
        from mscn_datasets import meshes

        path = Path(path)
        shapes = artifacts if isinstance(artifacts, list) else [artifacts]
        ext = path.suffix.lower()
        if ext == ".npz":
            info = json.dumps({"names": [s.name for s in shapes],
                               "frames": [s.frame.as_dict() for s in shapes],
                               "provenance": provenance or {}}).encode()

            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, occupancy=np.stack([s.occupancy for s in shapes]),
                                        info=np.frombuffer(info, dtype=np.uint8))
            return write_atomic(path, write, overwrite)
        if ext == ".binvox":
            if len(shapes) != 1:
                raise ValueError(f"{path}: a binvox file holds one grid, not {len(shapes)}; "
                                 "write .npz or .h5")
            return meshes.write_binvox(shapes[0].occupancy, path, shapes[0].frame,
                                       overwrite=overwrite)
        if ext in (".h5", ".hdf5"):
            return meshes.write_voxels_hdf5(np.stack([s.occupancy for s in shapes]), path,
                                            overwrite=overwrite)
        if ext in meshes.MESH_EXTENSIONS:
            return meshes.save_meshes(shapes, path, overwrite, provenance)
        raise ValueError(f"{path}: unknown voxel output {ext!r}; use .npz, .binvox, .h5 "
                         f"or a mesh format ({', '.join(meshes.MESH_EXTENSIONS)})")

    def view(self, truth: meshes.Shape, recon: meshes.Shape, path: str | os.PathLike,
             options: VoxelOptions | None = None, overwrite: bool = False,
             animation: str | os.PathLike | None = None) -> Path:
        """Truth voxels beside the reconstruction: false positives red, misses blue."""
        from mscn_datasets import meshes, shape_metrics
        from mscn_viewers import mesh3d

        path = Path(path)
        if not overwrite:
            for p in (path, animation):
                if p is not None and Path(p).exists():
                    raise FileExistsError(f"{p} exists; pass --overwrite to replace it")
        rec = occupancy_in_frame(recon, truth)
        stats = {"accuracy": shape_metrics.voxel_accuracy(rec, truth.occupancy),
                 "iou": shape_metrics.volumetric_iou(rec, truth.occupancy)}
        out = mesh3d.render_voxel_comparison(truth.occupancy, rec, path, title=truth.name,
                                             stats=stats, overwrite=overwrite)
        if animation is not None or _opts(options).interactive:
            mesh = meshes.marching_cubes(rec.astype(float), 0.5, 0.5 - 0.5 / rec.shape[0],
                                         inside_negative=False)
            if animation is not None:
                mesh3d.turntable_gif(mesh, animation, overwrite=overwrite)
            if _opts(options).interactive:
                mesh3d.show_interactive([mesh])
        return out


def occupancy_in_frame(shape: meshes.Shape, truth: meshes.Shape) -> np.ndarray:
    """``shape``'s occupancy on ``truth``'s grid (same frame and resolution), resampled
    by nearest voxel through the original frame when they differ."""
    from mscn_datasets import meshes

    r = truth.occupancy.shape[0]
    same = (shape.occupancy is not None and shape.occupancy.shape == truth.occupancy.shape
            and np.allclose(shape.frame.center, truth.frame.center, atol=1e-6 * truth.frame.scale)
            and np.isclose(shape.frame.scale, truth.frame.scale, rtol=1e-6))
    if same:
        return shape.occupancy
    pts = truth.frame.to_original(meshes.grid_points(r, 0.5, centres=True).astype(np.float64))
    if shape.occupancy is None:
        m = shape.original_mesh()
        return meshes.occupancy(m, pts).reshape(r, r, r)
    q = shape.occupancy.shape[0]
    ijk = np.floor((shape.frame.to_unit(pts) + 0.5) * q).astype(int)
    inside = np.all((ijk >= 0) & (ijk < q), axis=1)
    out = np.zeros(len(pts), dtype=bool)
    out[inside] = shape.occupancy[tuple(ijk[inside].T)]
    return out.reshape(r, r, r)
