"""Datasets yield (image, label, index); CIFAR-10's pickle directory is read safely or refused."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    ShardSampler,
    load_cifar10,
    load_dataset,
    load_digits,
    load_image_folder,
    make_loaders,
    synthetic,
)
from trainer.errors import TrainerError


def write_cifar(root: Path, per_file: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny directory in CIFAR-10's python format (protocol-2 pickles of dicts, bytes keys)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_file)]
        with (root / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f, protocol=2)
        written[name] = data
        written[name + "_labels"] = np.array(labels)
    return written


def test_digits_are_real_indexed_and_split_stratified() -> None:
    splits = load_digits()
    assert (len(splits.train), len(splits.test)) == (1437, 360)
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    for index in (0, 17, 1436):
        image, label, got = splits.train[index]
        assert image.shape == (1, 8, 8) and got == index and 0 <= label < 10
    labels = torch.tensor([splits.train[i][1] for i in range(len(splits.train))])
    from sklearn.datasets import load_digits as sk_digits

    totals = np.bincount(sk_digits().target)  # stratified: 80% of each digit, +-1
    assert np.abs(labels.bincount().numpy() - 0.8 * totals).max() <= 1
    train_images = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert abs(train_images.mean().item()) < 1e-5 and train_images.std().item() == pytest.approx(1, rel=1e-3)


def test_cifar10_directory_loads_with_indices_and_normalisation(tmp_path: Path) -> None:
    written = write_cifar(tmp_path / "cifar")
    splits = load_cifar10(tmp_path / "cifar")
    assert (len(splits.train), len(splits.test)) == (30, 6)
    image, label, index = splits.test[4]
    raw = torch.from_numpy(written["test_batch"][4].reshape(3, 32, 32)).float() / 255
    expected = (raw - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
    torch.testing.assert_close(image, expected)
    assert (label, index) == (written["test_batch_labels"][4], 4)
    train_image, train_label, train_index = splits.train[13]  # data_batch_3, row 1, augmented
    assert train_image.shape == (3, 32, 32) and train_index == 13
    assert train_label == written["data_batch_3_labels"][1]


@pytest.mark.parametrize("problem,match", [
    ("no-dir", "does not exist"),
    ("missing-file", "data_batch_3 is missing"),
    ("garbage", "malformed"),
    ("wrong-shape", "malformed"),
    ("evil", "refusing to load"),
])
def test_bad_cifar10_directory_is_refused_with_what_to_do(tmp_path: Path, problem: str,
                                                          match: str) -> None:
    root = tmp_path / "cifar"
    if problem != "no-dir":
        write_cifar(root)
    if problem == "missing-file":
        (root / "data_batch_3").unlink()
    elif problem == "garbage":
        (root / "data_batch_2").write_bytes(b"not a pickle at all")
    elif problem == "wrong-shape":
        with (root / "test_batch").open("wb") as f:
            pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    elif problem == "evil":
        marker = tmp_path / "pwned"

        class Evil:
            def __reduce__(self):
                return (Path.touch, (marker,))

        with (root / "data_batch_1").open("wb") as f:
            pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(TrainerError, match=match) as info:
        load_cifar10(root)
    assert "cifar-10" in str(info.value).lower()
    assert not (tmp_path / "pwned").exists()


def test_image_folder_without_pillow_says_which_extra(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    for split in ("train/a", "val/a"):
        (tmp_path / split).mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL -> ImportError, as if not installed
    with pytest.raises(TrainerError, match=r"fgc-bank\[images\]"):
        load_image_folder(tmp_path)


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(TrainerError, match="digits, cifar10, imagefolder or synthetic"):
        load_dataset("mnist")


def test_synthetic_is_deterministic_and_learnable_shape() -> None:
    a, b = synthetic(64, seed=3), synthetic(64, seed=3)
    assert torch.equal(a.train.images, b.train.images)
    assert a.train[5][2] == 5 and a.input_shape == (3, 8, 8)


def test_loaders_shard_training_over_ranks_and_evaluate_each_test_image_once() -> None:
    splits = synthetic(100, seed=1)
    seen_train, seen_test, batches = [], [], []
    for rank in range(2):
        train, test, sampler = make_loaders(splits, batch_size=16, workers=0, rank=rank,
                                            world=2, seed=0)
        sampler.set_epoch(1)
        for images, labels, ids in train:
            assert images.shape[0] == 8  # per-rank batch, full batches only
            seen_train.extend(ids.tolist())
        batches.append(len(train))
        seen_test.extend(ids for _, _, batch_ids in test for ids in batch_ids.tolist())
    assert batches[0] == batches[1] == 6  # 50 per rank -> 6 full batches of 8
    assert len(set(seen_train)) == len(seen_train)  # no id twice in one epoch
    assert sorted(seen_test) == list(range(len(splits.test)))


def test_loaders_refuse_batches_that_do_not_fit() -> None:
    splits = synthetic(40)
    with pytest.raises(TrainerError, match="multiple of 2"):
        make_loaders(splits, batch_size=15, workers=0, rank=0, world=2, seed=0)
    with pytest.raises(TrainerError, match="lower --batch-size"):
        make_loaders(splits, batch_size=64, workers=0, rank=0, world=2, seed=0)


def test_shard_sampler_partitions_indices() -> None:
    parts = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(10)) and [len(p) for p in parts] == [4, 3, 3]
