"""Datasets: the embedded demo data, and ImageFolder trees for real data.

``--data demo``: scikit-learn's 1,797 handwritten digits (8×8, installed with the package, no
download), upscaled to 32×32 RGB, with fixed train / calib / test splits (1,197 / 200 / 400,
seed 0). ``--data PATH``: an ImageFolder tree ``PATH/train/<class>/…`` and ``PATH/val/<class>/…``
read with timm's transforms for the model; the calibration split is ``PATH/calib`` if it
exists, else a fixed 256-image subset of ``train``. ``--data fashion``: Fashion-MNIST as
Debian's ``dataset-fashion-mnist`` ships it (``--data DIR`` for a folder holding the same idx
files): 28×28 grayscale padded to 32×32, fixed splits train 58,000 / calib 2,000 (carved from
the 60,000 training images, seed 0) / test 10,000.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from .errors import SpvitError
from .models import input_shape

DEMO = "demo"
SPLITS = ("train", "calib", "test")
DEMO_SIZES = {"train": 1197, "calib": 200, "test": 400}
CALIB_SUBSET = 256
FASHION = "fashion"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_APT = "dataset-fashion-mnist"
FASHION_FILES = {"train": "train", "test": "t10k"}
FASHION_CALIB = 2000
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")  # fmt: skip
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # of the 60,000 training images, in [0, 1]


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


def read_idx(path: Path, kind: str) -> np.ndarray:
    """An idx file (gzip'd or plain): ``kind`` "images" -> (n, rows, cols) uint8, "labels" -> (n,) uint8."""
    magic, dims = {"images": (2051, 3), "labels": (2049, 1)}[kind]
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    header = 4 + 4 * dims
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path}: not an idx {kind} file (expected magic {magic} and a {header}-byte header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    if root == FASHION_DIR:
        raise DataError(f"Fashion-MNIST is not installed ({root}/{stem}.gz is missing): install Debian's package "
                        f"{FASHION_APT} (apt-get install {FASHION_APT}, or bash scripts/setup.sh), or give "
                        "--data DIR with the idx files")  # fmt: skip
    raise DataError(f"{root} has no {stem}.gz: expected Fashion-MNIST's idx files "
                    "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz there")  # fmt: skip


class FashionMNIST(Dataset):
    """One split of Fashion-MNIST as normalised tensors at the model's input size and channels.

    28×28 images are padded to 32×32 with the background value (so 4×4 patches tile them), then
    resized if the model expects another size. Training adds a random shift of up to 2 pixels
    and a horizontal flip (garments are mirror-symmetric; flips do not change a class).
    """

    num_classes = 10
    classes = FASHION_CLASSES

    def __init__(self, root: Path, split: str, augment: bool = False, size: int = 32, channels: int = 1) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; splits are {SPLITS}")
        stem = FASHION_FILES["test" if split == "test" else "train"]
        images = read_idx(_idx_file(root, f"{stem}-images-idx3-ubyte"), "images")
        labels = read_idx(_idx_file(root, f"{stem}-labels-idx1-ubyte"), "labels")
        if len(images) != len(labels):
            raise DataError(f"{root}: {len(images)} {stem} images but {len(labels)} labels")
        if split != "test":
            order = np.random.default_rng(0).permutation(len(labels))
            calib = min(FASHION_CALIB, len(labels) // 5)
            index = np.sort(order[:calib] if split == "calib" else order[calib:])
            images, labels = images[index], labels[index]
        x = torch.from_numpy(images.copy()).float().unsqueeze(1) / 255.0
        x = F.pad((x - FASHION_MEAN) / FASHION_STD, (2, 2, 2, 2), value=-FASHION_MEAN / FASHION_STD)
        self.images = x
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.augment, self.size, self.channels = augment, size, channels
        self.background = -FASHION_MEAN / FASHION_STD

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.augment:
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            image = torch.roll(F.pad(image, (2, 2, 2, 2), value=self.background), (dy, dx), dims=(1, 2))[:, 2:-2, 2:-2]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        if self.size != image.shape[-1]:
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        return image.expand(self.channels, -1, -1), self.labels[i]


def _is_idx_folder(root: Path) -> bool:
    return root.is_dir() and any((root / f"train-images-idx3-ubyte{ext}").is_file() for ext in (".gz", ""))


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
    shape = input_shape(model) if model is not None else None
    size = shape[1] if shape is not None else 32  # e.g. upscaled for DeiT at 224
    if data == DEMO:
        return DemoDigits(split, augment=augment and split == "train", size=size)
    root = Path(data)
    if data == FASHION or _is_idx_folder(root):
        channels = shape[0] if shape is not None else 1
        return FashionMNIST(FASHION_DIR if data == FASHION else root, split, augment and split == "train", size,
                            channels)  # fmt: skip
    if not root.exists():
        raise DataError(f"data path {root} does not exist (use --data demo for the embedded demo data, "
                        "--data fashion for Fashion-MNIST)")  # fmt: skip
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
    if data == FASHION or _is_idx_folder(Path(data)):
        return FashionMNIST.num_classes
    dataset = build_dataset(data, "test")
    return len(dataset.classes)
