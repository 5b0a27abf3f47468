"""Data modules and the paper's non-i.i.d. batch sampler."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_brn.data import (
    FashionMNISTDataModule,
    ImageFolderDataModule,
    NonIIDBatchSampler,
    read_idx,
)


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, compress: bool, write_idx) -> None:
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "x-idx3-ubyte", arr, compress)
    name = "x-idx3-ubyte.gz" if compress else "x-idx3-ubyte"
    np.testing.assert_array_equal(read_idx(tmp_path / name), arr)


def test_read_idx_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


# ----------------------------------------------------------------------------- Fashion-MNIST
@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_datamodule(tmp_path: Path, compress: bool, make_fmnist) -> None:
    dm = FashionMNISTDataModule(make_fmnist(tmp_path / "fm", compress=compress), batch_size=8, val_batch_size=7)
    dm.setup("fit")
    assert (dm.num_classes, dm.in_chans) == (10, 1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == 64 // 8
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (7, 1, 28, 28)
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 20  # every test image once


def test_fashion_mnist_limits_and_noniid(tmp_path: Path, make_fmnist) -> None:
    dm = FashionMNISTDataModule(make_fmnist(tmp_path / "fm"), batch_size=8, sampling="non_iid", limit_train=40)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, NonIIDBatchSampler) and len(loader) == 40 // 8
    for _, y in loader:
        assert torch.equal(y[0::2], y[1::2])


def test_fashion_mnist_missing_folder_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*--data.init_args.data_dir"):
        FashionMNISTDataModule(tmp_path / "nowhere")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="lacks train-labels-idx1-ubyte"):
        FashionMNISTDataModule(tmp_path / "partial")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_default_folder() -> None:
    dm = FashionMNISTDataModule(limit_train=100, limit_val=50)
    dm.setup("fit")
    assert len(dm.train_set) == 100 and len(dm.val_set) == 50


def test_batch_size_not_divisible_by_k() -> None:
    with pytest.raises(ValueError, match=r"batch_size=33 is not divisible by examples_per_label=2.*e.g. 34"):
        FashionMNISTDataModule.__new__(FashionMNISTDataModule).__init__(batch_size=33, sampling="non_iid")
    with pytest.raises(ValueError, match="multiple of 4"):
        NonIIDBatchSampler(torch.arange(40) % 4, batch_size=6, examples_per_label=4)


# ----------------------------------------------------------------------------- image folders
def test_image_folder_datamodule(tmp_path: Path, make_image_folder) -> None:
    dm = ImageFolderDataModule(make_image_folder(tmp_path / "inet"), batch_size=4, num_workers=0, img_size=32)
    assert dm.num_classes == 3 and dm.classes[0] == "n00000000"
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.max() < 3
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (3, 3, 32, 32) and sorted(yv.tolist()) == [0, 1, 2]
    assert Counter(dm.train_labels()) == {0: 4, 1: 4, 2: 4}


def test_image_folder_uses_model_input_size(tmp_path: Path, make_image_folder) -> None:
    dm = ImageFolderDataModule(make_image_folder(tmp_path / "inet"), batch_size=2, num_workers=0)
    assert dm._data_config()["input_size"] == (3, 224, 224)  # no model attached: timm's default


def test_image_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ImageNet layout.*--data.init_args.data_dir"):
        ImageFolderDataModule(tmp_path / "nope")


def test_image_folder_check_data_scans_once_and_raises_early(tmp_path: Path, make_image_folder, monkeypatch) -> None:
    import torchvision.datasets

    root = make_image_folder(tmp_path / "inet", classes=2, per_class=2)
    scans: list[str] = []
    real = torchvision.datasets.ImageFolder.make_dataset

    def counting(directory, *args, **kwargs):
        scans.append(Path(directory).name)
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(torchvision.datasets.ImageFolder, "make_dataset", staticmethod(counting))
    dm = ImageFolderDataModule(root, batch_size=2, num_workers=0, img_size=16)
    dm.check_data("fit")
    assert sorted(scans) == ["train", "val"]
    dm.setup("fit")  # reuses the scans, with the transforms set
    assert sorted(scans) == ["train", "val"] and dm.train_set.transform is not None and dm.val_set.transform is not None
    assert next(iter(dm.train_dataloader()))[0].shape == (2, 3, 16, 16)
    scans.clear()
    ImageFolderDataModule(root, batch_size=2, num_workers=0).check_data("validate")
    assert scans == ["val"]

    dm = ImageFolderDataModule(root, batch_size=2, num_workers=0)
    dm.check_data("fit")
    import pickle

    again = pickle.loads(pickle.dumps(dm))  # ddp_spawn pickles the data module, spawned loader workers its datasets
    again.setup("fit")
    assert len(again.train_set) == 4 and again.train_set.class_to_idx == {"n00000000": 0, "n00000001": 1}
    pickle.loads(pickle.dumps(again.val_set))

    (root / "val" / "n00000001").rename(root / "val" / "n99999999")
    with pytest.raises(ValueError, match=r"val' has classes not in the training folder: \['n99999999'\]"):
        ImageFolderDataModule(root, batch_size=2, num_workers=0).check_data("fit")
    for f in (root / "train" / "n00000001").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"image folder '.*train': Found no valid file for the classes n00000001"):
        ImageFolderDataModule(root, batch_size=2, num_workers=0).check_data("fit")


def test_fashion_mnist_check_data_reads_once_and_raises_early(tmp_path: Path, make_fmnist, write_idx) -> None:
    folder = make_fmnist(tmp_path / "fm")
    dm = FashionMNISTDataModule(folder, batch_size=4)
    dm.check_data("fit")
    assert sorted(dm._loaded) == ["test", "train"]
    dm.setup("fit")
    assert dm._loaded == {} and len(dm.train_set) > 0 and len(dm.val_set) > 0
    for f in folder.glob("t10k-labels*"):
        f.unlink()
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(3) % 10, False)  # fewer labels than images
    with pytest.raises(ValueError, match=r"Fashion-MNIST test files .* disagree"):
        FashionMNISTDataModule(folder, batch_size=4).check_data("fit")


# ----------------------------------------------------------------------------- non-i.i.d. sampler
def _check_composition(batch: list[int], labels: np.ndarray, k: int, batch_size: int) -> None:
    assert len(batch) == batch_size
    assert len(set(batch)) == batch_size, "an image appears twice in one batch"
    groups = [batch[i : i + k] for i in range(0, batch_size, k)]
    for g in groups:
        assert len({int(labels[i]) for i in g}) == 1, f"group {g} mixes labels"


@pytest.mark.parametrize("k", [2, 4])
def test_noniid_composition_single_process(k: int) -> None:
    labels = np.repeat(np.arange(10), 30)
    sampler = NonIIDBatchSampler(labels, batch_size=4 * k, examples_per_label=k, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 300 // (4 * k)
    for b in batches:
        _check_composition(b, labels, k, 4 * k)
    # labels are drawn with replacement: some batch repeats a label (2+ groups of it)
    drawn = [[int(labels[b[i]]) for i in range(0, len(b), k)] for b in batches]
    assert any(len(set(d)) < len(d) for d in drawn)
    # every class appears over the epoch
    assert set(sum(drawn, [])) == set(range(10))


def test_noniid_two_ranks_disjoint_and_deterministic() -> None:
    labels = np.repeat(np.arange(5), 20)
    kw = dict(batch_size=8, examples_per_label=2, num_replicas=2, seed=7)
    r0 = list(NonIIDBatchSampler(labels, rank=0, **kw))
    r1 = list(NonIIDBatchSampler(labels, rank=1, **kw))
    assert len(r0) == len(r1) == 100 // 16
    for a, b in zip(r0, r1):
        _check_composition(a, labels, 2, 8)
        _check_composition(b, labels, 2, 8)
        assert not set(a) & set(b), "two ranks got the same image in one step"
    assert r0 != r1
    assert r0 == list(NonIIDBatchSampler(labels, rank=0, **kw))  # same (seed, epoch) -> same batches
    s = NonIIDBatchSampler(labels, rank=0, **kw)
    s.set_epoch(1)
    assert list(s) != r0


def test_noniid_no_duplicates_when_classes_are_small() -> None:
    # 3 classes x 6 images, a global step of 2 ranks x 6 = 12 images: classes run out within a step
    labels = np.repeat(np.arange(3), 6)
    for seed in range(20):
        kw = dict(batch_size=6, examples_per_label=2, num_replicas=2, seed=seed, num_batches=5)
        for a, b in zip(NonIIDBatchSampler(labels, rank=0, **kw), NonIIDBatchSampler(labels, rank=1, **kw)):
            _check_composition(a, labels, 2, 6)
            _check_composition(b, labels, 2, 6)
            assert not set(a) & set(b)


def test_noniid_errors() -> None:
    with pytest.raises(ValueError, match="too small for non-i.i.d. batches"):
        NonIIDBatchSampler([0, 1, 2, 3], batch_size=4)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        NonIIDBatchSampler(np.repeat(np.arange(4), 4), batch_size=4, num_replicas=2, rank=2)


def test_iid_sampler_two_ranks_disjoint(tmp_path: Path, make_fmnist) -> None:
    dm = FashionMNISTDataModule(make_fmnist(tmp_path / "fm"), batch_size=8)
    dm.setup("fit")
    samplers = []
    for rank in (0, 1):
        dm._replicas = lambda rank=rank: (2, rank)  # type: ignore[method-assign]
        samplers.append(list(dm.train_sampler()))
    assert len(samplers[0]) == len(samplers[1]) == 32
    assert not set(samplers[0]) & set(samplers[1])


def test_check_data_refuses_a_training_set_smaller_than_one_batch(tmp_path, make_fmnist, make_image_folder):
    """Raised by check_data("fit"), before any Trainer; the message names the options each data module has."""
    fm = make_fmnist(tmp_path / "fm")
    with pytest.raises(ValueError, match=r"the training set has 20 examples, fewer than one global batch of 32 "
                       r"\(1 process\(es\) x batch_size=32\): lower batch_size \(--data.init_args.batch_size\) or "
                       r"raise limit_train=20 \(--data.init_args.limit_train\)$"):
        FashionMNISTDataModule(fm, batch_size=32, limit_train=20).check_data("fit")
    FashionMNISTDataModule(fm, batch_size=32, limit_train=20).check_data("validate")  # no training set needed
    root = make_image_folder(tmp_path / "inet", classes=2, per_class=2)
    with pytest.raises(ValueError, match=r"the training set has 4 examples, .*: lower batch_size "
                       r"\(--data.init_args.batch_size\)$"):
        ImageFolderDataModule(root, batch_size=8).check_data("fit")


# ----------------------------------------------------------------------------- non-i.i.d. batches under a real Trainer
class _RecordBatches:
    """A tiny LightningModule (made on demand: Lightning is imported lazily) that records every training batch as
    the tuple of its images' pixel sums (the images are random, so a sum names an image)."""

    @staticmethod
    def make(seen: list):
        import lightning.pytorch as pl

        class Recorder(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.fc = torch.nn.Linear(28 * 28, 10)

            def training_step(self, batch, batch_idx):
                x, y = batch
                seen.append((self.current_epoch, tuple(round(float(v), 3) for v in x.flatten(1).sum(1))))
                return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return Recorder()


def _noniid_fit(folder: Path, root: Path, seed: int = 0, ckpt_path=None, **trainer_kwargs) -> list:
    from lightning.pytorch import Trainer

    seen: list = []
    dm = FashionMNISTDataModule(folder, batch_size=8, sampling="non_iid", examples_per_label=2, seed=seed,
                                pin_memory=False)
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  use_distributed_sampler=False, limit_val_batches=0, default_root_dir=root, max_epochs=3)
    kwargs.update(trainer_kwargs)
    Trainer(**kwargs).fit(_RecordBatches.make(seen), datamodule=dm, ckpt_path=ckpt_path)
    return seen


def test_noniid_under_trainer_new_batches_every_epoch_deterministic_and_resumable(tmp_path: Path, make_fmnist) -> None:
    """Lightning calls set_epoch on batch_sampler.sampler only: the sampler's handle must carry it, else every
    epoch repeats epoch 0. Same seed -> same batches; another seed -> others; a run resumed mid-epoch from a
    checkpoint draws exactly what the uninterrupted run drew after that step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folder = make_fmnist(tmp_path / "fm", n_train=64)
    full = _noniid_fit(folder, tmp_path / "a", enable_checkpointing=False)
    assert len(full) == 3 * 8 and [e for e, _ in full] == [0] * 8 + [1] * 8 + [2] * 8
    epochs = [[b for e, b in full if e == k] for k in range(3)]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert _noniid_fit(folder, tmp_path / "b", enable_checkpointing=False) == full
    assert _noniid_fit(folder, tmp_path / "c", seed=1, enable_checkpointing=False) != full
    # interrupted at step 12 (mid epoch 1), resumed to the end
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=12, save_top_k=-1)
    first = _noniid_fit(folder, tmp_path / "d", max_steps=12, callbacks=[ckpt])
    assert first == full[:12]
    files = sorted((tmp_path / "ck").glob("*.ckpt"))
    assert len(files) == 1
    rest = _noniid_fit(folder, tmp_path / "e", ckpt_path=str(files[0]), enable_checkpointing=False)
    assert rest == full[12:]


def test_noniid_sampler_handle_forwards_set_epoch_and_start_batch_skips() -> None:
    labels = np.repeat(np.arange(4), 16)
    s = NonIIDBatchSampler(labels, batch_size=8, examples_per_label=4, seed=5)
    e0 = list(s)
    s.sampler.set_epoch(2)  # what lightning.fabric.utilities.data._set_sampler_epoch calls
    assert s.epoch == 2 and list(s) != e0
    s.set_epoch(0)
    s.start_batch = lambda: 3
    assert list(s) == e0[3:]
    for b in e0:
        _check_composition(b, labels, 4, 8)


@pytest.mark.parametrize("name", ["limit_train", "limit_val"])
@pytest.mark.parametrize("value", [-1, 0, 2.5, True])
def test_limits_must_be_positive_ints(name, value, tmp_path, make_fmnist):
    with pytest.raises(ValueError, match=f"{name} must be a positive int .* got {name}={value!r}"):
        FashionMNISTDataModule(make_fmnist(tmp_path / "fm"), **{name: value})


def test_predict_shards_hold_every_example_once_under_ddp(tmp_path, make_fmnist):
    from types import SimpleNamespace

    fm = make_fmnist(tmp_path / "fm", n_test=21)  # not a multiple of the world size
    seen, val_seen = [], []
    for rank in range(2):
        dm = FashionMNISTDataModule(fm, batch_size=4, val_batch_size=5)
        dm.trainer = SimpleNamespace(
            world_size=2, global_rank=rank, _accelerator_connector=SimpleNamespace(use_distributed_sampler=False)
        )
        dm.setup("predict")
        seen += [i for i in dm.predict_dataloader().sampler]
        val_seen += [i for i in dm.val_dataloader().sampler]
    assert sorted(seen) == list(range(21))  # no padding duplicates in predictions
    assert len(val_seen) == 22  # evaluation pads the shards to equal length, as Lightning does


_DDP_NONIID_SCRIPT = '''
import json, sys
import torch
import lightning.pytorch as pl
from lightning_brn.data import FashionMNISTDataModule

folder, out = sys.argv[1], sys.argv[2]


class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(28 * 28, 10)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append([self.current_epoch, [round(float(v), 3) for v in x.flatten(1).sum(1)]])
        return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_end(self):
        with open(f"{out}/rank{self.global_rank}.json", "w") as f:
            json.dump(self.seen, f)


if __name__ == "__main__":
    dm = FashionMNISTDataModule(folder, batch_size=4, sampling="non_iid", examples_per_label=2, pin_memory=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, limit_val_batches=0)
    trainer.fit(Recorder(), datamodule=dm)
'''


def test_noniid_under_ddp_every_rank_draws_its_own_batches_and_new_ones_each_epoch(
    tmp_path: Path, make_fmnist, ddp_subprocess_env
) -> None:
    """A real 2-process DDP run (gloo, CPU): at every step the two ranks hold different images, and each rank's
    second epoch differs from its first (set_epoch reaches the sampler on every rank)."""
    import json
    import subprocess
    import sys

    folder = make_fmnist(tmp_path / "fm", n_train=64)
    script = tmp_path / "ddp_noniid.py"
    script.write_text(_DDP_NONIID_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path)], capture_output=True, text=True,
                         timeout=240, env=ddp_subprocess_env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0) == len(r1) == 2 * (64 // (4 * 2))
    for (e0, b0), (e1, b1) in zip(r0, r1):
        assert e0 == e1 and not set(b0) & set(b1), "two ranks trained on the same image in one step"
    for seen in (r0, r1):
        first, second = ([b for e, b in seen if e == k] for k in (0, 1))
        assert first and first != second
