"""Shared fixtures: a tiny sphere checkpoint meta-trained for real on vendored ERA5."""

from __future__ import annotations

from pathlib import Path

import pytest

from mscn_datasets import vendored_path

ERA5 = vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")
SHARED_CLIMATE = Path(__file__).resolve().parents[2] / "shared" / "data" / "climate"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny nets: a second thread gains nothing and, on a shared machine, costs a lot."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_sphere_checkpoint(tmp_path_factory) -> Path:
    """4-layer × 32 SIREN, budget 48, 40 outer steps on ERA5 t850 members 0-5."""
    import torch

    from mscn_core.checkpoint import save_checkpoint
    from mscn_core.meta import TrainConfig
    from mscn_core.methods import MethodConfig
    from mscn_core.pipeline import train_checkpoint
    from mscn_core.registry import get_modality
    from mscn_core.siren import SirenConfig

    m = get_modality("sphere")
    fields = m.read(ERA5, var="t", sel=["isobaricInhPa=850"])
    train = [f for f in fields if int(f["number"]) < 6]
    val = [f for f in fields if int(f["number"]) == 6]
    # One thread: the same checkpoint (measured: identical validation loss), and on a shared
    # 2-core machine two threads' OpenMP spin-waits made this 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ck = train_checkpoint(
            m, train, val, SirenConfig(width=32, depth=4, w0=30, w0_first=30),
            MethodConfig(budget=48), TrainConfig(outer_steps=40, outer_lr=1e-3, batch_size=4,
                                                 points_per_item=512, val_every=20,
                                                 progress=False))
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sphere.safetensors"
    save_checkpoint(ck, path)
    return path
