"""Datasets that yield ``(image, label, index)`` and the per-rank loaders that shard them.

FGC keeps one bank row per training example, so every training example carries its dataset index.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, real, no download),
  1 channel, split 80/20 stratified with a fixed seed (1,437 train / 360 test).
* ``cifar10``: the standard python-pickle CIFAR-10 directory (``data_batch_1..5``, ``test_batch``),
  read with a restricted unpickler that only rebuilds numpy arrays.
* ``imagefolder``: ``ROOT/train`` and ``ROOT/val`` class folders (ImageNet layout), read with
  Pillow (optional) by :mod:`trainer.images`; ``--image-size`` sets the crop.
* ``synthetic``: seeded class-prototype images, for tests and smoke runs.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from trainer.errors import TrainerError

logger = logging.getLogger(__name__)

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
Transform = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DatasetSplits:
    """A training set (indexed), a test set, and what the model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of one image as the model sees it


class TensorImages(Dataset):
    """In-memory images and labels; items are ``(image, label, index)``.

    Parameters
    ----------
    images : (N, C, H, W) float32 tensor, already normalised.
    labels : (N,) int64 tensor.
    transform : optional random augmentation applied per item, (C, H, W) -> (C, H, W).
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: Transform | None = None) -> None:
        if len(images) != len(labels):
            raise TrainerError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index]), index


def crop_flip(padding: int) -> Transform:
    """Random crop after zero padding, then a random horizontal flip (CIFAR augmentation)."""

    def transform(image: Tensor) -> Tensor:
        _, height, width = image.shape
        padded = torch.nn.functional.pad(image, (padding,) * 4)
        top, left = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,)))
        image = padded[:, top:top + height, left:left + width]
        return image.flip(2) if torch.rand(()) < 0.5 else image

    return transform


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """scikit-learn's bundled digits as (1, 8, 8) images, standardised with train statistics."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise TrainerError("the digits dataset comes with scikit-learn, which is not installed: "
                           "pip install 'fgc-bank[digits]' (or scikit-learn)") from None

    digits = sk_load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target)
    mean, std = float(x_train.mean()), float(x_train.std())

    def norm(x: np.ndarray) -> Tensor:
        return torch.from_numpy((x - mean) / std)

    return DatasetSplits(TensorImages(norm(x_train), torch.from_numpy(y_train).long()),
                         TensorImages(norm(x_test), torch.from_numpy(y_test).long()),
                         num_classes=10, input_shape=(1, 8, 8))


def synthetic(size: int, num_classes: int = 10, shape: tuple[int, int, int] = (3, 8, 8),
              seed: int = 0) -> DatasetSplits:
    """Seeded prototype-plus-noise images: learnable, deterministic, instant."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *shape, generator=gen)

    def draw(n: int) -> TensorImages:
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        noise = torch.randn(n, *shape, generator=gen)
        return TensorImages(prototypes[labels] + 0.8 * noise, labels)

    return DatasetSplits(draw(size), draw(max(size // 4, num_classes)), num_classes, shape)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's batch files, refusing anything but numpy arrays and plain data."""

    ALLOWED = {(core, name) for core in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")} | {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("__builtin__", "object"), ("builtins", "object")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    hint = ("expected the python version of CIFAR-10 (cifar-10-python.tar.gz, extracted: "
            "cifar-10-batches-py/ with data_batch_1..5 and test_batch)")
    if not path.is_file():
        raise TrainerError(f"CIFAR-10 file {path} is missing; {hint}")
    try:
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise TrainerError(f"CIFAR-10 file {path} is malformed ({exc}); {hint}") from exc
    if len(data) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise TrainerError(f"CIFAR-10 file {path} is malformed: {len(data)} images, "
                           f"{len(labels)} labels, labels must be 0..9; {hint}")
    return data, labels


def load_cifar10(root: str | Path | None) -> DatasetSplits:
    """CIFAR-10 from its python-pickle directory, normalised; training items crop+flip."""
    if root is None or not Path(root).is_dir():
        raise TrainerError(f"CIFAR-10 directory {root} does not exist; pass --data-root pointing "
                           "at the extracted cifar-10-batches-py directory")
    root = Path(root)
    parts = [_read_cifar_batch(root / name) for name in CIFAR_TRAIN_FILES]
    test_x, test_y = _read_cifar_batch(root / CIFAR_TEST_FILE)
    mean = torch.tensor(CIFAR_MEAN)[:, None, None]
    std = torch.tensor(CIFAR_STD)[:, None, None]

    def norm(x: np.ndarray) -> Tensor:
        return (torch.from_numpy(x).float() / 255.0 - mean) / std

    train_x = np.concatenate([x for x, _ in parts])
    train_y = np.concatenate([y for _, y in parts])
    return DatasetSplits(TensorImages(norm(train_x), torch.from_numpy(train_y), crop_flip(4)),
                         TensorImages(norm(test_x), torch.from_numpy(test_y)),
                         num_classes=10, input_shape=(3, 32, 32))


def load_image_folder(root: str | Path | None, image_size: int = 224) -> DatasetSplits:
    """``ROOT/train`` and ``ROOT/val`` class folders (ImageNet layout), read with Pillow."""
    from trainer.images import ImageFolder, centre_crop, random_resized_crop

    if root is None or not (Path(root) / "train").is_dir() or not (Path(root) / "val").is_dir():
        raise TrainerError(f"image folder {root} must contain train/ and val/ class folders "
                           "(ImageNet layout); pass --data-root")
    train = ImageFolder(Path(root) / "train", random_resized_crop(image_size))
    test = ImageFolder(Path(root) / "val", centre_crop(image_size), classes=train.classes)
    return DatasetSplits(train, test, len(train.classes), (3, image_size, image_size))


def load_dataset(name: str, root: str | None = None, synthetic_size: int = 512,
                 seed: int = 0, image_size: int = 224) -> DatasetSplits:
    """Load a dataset by name: digits, cifar10, imagefolder or synthetic."""
    if name == "digits":
        return load_digits(seed=seed)
    if name == "cifar10":
        return load_cifar10(root)
    if name == "imagefolder":
        return load_image_folder(root, image_size)
    if name == "synthetic":
        return synthetic(synthetic_size, seed=seed)
    raise TrainerError(f"unknown dataset {name!r}; use digits, cifar10, imagefolder or synthetic")


class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, no padding: each example is evaluated once."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.size, self.rank, self.world = size, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))


def make_loaders(splits: DatasetSplits, batch_size: int, workers: int, rank: int, world: int,
                 seed: int, pin_memory: bool = False
                 ) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """Per-rank train and test loaders.

    Training uses a seeded, shuffling ``DistributedSampler`` (call ``set_epoch``) and drops the
    last incomplete batch, so every rank takes the same number of equal-size steps. Evaluation
    shards without padding.

    Parameters
    ----------
    batch_size : global batch size; each rank loads ``batch_size // world``.
    """
    if batch_size % world:
        raise TrainerError(f"batch size {batch_size} does not split evenly over {world} ranks; "
                           f"use a multiple of {world}")
    per_rank = batch_size // world
    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed, drop_last=False)
    if len(sampler) < per_rank:
        raise TrainerError(f"each rank gets {len(sampler)} training examples, fewer than one "
                           f"batch of {per_rank}; lower --batch-size")
    train = DataLoader(splits.train, batch_size=per_rank, sampler=sampler, drop_last=True,
                       num_workers=workers, pin_memory=pin_memory,
                       persistent_workers=workers > 0)
    test = DataLoader(splits.test, batch_size=per_rank,
                      sampler=ShardSampler(len(splits.test), rank, world),  # type: ignore[arg-type]
                      num_workers=workers, pin_memory=pin_memory)
    return train, test, sampler
