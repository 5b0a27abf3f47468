"""Shared test data: tiny Fashion-MNIST IDX files and ImageNet-layout image folders, made on the fly."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image


def write_idx_file(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Writes ``array`` (uint8) as an IDX file; ``compress`` appends ``.gz`` to ``path``."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_fmnist_folder(folder: Path, n_train: int = 64, n_test: int = 20, compress: bool = True) -> Path:
    """A Fashion-MNIST folder (train/t10k images and labels) with random 28x28 images, labels 0..9 cycling."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx_file(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx_file(folder / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    return folder


def make_image_folder_tree(root: Path, classes: int = 3, per_class: int = 4, size: int = 20) -> Path:
    """An ImageNet-layout folder (train/<class>/*, val/<class>/*) of small JPEG and PNG images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8))
                img.save(d / (f"{i}.JPEG" if i % 2 == 0 else f"{i}.png"), format="JPEG" if i % 2 == 0 else "PNG")
    return root


@pytest.fixture(scope="session")
def write_idx() -> Callable[..., None]:
    return write_idx_file


@pytest.fixture(scope="session")
def make_fmnist() -> Callable[..., Path]:
    return make_fmnist_folder


@pytest.fixture(scope="session")
def make_image_folder() -> Callable[..., Path]:
    return make_image_folder_tree


#: What an in-process DDP run (Lightning's launcher) leaves in ``os.environ``: a subprocess that inherits them
#: would join that finished run's rendezvous (its port is taken) instead of starting its own.
_DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@pytest.fixture()
def ddp_subprocess_env() -> dict[str, str]:
    """The environment for a subprocess that starts its own multi-process DDP run (one thread per process)."""
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    env["OMP_NUM_THREADS"] = "1"
    return env


def make_clipping_layer(cls: type, c: int, seed: int = 1, **kw):
    """A float64 renorm layer (rmax 1.5, dmax 0.3) whose running statistics, weight and bias are drawn from
    ``seed`` so that r and d clip on some channels; ``kw`` goes to the constructor."""
    import torch

    layer = cls(c, rmax=1.5, dmax=0.3, **kw).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 4 + 0.1)
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    return layer


@pytest.fixture(scope="session")
def clipping_layer() -> Callable[..., object]:
    return make_clipping_layer


@pytest.fixture(params=["cpp", "python"])
def eager_backend(request: pytest.FixtureRequest):
    """Runs a test once with the C++ CPU kernels and once with the pure-PyTorch path (same maths, both tested)."""
    from lightning_brn import cpu_kernels

    if request.param == "cpp" and not cpu_kernels.available():
        pytest.skip(f"C++ CPU kernels unavailable here: {cpu_kernels.build_error() or 'disabled by LIGHTNING_BRN_CPP'}")
    with cpu_kernels.use_cpp(request.param == "cpp"):
        yield request.param
