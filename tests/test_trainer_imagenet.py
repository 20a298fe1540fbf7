"""The ImageNet recipe end to end on a generated image folder: Pillow reads it (no torchvision),
ResNet-18 trains BAS then FGC against a bank, and the checkpoint evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trainer.cli import train
from trainer.data import load_image_folder
from trainer.errors import TrainerError
from trainer.eval_cli import eval_command
from trainer.images import MEAN, STD

PIL = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = {"cat": (200, 40, 40), "dog": (40, 200, 40), "owl": (40, 40, 200)}
PER_CLASS = {"train": 6, "val": 2}


def make_folder(root: Path) -> Path:
    """Tiny images of three colours, of assorted sizes and formats, as ImageNet is laid out."""
    rng = np.random.default_rng(0)
    for split, count in PER_CLASS.items():
        for name, colour in CLASSES.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                height, width = 40 + 4 * i, 48 - 2 * i
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (height, width, 3)), 0, 255)
                suffix = ".png" if i % 2 else ".JPEG"
                PIL.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}{suffix}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_the_folder_reads_as_indexed_normalised_crops(tmp_path: Path) -> None:
    splits = load_image_folder(make_folder(tmp_path), image_size=24)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (18, 6, 3)
    assert splits.input_shape == (3, 24, 24)
    image, label, index = splits.train[7]
    assert image.shape == (3, 24, 24) and (label, index) == (1, 7)  # dog: the second class, sorted
    centre, label, _ = splits.test[0]
    red = centre.permute(1, 2, 0).reshape(-1, 3).mean(0).numpy() * STD + MEAN  # back to [0, 1]
    assert label == 0 and red[0] > 0.6 and red[1] < 0.3  # a cat is red, whatever the crop
    again = load_image_folder(tmp_path, image_size=24).test[0][0]
    assert torch.equal(centre, again)  # evaluation crops are deterministic


def test_val_classes_must_be_train_classes(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "val" / "emu").mkdir()
    with pytest.raises(TrainerError, match="among the training classes"):
        load_image_folder(tmp_path)


@pytest.mark.slow
def test_resnet18_recipe_runs_bas_then_fgc_and_evaluates(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imagenet")
    recipe = ["--dataset", "imagefolder", "--data-root", str(root), "--arch", "resnet18",
              "--image-size", "32", "--batch-size", "6", "--weight-decay", "1e-4", "--lr", "0.05",
              "--no-progress", "--log-level", "WARNING"]
    bas = CliRunner().invoke(train, [*recipe, "--epochs", "1", "--out-dir", str(tmp_path / "bas")])
    assert bas.exit_code == 0, bas.output
    recipe = [a for a in recipe if a not in ("--arch", "resnet18")]  # --init-from brings the architecture
    fgc = CliRunner().invoke(train, [*recipe, "--phase", "fgc", "--epochs", "3", "--nn-num", "4",
                                     "--nn-epoch", "1", "--init-from", str(tmp_path / "bas" / "checkpoint.pt"),
                                     "--out-dir", str(tmp_path / "fgc")])
    assert fgc.exit_code == 0, fgc.output
    records = [json.loads(line) for line in (tmp_path / "fgc" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [(r["epoch"], r["knn"]) for r in epochs] == [(1, False), (2, True)]
    assert all(np.isfinite(r["train_gate"]) and r["train_gate"] > 0 for r in epochs)
    config = json.loads((tmp_path / "fgc" / "config.json").read_text())
    assert config["fgc"]["contrast_blocks"] == [6, 7] and config["model"]["num_classes"] == 3
    result = CliRunner().invoke(eval_command, [str(tmp_path / "fgc" / "checkpoint.pt"), "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output)
    assert evaluated["examples"] == 6 and evaluated["top1"] == epochs[-1]["test_top1"]
    assert 0 < evaluated["macs_kept"] <= 1.05 and evaluated["dense_macs"] > 0
