"""Fashion-MNIST (--data fashion): the idx reader on small generated files, splits, transforms, errors."""

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import spvit_search.data as data_module
from spvit_search.cli import main
from spvit_search.data import DataError, build_dataset, num_classes, read_idx
from spvit_search.models import build_model, create_model
from spvit_search.train import evaluate


def write_idx(folder: Path, stem: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    with gzip.open(folder / f"{stem}-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{stem}-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


@pytest.fixture()
def fashion_dir(tmp_path) -> Path:
    """A Fashion-MNIST-shaped folder: 50 training and 20 test images whose pixels encode their index."""
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    train[:, 0, 0] = np.arange(50)  # the index, to check that splits are disjoint
    write_idx(tmp_path / "fmnist", "train", train, np.arange(50) % 10)
    write_idx(tmp_path / "fmnist", "t10k", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10)
    return tmp_path / "fmnist"


def test_reader_returns_the_written_arrays(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    write_idx(tmp_path, "train", images, labels)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz", "images"), images)
    assert np.array_equal(read_idx(tmp_path / "train-labels-idx1-ubyte.gz", "labels"), labels)


def test_splits_are_fixed_disjoint_and_fit_the_model(fashion_dir):
    model = create_model("vit_demo_fashion")
    splits = {s: build_dataset(str(fashion_dir), s, model) for s in ("train", "calib", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 40, "calib": 10, "test": 20}
    image, label = splits["train"][0]
    assert image.shape == (1, 32, 32) and label.dtype == torch.int64
    background = -data_module.FASHION_MEAN / data_module.FASHION_STD
    assert torch.allclose(image[:, :2], torch.full_like(image[:, :2], background))  # 28 -> 32: padded border

    def pixel_ids(ds):  # pixel (0, 0) of the 28×28 image holds its index
        return {round(float(ds.images[i, 0, 2, 2] * data_module.FASHION_STD + data_module.FASHION_MEAN) * 255)
                for i in range(len(ds))}  # fmt: skip

    assert not pixel_ids(splits["train"]) & pixel_ids(splits["calib"])
    assert pixel_ids(splits["train"]) | pixel_ids(splits["calib"]) == set(range(50))
    assert torch.equal(build_dataset(str(fashion_dir), "calib", model).images, splits["calib"].images)
    # a model of another input size and channel count gets images that fit it
    deit_like = create_model("vit_demo_digits", img_size=48, patch_size=4)
    assert build_dataset(str(fashion_dir), "test", deit_like)[3][0].shape == (3, 48, 48)
    augmented = build_dataset(str(fashion_dir), "train", model, augment=True)
    assert any(not torch.equal(augmented[i][0], splits["train"][i][0]) for i in range(10))
    assert num_classes(str(fashion_dir)) == 10


def test_bad_files_and_a_missing_package_say_what_to_do(fashion_dir, tmp_path, monkeypatch):
    (fashion_dir / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 20))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: not an idx images file"):
        build_dataset(str(fashion_dir), "test")
    with gzip.open(fashion_dir / "t10k-images-idx3-ubyte.gz", "wb") as fh:  # header promises more than it holds
        fh.write(struct.pack(">IIII", 2051, 20, 28, 28) + b"\x00" * 100)
    with pytest.raises(DataError, match=r"header says \(20, 28, 28\) but holds 100 bytes"):
        build_dataset(str(fashion_dir), "test")
    write_idx(fashion_dir, "t10k", np.zeros((20, 28, 28), np.uint8), np.zeros(20, np.uint8))
    assert len(build_dataset(str(fashion_dir), "test")) == 20
    (fashion_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"has no t10k-labels-idx1-ubyte\.gz"):
        build_dataset(str(fashion_dir), "test")

    monkeypatch.setattr(data_module, "FASHION_DIR", tmp_path / "not-installed")
    with pytest.raises(DataError, match=r"install Debian's package dataset-fashion-mnist"):
        build_dataset("fashion", "train")
    out = CliRunner().invoke(main, ["train", "--model", "vit_demo_fashion", "--data", "fashion", "--epochs", "1",
                                    "--out", str(tmp_path / "run")])  # fmt: skip
    assert out.exit_code == 2 and "dataset-fashion-mnist" in out.output


def test_fashion_trains_through_the_cli(fashion_dir, tmp_path):
    args = ["train", "--model", "vit_demo_fashion", "--data", str(fashion_dir), "--epochs", "1", "--batch-size", "16",
            "--train-subset", "32", "--out", str(tmp_path / "r")]  # fmt: skip
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "test top-1" in out.output
    rows = (tmp_path / "r" / "steps.csv").read_text().splitlines()
    assert len(rows) == 1 + 32 // 16  # the subset, not the 40 training images
    too_small = CliRunner().invoke(main, [*args[:-2], "--train-subset", "8", "--out", str(tmp_path / "r2")])
    assert too_small.exit_code == 2 and "--train-subset 8 makes no batch of 16" in too_small.output
    # a harness that evaluates the weights itself skips the test split (benchmarks/accuracy.py run_cli)
    skipped = CliRunner().invoke(main, [*args[:-2], "--out", str(tmp_path / "r3"), "--no-final-test"])
    assert skipped.exit_code == 0, skipped.output
    assert "test top-1" not in skipped.output and "test split not evaluated (--no-final-test" in skipped.output
    assert (tmp_path / "r3" / "model.pt").exists()


def test_the_installed_package_reads_as_documented():  # scripts/setup.sh installs dataset-fashion-mnist
    model = create_model("vit_demo_fashion")
    sizes = {s: len(build_dataset("fashion", s, model)) for s in ("train", "calib", "test")}
    assert sizes == {"train": 58000, "calib": 2000, "test": 10000}


def test_the_shipped_teacher_is_the_one_its_sidecar_describes():
    """benchmarks/checkpoints: the sha256 and the test top-1 written beside the checkpoint come back."""
    shipped = Path(__file__).parents[1] / "benchmarks" / "checkpoints" / "vit_demo_fashion.pt"
    meta = json.loads(shipped.with_suffix(".json").read_text())
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == meta["sha256"]
    assert shipped.stat().st_size == meta["bytes"] < 5_000_000
    model = build_model(meta["model"], shipped).eval()
    top1, _ = evaluate(model, build_dataset("fashion", "test", model), torch.device("cpu"))
    assert top1 == pytest.approx(meta["test_top1"], abs=0.01)
