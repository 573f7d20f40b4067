"""Signed distance functions of real meshes: any mesh in, a marching-cubes mesh out.

Frames. A mesh is normalised to the unit cube (bounding box centred, longest side 1),
where Chamfer-L1 and F-score are measured (Occupancy Networks' convention); the network
sees ``2 ×`` those coordinates, so the shape fills [−1, 1]³. The frame (centre, scale)
travels in the item metadata, so every output returns to the file's original frame.

Sign: negative inside (open3d / DeepSDF). Targets are in network units.

Loss: clamped L1 (DeepSDF): ``|clamp(f, ±δ) − clamp(sdf, ±δ)|`` with δ = ``truncation``,
so capacity goes to the band around the surface rather than to far-away distances;
optional eikonal term ``λ·(‖∇f‖ − 1)²`` on the same samples.

Samples: a fixed pool per item = a ``metric_grid``³ lattice over the padded box
(it doubles as the uniform samples and as the marching-cubes lattice of the metrics)
plus ``near_samples`` surface points jittered at two noise scales. Each step draws
``uniform_fraction`` of its samples from the lattice, the rest near the surface.
"""

from __future__ import annotations

import importlib.util
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mscn_core import limits
from mscn_core.modality import Field, Modality, PredictFn, checkpoint_settings
from mscn_core.signals import Batch, Signal
from mscn_core.streaming import ItemRef

if TYPE_CHECKING:
    import torch
    import trimesh
    from torch import Tensor

    from mscn_datasets import meshes

# torch (~1 s), trimesh and the mesh readers are imported by the functions that use them:
# listing plugins (``mscn modalities``) imports this module and must stay fast. A missing
# shapes extra still breaks the plugin here, at import, so the listing reports it.
_MISSING = [m for m in ("trimesh", "scipy") if importlib.util.find_spec(m) is None]
if _MISSING:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the sdf modality needs the shapes extra (pip install 'mscn[shapes]'): "
                      f"No module named {_MISSING[0]!r}")
# meshes.MESH_EXTENSIONS and meshes.PYTORCH3D_AVAILABLE, without importing trimesh
# (tests/test_registry.py checks they agree).
MESH_EXTENSIONS: tuple[str, ...] = (".obj", ".ply", ".off", ".stl", ".glb", ".gltf")
PYTORCH3D_AVAILABLE = importlib.util.find_spec("pytorch3d") is not None

# Unit-frame half-size of the box the lattice, the uniform samples and marching cubes
# cover: the shape's [-0.5, 0.5]³ plus 10 % padding (Occupancy Networks' padding).
BOUND = 0.55
NET_SCALE = 2.0  # network coordinates = NET_SCALE × unit-frame coordinates


@dataclass
class SdfOptions:
    """Sampling, loss and reconstruction settings of the SDF modality."""

    # marching-cubes resolution N (N³ queries) of the reconstructed mesh
    resolution: int = 128
    # lattice per item (uniform samples, and the lattice of the metrics' mesh)
    metric_grid: int = 64
    near_samples: int = 100_000  # surface samples jittered at two noise scales per item
    uniform_fraction: float = 0.25  # share of each step's samples drawn from the lattice
    truncation: float = 0.1  # δ of the clamped L1 loss, in network units (2 × unit cube)
    eikonal: float = 0.0  # weight of the eikonal term (0: off; it costs a double backward)
    max_faces: int = 500_000  # larger meshes are decimated first (bounded time and memory)
    # training augmentation: each mesh also as this many random rotations (seeded)
    rotations: int = 0
    # mscn view: open an interactive window too (needs a display)
    interactive: bool = False


def _opts(options: SdfOptions | None) -> SdfOptions:
    return options if options is not None else SdfOptions()


@dataclass
class ShapeSignal(Signal):
    """A Signal that also keeps its ground-truth mesh (unit frame) for the metrics.

    Only ``meta`` goes into a stream (name and frame: what the decoder needs). The rest
    is the encoder's: the mesh, the metric lattice's side (its ``metric_grid``³ points
    come first in ``coords``) and the input's vertex count (``n_values``).
    """

    truth: Any = None
    metric_grid: int = 0
    n_vertices: int = 0

    @property
    def n_lattice(self) -> int:
        return self.metric_grid**3


def _no_surface(path: str | os.PathLike) -> Exception:
    from mscn_datasets import meshes

    return meshes.MeshDataError(f"{path}: a voxel grid has no surface to take signed "
                                "distances from; use --modality voxel")


def read_shapes(path: str | os.PathLike, max_faces: int, rotations: int) -> list[meshes.Shape]:
    """Meshes of a file (plus rotated copies); grids without a mesh are refused here."""
    from mscn_datasets import meshes

    shapes = meshes.read_shapes(path, max_faces=max_faces)
    for s in shapes:
        if s.mesh is None:
            raise _no_surface(path)
    if rotations:
        shapes = shapes + [r for s in shapes for r in meshes.rotated_copies(s, rotations)]
    return shapes


class SdfModality(Modality):
    name = "sdf"
    header_words = ('"frame":[', '"sdf"')  # the stream header's preset dictionary: FROZEN
    description = ("signed distance functions of meshes (OBJ/PLY/OFF/STL/GLB) → marching cubes"
                   + ("; pytorch3d Meshes in/out (meshes.from_pytorch3d/to_pytorch3d)"
                      if PYTORCH3D_AVAILABLE else ""))
    in_dim = 3
    out_dim = 1
    file_extensions = MESH_EXTENSIONS
    options = SdfOptions
    points_per_step = 16384
    view_names = ("mesh", "meshes")

    def guess_can_open(self, path: str | os.PathLike) -> bool:
        p = Path(path)
        return p.is_file() and p.suffix.lower() in self.file_extensions

    def read(self, path: str | os.PathLike, options: SdfOptions | None = None
             ) -> list[meshes.Shape]:
        from mscn_datasets import meshes

        o = _opts(options)
        shapes = read_shapes(path, o.max_faces, o.rotations)
        for s in shapes:
            if not s.watertight:  # robust signs or a clear refusal, never silent flips
                meshes.check_inside_test(s.mesh, str(path))
        return shapes

    def scan(self, path: str | os.PathLike, options: SdfOptions | None = None
             ) -> list[ItemRef]:
        """References to :meth:`read`'s items from the file name alone: the mesh (its
        stem) and its ``rotations`` copies (``stem@rotK``), in ``read``'s order. Nothing
        is parsed (a GLB/glTF scene flattens to one mesh, so every mesh file is one
        item); voxel files are refused from their first bytes. A mesh that cannot be
        read or is refused is found when its item is loaded."""
        from mscn_datasets import meshes

        o = _opts(options)
        if meshes.shape_file_kind(path) != "mesh":
            raise _no_surface(path)
        stem, key = Path(path).stem, str(path)
        return [ItemRef((key, None), stem)] + [
            ItemRef((key, k), meshes.rotated_name(stem, k)) for k in range(o.rotations)]

    def load(self, ref: ItemRef, options: SdfOptions | None = None) -> meshes.Shape:
        """One item of :meth:`scan`, as :meth:`read` gives it. A rotated copy is computed
        alone; the original's inside test runs too, since ``read`` refuses the whole file
        when the original fails it."""
        from mscn_datasets import meshes

        o = _opts(options)
        path, k = ref.key
        shape = read_shapes(path, o.max_faces, 0)[0]  # a mesh file holds one shape
        todo = [shape] if k is None else [shape, meshes.rotated_copy(shape, k)]
        for s in todo:
            if not s.watertight:
                meshes.check_inside_test(s.mesh, str(path))
        return todo[-1]

    def item_label(self, item: meshes.Shape) -> str:
        return item.name

    # -- signals ----------------------------------------------------------------------
    def to_signal(self, item: meshes.Shape, options: SdfOptions | None = None) -> ShapeSignal:
        import torch

        from mscn_datasets import meshes

        o = _opts(options)
        self._use_loss_options(o)
        seed = zlib.crc32(item.name.encode())  # the whole name: knot1 and knot2 differ
        rng = np.random.default_rng(seed)  # the same item always gets the same samples
        lattice = meshes.grid_points(o.metric_grid, BOUND, centres=False)
        near, near_sdf = meshes.sdf_samples(item.mesh, o.near_samples, 0, rng)
        pts = np.concatenate([lattice, near]).astype(np.float32)
        sdf = np.concatenate([meshes.signed_distance(item.mesh, lattice), near_sdf])
        meta = {"name": item.name, "frame": item.frame.as_list()}
        return ShapeSignal(torch.from_numpy(NET_SCALE * pts),
                           torch.from_numpy(NET_SCALE * sdf.astype(np.float32)).reshape(-1, 1),
                           None, meta, truth=item.mesh, metric_grid=int(o.metric_grid),
                           n_vertices=int(len(item.mesh.vertices)))

    def sample(self, signal: Signal, n: int, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """``uniform_fraction`` from the lattice, the rest from the near-surface pool."""
        import torch

        n_lat = signal.n_lattice
        n_near = signal.n_points - n_lat
        k = n if n_near == 0 else int(round(self.loss["uniform_fraction"] * n))
        pick = torch.cat([torch.randint(n_lat, (k,), generator=generator),
                          n_lat + torch.randint(max(n_near, 1), (n - k,), generator=generator)])
        return (signal.coords[pick], signal.targets[pick],
                torch.ones(n, dtype=signal.coords.dtype))

    # -- loss settings: from the options at meta-training, then kept in the checkpoint --
    LOSS_FIELDS = ("uniform_fraction", "truncation", "eikonal")

    def __init__(self) -> None:
        self.loss = {k: getattr(SdfOptions, k) for k in self.LOSS_FIELDS}
        self._from_checkpoint = False

    def state(self) -> dict:
        return {"loss": dict(self.loss)}

    def load_state(self, state: dict) -> None:
        self.loss.update(state.get("loss", {}))
        self._from_checkpoint = True

    def _use_loss_options(self, o: SdfOptions) -> None:
        """Training (or fitting from scratch) takes the options; a checkpoint's loss
        wins afterwards, since its learned rates were meta-learned for that loss."""
        self.loss = checkpoint_settings(o, self.LOSS_FIELDS,
                                        self.loss if self._from_checkpoint else None)

    def render(self, field: Field, coords: Tensor) -> Tensor:
        """Signed distance in network units: the raw output less the SIREN's 0.5 offset."""
        return field(coords) - 0.5

    def objective(self, field: Field, batch: Batch) -> Tensor:
        import torch

        d, eikonal = self.loss["truncation"], self.loss["eikonal"]
        if eikonal > 0:
            coords = batch.coords.detach().requires_grad_(True)
            pred = self.render(field, coords)
            (grad,) = torch.autograd.grad(pred.sum(), coords, create_graph=True)
        else:
            pred = self.render(field, batch.coords)
        err = (pred.clamp(-d, d) - batch.targets.clamp(-d, d)).abs().mean(dim=-1)
        if eikonal > 0:
            err = err + eikonal * (grad.norm(dim=-1) - 1) ** 2
        return (err * batch.weights).sum(dim=1) / batch.weights.sum(dim=1).clamp_min(1e-12)

    def n_values(self, signal: Signal) -> int:
        """Vertices of the input mesh: bits per value are bits per vertex (mesh codecs' unit)."""
        return signal.n_vertices

    def metrics(self, signal: Signal, pred: Tensor) -> dict[str, float]:
        """Chamfer-L1, normal consistency, F-score@1 % of the lattice's marching-cubes mesh
        (unit cube, 100k points each way); IoU of inside/outside on the lattice; L1 near
        the surface (unit-cube units)."""
        from mscn_datasets import meshes, shape_metrics

        n_lat, g = signal.n_lattice, signal.metric_grid
        p = pred.detach().reshape(-1).double().numpy() / NET_SCALE
        t = signal.targets.reshape(-1).double().numpy() / NET_SCALE
        out = {"iou": shape_metrics.volumetric_iou(p[:n_lat] < 0, t[:n_lat] < 0),
               "sdf_l1_near": float(np.abs(p[n_lat:] - t[n_lat:]).mean()) if len(p) > n_lat
               else float("nan")}
        truth = getattr(signal, "truth", None)
        if truth is not None:
            mesh = meshes.marching_cubes(p[:n_lat].reshape(g, g, g), 0.0, BOUND)
            out.update(shape_metrics.mesh_metrics(mesh, truth))
        return out

    # -- artifacts --------------------------------------------------------------------
    def check_meta(self, meta: dict, options: SdfOptions | None = None) -> int:
        """Name and frame as :meth:`reconstruct` uses them; the values are the
        ``resolution``³ lattice queried for marching cubes.

        The frame is ``[cx, cy, cz, scale]`` (float32 precision, see
        ``meshes.Frame.as_list``); streams written before that layout (a
        ``{"center", "scale"}`` object, and the encoder-only ``n_lattice``,
        ``metric_grid``, ``n_vertices`` that are now ignored) still decode."""
        from mscn_datasets import meshes

        if not isinstance(meta.get("name"), str):
            raise ValueError(f"name must be a string, got {type(meta.get('name')).__name__}")
        meshes.Frame.from_meta(meta.get("frame"))
        n = limits.check_count(_opts(options).resolution, "resolution", 8)
        return limits.check_output_values(n**3, f"a {n}^3 lattice")

    def reconstruct(self, meta: dict, predict: PredictFn, options: SdfOptions | None = None,
                    template: meshes.Shape | None = None) -> meshes.Shape:
        """Marching cubes of the predicted SDF on ``resolution``³ → a Shape (unit frame)."""
        import torch

        from mscn_datasets import meshes

        if template is None:
            self.check_meta(meta, options)  # a stream's meta: validated before any allocation
        n = _opts(options).resolution
        if n < 8:
            raise ValueError(f"resolution must be >= 8, got {n}")
        lattice = torch.from_numpy(NET_SCALE * meshes.grid_points(n, BOUND, centres=False))
        values = predict(lattice).reshape(n, n, n).double().numpy() / NET_SCALE
        mesh = meshes.marching_cubes(values, 0.0, BOUND)
        frame = template.frame if template is not None else meshes.Frame.from_meta(meta["frame"])
        return meshes.Shape(name=meta["name"], source="mscn reconstruction", frame=frame,
                            mesh=mesh, occupancy=None, watertight=bool(mesh.is_watertight))

    def save(self, artifacts: list[meshes.Shape], path: str | os.PathLike,
             overwrite: bool = False, provenance: dict | None = None) -> Path:
        from mscn_datasets import meshes

        return meshes.save_meshes(artifacts, path, overwrite, provenance)

    def view(self, truth: meshes.Shape, recon: meshes.Shape, path: str | os.PathLike,
             options: SdfOptions | None = None, overwrite: bool = False,
             animation: str | os.PathLike | None = None) -> Path:
        """Truth beside the reconstruction coloured by its distance to the truth, in the
        truth's unit frame, with Chamfer/F-score; ``.glb`` output: the coloured mesh."""
        return view_meshes(truth, recon, path, overwrite, animation, _opts(options).interactive)


def in_truth_frame(truth: meshes.Shape, other: meshes.Shape) -> trimesh.Trimesh:
    """``other``'s mesh moved into ``truth``'s unit frame (via the original frame)."""
    m = other.original_mesh()
    m.vertices = truth.frame.to_unit(m.vertices)
    return m


def view_meshes(truth: meshes.Shape, recon: meshes.Shape, path: str | os.PathLike,
                overwrite: bool, animation: str | os.PathLike | None,
                interactive: bool = False) -> Path:
    from mscn_datasets import shape_metrics
    from mscn_viewers import mesh3d

    path = Path(path)
    if not overwrite:
        for p in (path, animation):
            if p is not None and Path(p).exists():
                raise FileExistsError(f"{p} exists; pass --overwrite to replace it")
    if truth.mesh is None or recon.mesh is None:
        raise ValueError("the mesh viewer needs meshes; for voxel grids use `mscn view voxels`")
    rec = in_truth_frame(truth, recon)
    stats = {k: v for k, v in shape_metrics.mesh_metrics(rec, truth.mesh).items()
             if k in ("chamfer_l1", "fscore", "normal_consistency")}
    if path.suffix.lower() in (".glb", ".gltf"):
        colors, _ = mesh3d.error_colors(rec, truth.mesh)
        out = mesh3d.export_glb(rec, path, vertex_colors=colors, overwrite=overwrite)
    else:
        out = mesh3d.render_comparison(truth.mesh, rec, path, title=truth.name, stats=stats,
                                       overwrite=overwrite)
    if animation is not None:
        mesh3d.turntable_gif(rec, animation, overwrite=overwrite)
    if interactive:
        mesh3d.show_interactive([truth.mesh, rec])
    return out
