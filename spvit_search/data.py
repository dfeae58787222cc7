"""Datasets: the embedded demo data, and ImageFolder trees for real data.

``--data demo``: scikit-learn's 1,797 handwritten digits (8×8, installed with the package, no
download), upscaled to 32×32 RGB, with fixed train / calib / test splits (1,197 / 200 / 400,
seed 0). ``--data PATH``: an ImageFolder tree ``PATH/train/<class>/…`` and ``PATH/val/<class>/…``
read with timm's transforms for the model; the calibration split is ``PATH/calib`` if it
exists, else a fixed 256-image subset of ``train``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from .errors import SpvitError

DEMO = "demo"
SPLITS = ("train", "calib", "test")
DEMO_SIZES = {"train": 1197, "calib": 200, "test": 400}
CALIB_SUBSET = 256


class DataError(SpvitError):
    """A data path or layout that cannot be read."""


class DemoDigits(Dataset):
    """One split of the demo digits as normalised 3×32×32 tensors; training adds random shifts."""

    num_classes = 10

    def __init__(self, split: str, augment: bool = False, size: int = 32) -> None:
        from sklearn.datasets import load_digits

        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; splits are {SPLITS}")
        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        start = {"train": 0, "calib": DEMO_SIZES["train"], "test": DEMO_SIZES["train"] + DEMO_SIZES["calib"]}[split]
        index = order[start : start + DEMO_SIZES[split]]
        x = torch.tensor(digits.images[index], dtype=torch.float32).unsqueeze(1) / 16.0
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.images = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
        self.labels = torch.tensor(digits.target[index], dtype=torch.long)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.augment:  # a random shift of up to 3 pixels (background is -1 after normalising)
            dx, dy = torch.randint(-3, 4, (2,)).tolist()
            image = torch.roll(F.pad(image, (3, 3, 3, 3), value=-1.0), shifts=(dy, dx), dims=(1, 2))[:, 3:-3, 3:-3]
        return image, self.labels[i]


def _image_folder(root: Path, sub: str, model: nn.Module | None, training: bool):
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    folder = root / sub
    if not folder.is_dir():
        raise DataError(
            f"{root} has no {sub}/ folder: expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
        )
    config = resolve_data_config({}, model=model) if model is not None else {}
    try:
        return ImageFolder(str(folder), transform=create_transform(**config, is_training=training))
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{folder}: {err}") from None


def build_dataset(data: str, split: str, model: nn.Module | None = None, augment: bool = False) -> Dataset:
    """Split ``split`` of ``data`` ("demo" or an ImageFolder root)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; splits are {SPLITS}")
    if data == DEMO:  # at the model's input size (32 for vit_demo_digits, upscaled for e.g. DeiT at 224)
        size = int(model.patch_embed.img_size[0]) if getattr(model, "patch_embed", None) is not None else 32
        return DemoDigits(split, augment=augment and split == "train", size=size)
    root = Path(data)
    if not root.exists():
        raise DataError(f"data path {root} does not exist (use --data demo for the embedded demo data)")
    if split == "test":
        return _image_folder(root, "val", model, training=False)
    if split == "calib":
        if (root / "calib").is_dir():
            return _image_folder(root, "calib", model, training=False)
        train = _image_folder(root, "train", model, training=False)
        pick = np.random.default_rng(0).permutation(len(train))[:CALIB_SUBSET]
        return Subset(train, sorted(pick.tolist()))
    return _image_folder(root, "train", model, training=augment)


def num_classes(data: str) -> int:
    if data == DEMO:
        return DemoDigits.num_classes
    dataset = build_dataset(data, "test")
    return len(dataset.classes)
