"""Data modules and samplers for the recipes: ImageNet-layout folders and Fashion-MNIST.

Both data modules share the batch-composition options of the paper (section 4.3):

* ``sampling="iid"`` (default): every batch is a uniform random draw of the training set
  (a :class:`~torch.utils.data.DistributedSampler` seeded by ``(seed, epoch)``, so every
  rank gets its own disjoint share of each epoch);
* ``sampling="non_iid"``: every batch holds ``L = batch_size // examples_per_label`` labels
  drawn *with replacement*, and ``examples_per_label`` (``K``) distinct images of each drawn
  label (the paper: 32 = 16 labels x 2 images). See :class:`NonIIDBatchSampler`.

``batch_size`` is always the batch of ONE process (the paper's "32 per worker"); the
global batch of a DDP run is ``batch_size * world_size``.

The data modules place their own distributed samplers, so the Trainer must not replace
them: run with ``Trainer(use_distributed_sampler=False)`` (the ``lightning-brn`` CLI and
every recipe do).

Examples::

    >>> import torch
    >>> from lightning_brn.data import NonIIDBatchSampler
    >>> labels = torch.arange(10).repeat_interleave(6)      # 10 classes x 6 images
    >>> sampler = NonIIDBatchSampler(labels, batch_size=8, examples_per_label=2, seed=0)
    >>> batch = next(iter(sampler))
    >>> len(batch), [int(labels[i]) for i in batch][0::2] == [int(labels[i]) for i in batch][1::2]
    (8, True)
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder

__all__ = [
    "NonIIDBatchSampler",
    "ClassificationDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "read_idx",
    "FASHION_MNIST_DIR",
]

#: Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

Sampling = Literal["iid", "non_iid"]


# --------------------------------------------------------------------------------------
# The paper's non-i.i.d. batches
# --------------------------------------------------------------------------------------
class NonIIDBatchSampler(Sampler[list[int]]):
    r"""Batches of ``L`` labels drawn with replacement x ``K`` images each (paper, section 4.3).

    For every optimizer step the sampler builds the batches of **all** ``num_replicas``
    processes from one generator seeded by ``(seed, epoch)`` and hands rank ``rank`` its
    part, so the ranks draw their own batches yet no image appears twice within a global
    step. Each label draw takes the next ``K`` images of that class from a per-class
    shuffled stream (reshuffled when exhausted, with the images already used in the
    current step moved to the back); a label whose unused images in the step would run out
    is redrawn, which never happens unless a class holds fewer than about
    ``global_batch / num_classes`` images. Images of one label sit next to each other in
    the batch (``[a, a, b, b, ...]`` for ``K = 2``).

    The sampler is deterministic: the same ``(seed, epoch)`` gives the same batches, and
    :meth:`set_epoch` moves to the next stream. Lightning calls ``set_epoch`` every epoch only on
    ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``, never on a batch sampler
    itself, so :attr:`sampler` is a handle whose ``set_epoch`` forwards here (without it every
    epoch would repeat epoch 0's batches). ``start_batch``, when given, is called as iteration
    starts and says how many of this epoch's batches were already consumed: those are drawn and
    skipped, so a run resumed mid-epoch continues the epoch's stream where it stopped (the data
    modules pass the Trainer's count of this epoch's batches).

    Args:
        labels: the class index of every example of the dataset.
        batch_size: images per batch of ONE process; a multiple of ``examples_per_label``.
        examples_per_label: ``K``, images per drawn label. Default: 2 (the paper).
        num_replicas: number of processes (DDP world size). Default: 1.
        rank: this process's rank in ``[0, num_replicas)``. Default: 0.
        seed: base seed, shared by all ranks. Default: 0.
        num_batches: batches per epoch for each process. Default: ``len(labels) //
            (batch_size * num_replicas)`` (one pass over the data, as many images as an
            i.i.d. epoch).
        start_batch: a function returning how many batches of the current epoch to skip,
            called once each time iteration starts (resuming mid-epoch). Default: none (0).

    Examples::

        >>> import torch
        >>> labels = torch.arange(4).repeat_interleave(8)
        >>> r0 = list(NonIIDBatchSampler(labels, 4, num_replicas=2, rank=0, seed=1))
        >>> r1 = list(NonIIDBatchSampler(labels, 4, num_replicas=2, rank=1, seed=1))
        >>> len(r0), set(r0[0]).isdisjoint(r1[0])
        (4, True)
    """

    def __init__(
        self,
        labels: Union[Sequence[int], torch.Tensor, np.ndarray],
        batch_size: int,
        examples_per_label: int = 2,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        num_batches: Optional[int] = None,
        start_batch: Optional[Callable[[], int]] = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(examples_per_label, bool) or not isinstance(examples_per_label, int) or examples_per_label < 1:
            raise ValueError(f"examples_per_label must be a positive int, got {examples_per_label!r}")
        if batch_size % examples_per_label:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by examples_per_label={examples_per_label}: a non-i.i.d. "
                f"batch is L labels x K={examples_per_label} examples, so set the batch size to a multiple of "
                f"{examples_per_label} (e.g. {_round_up(batch_size, examples_per_label)}) or change examples_per_label"
            )
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
        labels_np = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
        if labels_np.ndim != 1 or labels_np.size == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels_np.shape}")
        self.batch_size = batch_size
        self.examples_per_label = examples_per_label
        self.labels_per_batch = batch_size // examples_per_label
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.epoch = 0
        classes, inverse = np.unique(labels_np, return_inverse=True)
        self._classes = classes
        # each class's example indices in ascending order, from one stable sort (one comparison pass per class took
        # seconds on ImageNet's 1.28M labels, and check_data builds a sampler once more before the loader does)
        order = np.argsort(inverse, kind="stable")
        self._class_indices = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1])
        usable = sum(len(ix) // examples_per_label for ix in self._class_indices)
        needed = self.labels_per_batch * num_replicas
        if usable < needed:
            raise ValueError(
                f"the dataset is too small for non-i.i.d. batches: one global step needs {needed} groups of "
                f"{examples_per_label} distinct same-label examples ({num_replicas} process(es) x batch_size="
                f"{batch_size}), but the {len(labels_np)} examples in {len(classes)} classes make only {usable}; "
                f"lower the batch size (--data.init_args.batch_size)"
            )
        if num_batches is None:
            num_batches = len(labels_np) // (batch_size * num_replicas)
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(
                f"num_batches must be a positive int, got {num_batches!r} ({len(labels_np)} examples for a global "
                f"batch of {batch_size * num_replicas}: lower the batch size or pass num_batches)"
            )
        self.num_batches = num_batches
        self.start_batch = start_batch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's stream of batches (same ``(seed, epoch)`` -> same batches)."""
        self.epoch = int(epoch)

    @property
    def sampler(self) -> "_EpochHandle":
        """What Lightning finds at ``dataloader.batch_sampler.sampler``: its ``set_epoch`` calls this sampler's."""
        return _EpochHandle(self)

    def __len__(self) -> int:
        return self.num_batches

    def global_batches(self) -> Iterator[list[list[int]]]:
        """Yield, for every step of the epoch, the batches of all ranks (a list of ``num_replicas`` lists)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        k = self.examples_per_label
        n_classes = len(self._class_indices)
        streams = [rng.permutation(ix) for ix in self._class_indices]
        pos = [0] * n_classes
        for _ in range(self.num_batches):
            used: dict[int, set[int]] = {}
            draws: list[int] = []  # chosen class per (rank, label slot)
            picks: list[np.ndarray] = []
            for _slot in range(self.num_replicas * self.labels_per_batch):
                while True:
                    c = int(rng.integers(n_classes))
                    n_used = len(used.get(c, ()))
                    if len(self._class_indices[c]) - n_used >= k:
                        break
                if pos[c] + k > len(streams[c]):  # reshuffle, this step's images last
                    fresh = rng.permutation(self._class_indices[c])
                    taken = used.get(c, set())
                    if taken:
                        mask = np.isin(fresh, np.fromiter(taken, dtype=np.int64))
                        fresh = np.concatenate([fresh[~mask], fresh[mask]])
                    streams[c], pos[c] = fresh, 0
                chosen = streams[c][pos[c] : pos[c] + k]
                pos[c] += k
                used.setdefault(c, set()).update(int(i) for i in chosen)
                draws.append(c)
                picks.append(chosen)
            per = self.labels_per_batch
            yield [
                [int(i) for p in picks[r * per : (r + 1) * per] for i in p] for r in range(self.num_replicas)
            ]

    def __iter__(self) -> Iterator[list[int]]:
        skip = int(self.start_batch()) if self.start_batch is not None else 0
        for i, batches in enumerate(self.global_batches()):
            if i >= skip:  # (batches before a mid-epoch resume are drawn, to keep the stream, and dropped)
                yield batches[self.rank]


class _EpochHandle:
    """``NonIIDBatchSampler.sampler``: Lightning calls ``set_epoch`` on ``batch_sampler.sampler``, not on the
    batch sampler; this forwards it (and is nothing else: it is not iterated)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: NonIIDBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


def _round_up(x: int, k: int) -> int:
    return max(k, int(math.ceil(x / k)) * k)


# --------------------------------------------------------------------------------------
# Base data module
# --------------------------------------------------------------------------------------
class ClassificationDataModule(pl.LightningDataModule):
    """Shared batching logic: i.i.d. or the paper's non-i.i.d. batches, DDP-aware.

    Subclasses build ``self.train_set`` / ``self.val_set`` in :meth:`setup` and expose the
    training labels through :meth:`train_labels`.

    Args:
        batch_size: images per batch of ONE process (the paper: 32 per worker).
        sampling: ``"iid"`` or ``"non_iid"`` (``L`` labels drawn with replacement x
            ``examples_per_label`` images each).
        examples_per_label: ``K`` for ``sampling="non_iid"`` (paper: 2); must divide
            ``batch_size``.
        val_batch_size: evaluation batch size. Default: ``batch_size``.
        num_workers: data loader worker processes.
        pin_memory: page-locked host memory for faster host-to-GPU copies.
        seed: seed of the training samplers (shared by all ranks; the epoch is mixed in).
    """

    def __init__(
        self,
        batch_size: int = 32,
        sampling: Sampling = "iid",
        examples_per_label: int = 2,
        val_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if sampling not in ("iid", "non_iid"):
            raise ValueError(f"sampling must be 'iid' or 'non_iid', got {sampling!r}")
        if isinstance(examples_per_label, bool) or not isinstance(examples_per_label, int) or examples_per_label < 1:
            raise ValueError(f"examples_per_label must be a positive int, got {examples_per_label!r}")
        if sampling == "non_iid" and batch_size % examples_per_label:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by examples_per_label={examples_per_label}: non-i.i.d. "
                f"batches are L labels x K={examples_per_label} images; set --data.init_args.batch_size to a multiple "
                f"of {examples_per_label} (e.g. {_round_up(batch_size, examples_per_label)}) or change "
                f"--data.init_args.examples_per_label"
            )
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be a positive int or None, got {val_batch_size!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        self.batch_size = batch_size
        self.sampling = sampling
        self.examples_per_label = examples_per_label
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.num_classes: Optional[int] = None
        self.in_chans: Optional[int] = None

    # -- to implement -------------------------------------------------------------------
    def train_labels(self) -> Sequence[int]:
        """The class index of every training example (no image decoding)."""
        raise NotImplementedError

    def check_data(self, stage: Optional[str] = None) -> None:
        """Read as much of what ``setup(stage)`` needs as it takes to find what is wrong with the data (a folder
        without images, files that disagree) and raise now, before a Trainer starts: the CLI calls it right after
        building the data module. What it reads is kept for ``setup``. The base class checks nothing."""

    # -- distributed context ------------------------------------------------------------
    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _check_trainer(self) -> None:
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return
        if trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                f"{type(self).__name__} shards the data across the {trainer.world_size} processes itself; run with "
                "Trainer(use_distributed_sampler=False) (--trainer.use_distributed_sampler false), otherwise Lightning "
                "would replace its samplers"
            )

    def _loader_kwargs(self) -> dict[str, Any]:
        pin = self.pin_memory and torch.cuda.is_available()
        kwargs: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": pin}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = True
        return kwargs

    # -- loaders --------------------------------------------------------------------------
    def train_sampler(self) -> Union[NonIIDBatchSampler, DistributedSampler]:
        """The training sampler of this process (a batch sampler for ``"non_iid"``)."""
        assert self.train_set is not None, "call setup('fit') first"
        num_replicas, rank = self._replicas()
        if self.sampling == "non_iid":
            return NonIIDBatchSampler(
                self.train_labels(),
                self.batch_size,
                self.examples_per_label,
                num_replicas=num_replicas,
                rank=rank,
                seed=self.seed,
                start_batch=self._batches_done_this_epoch,
            )
        self._check_batch_fits(len(self.train_set), num_replicas)  # type: ignore[arg-type]
        return DistributedSampler(
            self.train_set, num_replicas=num_replicas, rank=rank, shuffle=True, seed=self.seed, drop_last=True
        )

    def _batches_done_this_epoch(self) -> int:
        """Training batches of the current epoch already consumed (non-zero when ``fit`` resumed mid-epoch).

        Read by :class:`NonIIDBatchSampler` as its iteration starts, i.e. after Lightning has restored and reset
        its loops: then the epoch loop's ``batch_progress.current.ready`` counts the batches the checkpointed run
        had taken in this epoch (0 at the start of every epoch of an uninterrupted run)."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def _check_batch_fits(self, n: int, num_replicas: int) -> None:
        if n < self.batch_size * num_replicas:
            fix = "lower batch_size (--data.init_args.batch_size)"
            limit = getattr(self, "limit_train", None)  # (data modules that have one)
            if limit is not None:
                fix += f" or raise limit_train={limit} (--data.init_args.limit_train)"
            raise ValueError(
                f"the training set has {n} examples, fewer than one global batch of {self.batch_size * num_replicas} "
                f"({num_replicas} process(es) x batch_size={self.batch_size}): {fix}"
            )

    def _check_train_batches(self) -> None:
        """For ``check_data``: the training set holds one batch of this process, i.i.d. or not (the world size is
        checked again when the loader is built, under the Trainer)."""
        num_replicas, _ = self._replicas()
        labels = self.train_labels()
        if self.sampling == "non_iid":
            NonIIDBatchSampler(labels, self.batch_size, self.examples_per_label, num_replicas=num_replicas)
        else:
            self._check_batch_fits(len(labels), num_replicas)

    def train_dataloader(self) -> DataLoader:
        self._check_trainer()
        sampler = self.train_sampler()
        if isinstance(sampler, NonIIDBatchSampler):
            return DataLoader(self.train_set, batch_sampler=sampler, **self._loader_kwargs())
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True, **self._loader_kwargs()
        )

    def _eval_loader(self, dataset: Optional[Dataset], unrepeated: bool = False) -> DataLoader:
        assert dataset is not None, "call setup() first"
        self._check_trainer()
        num_replicas, rank = self._replicas()
        sampler: Optional[DistributedSampler] = None
        if num_replicas > 1:
            # predictions must hold each example once (Lightning's own choice for predict); evaluation pads the shards
            # to equal length, as Lightning's distributed sampler does
            cls = UnrepeatedDistributedSampler if unrepeated else DistributedSampler
            sampler = cls(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.val_batch_size, sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, unrepeated=True)


# --------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files
# --------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed (``.gz``) or raw.

    Examples::

        >>> import gzip, os, tempfile, numpy as np
        >>> p = os.path.join(tempfile.mkdtemp(), "x-idx1-ubyte.gz")
        >>> with gzip.open(p, "wb") as f:
        ...     _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        >>> read_idx(p).tolist()
        [7, 8, 9]
    """
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.dtype(_IDX_DTYPES[data[2]]), offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{str(path)!r} is truncated: header says shape {shape}, found {arr.size} values")
    return arr.reshape(shape)


def _find_idx(data_dir: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


class _TensorImages(Dataset):
    """uint8 images (N, H, W) in memory -> normalized float (1, H, W), label."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float, augment: bool) -> None:
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.mean, self.std, self.augment = mean, std, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].unsqueeze(0).float().div_(255.0)
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            dy, dx = torch.randint(-2, 3, (2,)).tolist()
            x = torch.roll(torch.nn.functional.pad(x, (2, 2, 2, 2)), (dy, dx), (-2, -1))[..., 2:-2, 2:-2]
        return x.sub_(self.mean).div_(self.std), self.labels[i]


class FashionMNISTDataModule(ClassificationDataModule):
    """Fashion-MNIST (28x28 grey, 10 classes) read from its four IDX files.

    The default folder is where Debian/Ubuntu's ``dataset-fashion-mnist`` package puts the
    files (``sudo apt-get install dataset-fashion-mnist``); any other folder holding
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte`` (each ``.gz`` or raw) works through ``data_dir``. The
    10,000 test images serve as the validation and test set. Nothing is downloaded.

    Args:
        data_dir: folder of the IDX files. Default: ``/usr/share/datasets/fashion-mnist``.
        limit_train: use only the first ``limit_train`` training images (quick runs).
        limit_val: use only the first ``limit_val`` test images.
        augment: random horizontal flips and +-2 pixel shifts for training.
        batch_size, sampling, examples_per_label, val_batch_size, num_workers, pin_memory,
        seed: see :class:`ClassificationDataModule`.

    Examples::

        >>> import os
        >>> dm = FashionMNISTDataModule(batch_size=32)  # doctest: +SKIP
        >>> dm.setup("fit"); len(dm.train_set), dm.num_classes  # doctest: +SKIP
        (60000, 10)
    """

    MEAN = 0.2860
    STD = 0.3530

    def __init__(
        self,
        data_dir: Union[str, os.PathLike] = FASHION_MNIST_DIR,
        batch_size: int = 32,
        sampling: Sampling = "iid",
        examples_per_label: int = 2,
        val_batch_size: Optional[int] = 256,
        num_workers: int = 0,
        pin_memory: bool = True,
        seed: int = 0,
        limit_train: Optional[int] = None,
        limit_val: Optional[int] = None,
        augment: bool = False,
    ) -> None:
        super().__init__(batch_size, sampling, examples_per_label, val_batch_size, num_workers, pin_memory, seed)
        for name, limit in (("limit_train", limit_train), ("limit_val", limit_val)):
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise ValueError(
                    f"{name} must be a positive int (use only the first {name} images) or None (all of them), got "
                    f"{name}={limit!r}"
                )
        self.data_dir = Path(data_dir).expanduser()
        self.files = self._locate(self.data_dir)
        self.limit_train = limit_train
        self.limit_val = limit_val
        self.augment = augment
        self.num_classes = 10
        self.in_chans = 1
        self._train_labels: Optional[np.ndarray] = None
        self._loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _locate(data_dir: Path) -> dict[str, Path]:
        found = {key: _find_idx(data_dir, stem) for key, stem in _FMNIST_FILES.items()}
        missing = [_FMNIST_FILES[k] + "[.gz]" for k, p in found.items() if p is None]
        if missing:
            where = "does not exist" if not data_dir.is_dir() else f"lacks {', '.join(missing)}"
            raise FileNotFoundError(
                f"Fashion-MNIST not found: the folder '{data_dir}' {where}. Install the dataset with "
                f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to {FASHION_MNIST_DIR}), "
                "or point --data.init_args.data_dir (FashionMNISTDataModule(data_dir=...)) at a folder holding "
                "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                "t10k-labels-idx1-ubyte (gzip-compressed .gz or raw)."
            )
        return {k: p for k, p in found.items() if p is not None}

    def _load(self, split: str, limit: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
        if split in self._loaded:  # read by check_data
            return self._loaded.pop(split)
        images = read_idx(self.files[f"{split}_images"])
        labels = read_idx(self.files[f"{split}_labels"])
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {split} files in '{self.data_dir}' disagree: images {images.shape}, labels "
                f"{labels.shape}"
            )
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return images, labels

    def train_labels(self) -> Sequence[int]:
        if self._train_labels is None:
            # (a read by check_data stays for setup)
            labels = self._loaded["train"][1] if "train" in self._loaded else self._load("train", self.limit_train)[1]
            self._train_labels = labels.astype(np.int64)
        return self._train_labels  # type: ignore[return-value]

    def check_data(self, stage: Optional[str] = None) -> None:
        """Read the IDX files ``setup(stage)`` needs (kept for it): a truncated or mismatched file, or a training
        set smaller than one batch, raises here."""
        if stage in (None, "fit") and self.train_set is None and "train" not in self._loaded:
            self._loaded["train"] = self._load("train", self.limit_train)
        if self.val_set is None and "test" not in self._loaded:
            self._loaded["test"] = self._load("test", self.limit_val)
        if stage in (None, "fit"):
            self._check_train_batches()

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            images, labels = self._load("train", self.limit_train)
            self._train_labels = labels.astype(np.int64)
            self.train_set = _TensorImages(images, labels, self.MEAN, self.STD, self.augment)
        if self.val_set is None:
            images, labels = self._load("test", self.limit_val)
            self.val_set = _TensorImages(images, labels, self.MEAN, self.STD, False)


# --------------------------------------------------------------------------------------
# ImageNet-layout folders
# --------------------------------------------------------------------------------------
class _KnownClassesImageFolder(ImageFolder):
    """An ``ImageFolder`` whose class indices are the training folder's (``class_to_idx``), so that a validation
    folder missing a class keeps the labels right; a class it does not know is an error. Defined at module level:
    the data module and its datasets pickle (``ddp_spawn``, DataLoader workers started by spawn)."""

    def __init__(self, root: str, class_to_idx: dict[str, int], transform: Optional[Callable] = None) -> None:
        self._known = dict(class_to_idx)
        super().__init__(root, transform=transform)

    def find_classes(self, directory: Union[str, os.PathLike]) -> tuple[list[str], dict[str, int]]:
        present = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        unknown = [c for c in present if c not in self._known]
        if unknown:
            raise ValueError(f"'{directory}' has classes not in the training folder: {unknown[:5]}")
        return present, {c: self._known[c] for c in present}


class ImageFolderDataModule(ClassificationDataModule):
    """Image folders in the ImageNet layout: ``<data_dir>/train/<class>/*.JPEG``, ``<data_dir>/val/<class>/*``.

    Classes are the sub-folders of ``train/`` (sorted); ``val/`` must use the same class
    names. Transforms are timm's (:func:`timm.data.create_transform`) for the model being
    trained, resolved with :func:`timm.data.resolve_data_config` (input size, crop
    fraction, interpolation, mean and std: 299x299 for ``inception_v3``); ``img_size``
    overrides the size.

    Args:
        data_dir: the folder holding ``train/`` and ``val/``.
        img_size: square input size; ``None``: the model's default (its ``pretrained_cfg``).
        train_dir, val_dir: names of the sub-folders. Default: ``"train"``, ``"val"``.
        auto_augment: timm auto-augment policy string for training (e.g. ``"rand-m9-mstd0.5"``); ``None``: off.
        batch_size, sampling, examples_per_label, val_batch_size, num_workers, pin_memory,
        seed: see :class:`ClassificationDataModule`.

    Examples::

        >>> dm = ImageFolderDataModule("/data/imagenet", batch_size=32, num_workers=8)  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: Union[str, os.PathLike],
        batch_size: int = 32,
        sampling: Sampling = "iid",
        examples_per_label: int = 2,
        val_batch_size: Optional[int] = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        seed: int = 0,
        img_size: Optional[int] = None,
        train_dir: str = "train",
        val_dir: str = "val",
        auto_augment: Optional[str] = None,
    ) -> None:
        super().__init__(batch_size, sampling, examples_per_label, val_batch_size, num_workers, pin_memory, seed)
        self.data_dir = Path(data_dir).expanduser()
        for sub in (train_dir, val_dir):
            if not (self.data_dir / sub).is_dir():
                raise FileNotFoundError(
                    f"image folder '{self.data_dir / sub}' not found: ImageFolderDataModule expects the ImageNet "
                    f"layout <data_dir>/{train_dir}/<class>/*.JPEG and <data_dir>/{val_dir}/<class>/*.JPEG; point "
                    f"--data.init_args.data_dir at that folder (or set --data.init_args.train_dir / val_dir)"
                )
        if img_size is not None and img_size < 1:
            raise ValueError(f"img_size must be a positive int or None, got {img_size!r}")
        self.img_size = img_size
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.auto_augment = auto_augment
        self.classes: list[str] = sorted(e.name for e in os.scandir(self.data_dir / train_dir) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"'{self.data_dir / train_dir}' has no class sub-folders (<class>/*.JPEG)")
        self.num_classes = len(self.classes)
        self.in_chans = 3
        self._train_labels: Optional[list[int]] = None
        self._scanned: dict[str, Dataset] = {}  # folders scanned by check_data / train_labels, for setup

    def _data_config(self) -> dict[str, Any]:
        from timm.data import resolve_data_config

        model = None
        trainer = self.trainer
        if trainer is not None and trainer.lightning_module is not None:
            model = getattr(trainer.lightning_module, "model", trainer.lightning_module)
        args: dict[str, Any] = {}
        if self.img_size is not None:
            in_chans = getattr(model, "in_chans", 3) if model is not None else 3
            args["input_size"] = (in_chans, self.img_size, self.img_size)
        elif model is None:  # used outside a Trainer: timm's generic default
            args["input_size"] = (3, 224, 224)
        return resolve_data_config(args, model=model)

    def _folder(self, sub: str, transform: Optional[Callable]) -> Dataset:
        """The dataset of folder ``sub`` with ``transform`` (reusing a scan made earlier)."""
        from torchvision.datasets.vision import StandardTransform

        ds = self._scan(sub)  # the earlier scan, or a new one
        del self._scanned[sub]  # the caller owns it now

        ds.transform = transform  # type: ignore[attr-defined]
        ds.transforms = StandardTransform(transform, None) if transform is not None else None  # type: ignore[attr-defined]
        return ds

    def _scan(self, sub: str) -> Dataset:
        """Folder ``sub`` as a dataset without transform, scanned once (the file lists of ImageNet take a while)."""
        if sub in self._scanned:
            return self._scanned[sub]
        try:
            ds = _KnownClassesImageFolder(str(self.data_dir / sub), {c: i for i, c in enumerate(self.classes)})
        except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes ..."
            raise FileNotFoundError(
                f"image folder '{self.data_dir / sub}': {err} (expected <class>/<image> files, e.g. *.JPEG)"
            ) from None
        self._scanned[sub] = ds
        return ds

    def train_labels(self) -> Sequence[int]:
        if self._train_labels is None:
            ds = self.train_set if self.train_set is not None else self._scan(self.train_dir)
            self._train_labels = list(ds.targets)  # type: ignore[attr-defined]
        return self._train_labels

    def check_data(self, stage: Optional[str] = None) -> None:
        """Scan the folders ``setup(stage)`` needs (kept for it): a class folder without images, a validation
        class the training folder lacks, or a training set smaller than one batch, raises here."""
        if stage in (None, "fit") and self.train_set is None:
            self._scan(self.train_dir)
        if self.val_set is None:
            self._scan(self.val_dir)
        if stage in (None, "fit"):
            self._check_train_batches()

    def setup(self, stage: Optional[str] = None) -> None:
        from timm.data import create_transform

        cfg = self._data_config()
        self.data_config = cfg
        if stage in (None, "fit") and self.train_set is None:
            tf = create_transform(**cfg, is_training=True, auto_augment=self.auto_augment)
            self.train_set = self._folder(self.train_dir, tf)
            self._train_labels = list(self.train_set.targets)  # type: ignore[attr-defined]
        if self.val_set is None:
            self.val_set = self._folder(self.val_dir, create_transform(**cfg, is_training=False))
