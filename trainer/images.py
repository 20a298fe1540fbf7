"""An ImageNet-layout image folder read with Pillow and numpy: no torchvision needed.

``ROOT/train/<class>/*.jpg`` and ``ROOT/val/<class>/*.jpg`` (any of :data:`EXTENSIONS`); classes
are the sorted folder names of ``train/``, and ``val/`` must use the same ones. Training items get
the usual ImageNet augmentation (random resized crop, scale 0.08-1, aspect 3/4-4/3, then a
horizontal flip), evaluation items a resize of the short side to ``size * 256 / 224`` and a
centre crop; both are normalised with ImageNet's mean and std. Items are ``(image, label, index)``.
Pillow is optional (``pip install 'fgc-bank[images]'``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from trainer.errors import TrainerError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
MEAN = np.array((0.485, 0.456, 0.406), dtype=np.float32)
STD = np.array((0.229, 0.224, 0.225), dtype=np.float32)
Crop = Callable[[Any], Any]  # a PIL image to a PIL image of the model's size


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise TrainerError("the imagefolder dataset reads images with Pillow, which is not "
                           "installed: pip install 'fgc-bank[images]' (or pillow)") from None
    return Image


def _uniform(low: float, high: float) -> float:
    """From torch's generator: seeded by --seed, and per worker by the DataLoader."""
    return low + (high - low) * float(torch.rand(()))


def random_resized_crop(size: int) -> Crop:
    """A crop of 8-100% of the area at aspect 3/4-4/3 (10 tries, then the centre), resized to
    ``size`` x ``size``, flipped left-right half of the time."""
    image_module = _pil()

    def crop(image: Any) -> Any:
        width, height = image.size
        for _ in range(10):
            area = width * height * _uniform(0.08, 1.0)
            aspect = math.exp(_uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = int(_uniform(0, width - w + 1 - 1e-9)), int(_uniform(0, height - h + 1 - 1e-9))
                break
        else:
            w = h = min(width, height)
            left, top = (width - w) // 2, (height - h) // 2
        out = image.resize((size, size), image_module.BILINEAR, box=(left, top, left + w, top + h))
        return out.transpose(image_module.FLIP_LEFT_RIGHT) if _uniform(0, 1) < 0.5 else out

    return crop


def centre_crop(size: int) -> Crop:
    """Short side to ``size * 256 / 224``, then the central ``size`` x ``size``."""
    image_module = _pil()
    short = round(size * 256 / 224)

    def crop(image: Any) -> Any:
        width, height = image.size
        scale = short / min(width, height)
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                             image_module.BILINEAR)
        left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
        return image.crop((left, top, left + size, top + size))

    return crop


def to_tensor(image: Any) -> Tensor:
    """An RGB PIL image -> (3, H, W) float32, normalised with ImageNet's mean and std."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(((array - MEAN) / STD).transpose(2, 0, 1).copy())


class ImageFolder(Dataset):
    """Images under ``root/<class>/``; items ``(image, label, index)``.

    Parameters
    ----------
    root : the split's directory (``train/`` or ``val/``).
    crop : what to do to each image (:func:`random_resized_crop` or :func:`centre_crop`).
    classes : the class folder names, in label order (default: ``root``'s, sorted).
    """

    def __init__(self, root: str | Path, crop: Crop, classes: list[str] | None = None) -> None:
        root = Path(root)
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        self.classes = classes if classes is not None else found
        if not self.classes or (classes is not None and not set(found) <= set(classes)):
            raise TrainerError(f"image folder {root} must hold one folder per class"
                               + (f" among the training classes {classes}" if classes else ""))
        self.samples = [(path, label) for label, name in enumerate(self.classes)
                        for path in sorted((root / name).glob("*"))
                        if path.suffix.lower() in EXTENSIONS]
        if not self.samples:
            raise TrainerError(f"image folder {root} holds no images ({', '.join(EXTENSIONS)})")
        self.crop = crop

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        path, label = self.samples[index]
        with _pil().open(path) as image:
            return to_tensor(self.crop(image.convert("RGB"))), label, index
