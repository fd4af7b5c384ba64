"""Tests for the data loaders, latency measurement and reporting helpers."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dagprune.errors import DagpruneError
from dagprune_algorithms.app.data import (
    DataError,
    DatasetSplit,
    load_dataset,
    load_digits_dataset,
    load_idx_dataset,
    load_image_folder_dataset,
    make_loaders,
    read_idx,
)
from dagprune_algorithms.app.latency import LatencyResult, measure_latency
from dagprune_algorithms.app.report import (
    format_comparison_table,
    plot_training_history,
    write_json_report,
)

MNIST_DIR = Path("/work/shared/data/mnist")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an unsigned-byte array in the IDX format."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(directory: Path, n_train=20, n_val=10, size=6, gz=False, seed=0) -> dict:
    """Write a tiny MNIST-like IDX data set; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 3,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_val, dtype=np.uint8) % 3,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


def write_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=10, size=12) -> None:
    """Write a small image folder with one subfolder of PNG files per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_normalisation():
    split = load_digits_dataset(image_size=16)
    assert isinstance(split, DatasetSplit)
    assert split.num_classes == 10
    assert split.input_shape == (3, 16, 16)
    assert len(split.train) + len(split.val) == 1797
    assert len(split.val) == round(1797 * 0.2)
    x, y = split.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    train_x = split.train.tensors[0]
    assert torch.equal(train_x[:, 0], train_x[:, 2])  # replicated channels
    assert abs(float(train_x.mean())) < 1e-4
    assert abs(float(train_x.std()) - 1.0) < 1e-3


def test_digits_split_is_stratified():
    split = load_digits_dataset(val_fraction=0.2)
    train_counts = np.bincount(split.train.tensors[1].numpy(), minlength=10)
    val_counts = np.bincount(split.val.tensors[1].numpy(), minlength=10)
    total = train_counts + val_counts
    assert np.all(np.abs(val_counts - 0.2 * total) <= 1)


def test_digits_split_is_deterministic():
    a, b = load_digits_dataset(seed=3), load_digits_dataset(seed=3)
    c = load_digits_dataset(seed=4)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])


def test_make_loaders_shuffling_is_reproducible():
    split = load_digits_dataset(image_size=8)
    first = [y for _, y in make_loaders(split, batch_size=64, seed=7)[0]]
    second = [y for _, y in make_loaders(split, batch_size=64, seed=7)[0]]
    other = [y for _, y in make_loaders(split, batch_size=64, seed=8)[0]]
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    assert not torch.equal(first[0], other[0])
    _, val_loader = make_loaders(split, batch_size=100, seed=7)
    assert torch.equal(torch.cat([y for _, y in val_loader]), split.val.tensors[1])


def test_load_dataset_default_is_digits_with_limits():
    split = load_dataset(None, image_size=8, limit_train=100, limit_val=50)
    assert split.name == "sklearn-digits"
    assert (len(split.train), len(split.val)) == (100, 50)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    arrays = write_idx_dir(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    images = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    np.testing.assert_array_equal(images, arrays["train-images-idx3-ubyte"])

    split = load_dataset(tmp_path, image_size=8)
    assert split.name.startswith("idx:")
    assert split.num_classes == 3
    assert split.input_shape == (3, 8, 8)
    assert (len(split.train), len(split.val)) == (20, 10)
    np.testing.assert_array_equal(split.train.tensors[1].numpy(), arrays["train-labels-idx1-ubyte"])


def test_idx_non_ubyte_types(tmp_path):
    values = np.array([[1.5, -2.0], [3.0, 4.25]], dtype=">f4")
    header = struct.pack(">BBBB", 0, 0, 0x0D, 2) + struct.pack(">2I", 2, 2)
    (tmp_path / "floats").write_bytes(header + values.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "floats"), values.astype(np.float32))


def test_idx_limits_are_deterministic(tmp_path):
    write_idx_dir(tmp_path, n_train=50, n_val=30)
    a = load_idx_dataset(tmp_path, image_size=6, limit_train=12, limit_val=5, seed=1)
    b = load_idx_dataset(tmp_path, image_size=6, limit_train=12, limit_val=5, seed=1)
    assert (len(a.train), len(a.val)) == (12, 5)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="real MNIST not available")
def test_real_mnist():
    labels = read_idx(next(MNIST_DIR.glob("train-labels-idx1-ubyte*")))
    assert labels.shape == (60000,)
    images = read_idx(next(MNIST_DIR.glob("t10k-images-idx3-ubyte*")))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8

    split = load_dataset(MNIST_DIR, image_size=32, limit_train=2000, limit_val=500)
    assert split.num_classes == 10
    assert split.input_shape == (3, 32, 32)
    assert (len(split.train), len(split.val)) == (2000, 500)
    assert set(split.train.tensors[1].tolist()) == set(range(10))


# --------------------------------------------------------------------------- image folder


def test_image_folder(tmp_path):
    write_image_folder(tmp_path)
    split = load_dataset(tmp_path, image_size=16, val_fraction=0.2)
    assert split.class_names == ("cat", "dog", "fox")
    assert split.num_classes == 3 and split.input_shape == (3, 16, 16)
    assert (len(split.train), len(split.val)) == (24, 6)
    x, y = split.val[0]
    assert x.shape == (3, 16, 16) and 0 <= y < 3
    val_labels = [split.val[i][1] for i in range(len(split.val))]
    assert np.bincount(val_labels).tolist() == [2, 2, 2]
    again = load_image_folder_dataset(tmp_path, image_size=16, val_fraction=0.2)
    assert split.val.indices == again.val.indices
    xb, yb = next(iter(make_loaders(split, batch_size=4, seed=0)[0]))
    assert xb.shape == (4, 3, 16, 16)


# --------------------------------------------------------------------------- bad input


def test_error_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*check the path"):
        load_dataset(tmp_path / "nope")


def test_error_not_a_directory(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        load_dataset(path)


def test_error_empty_directory(tmp_path):
    with pytest.raises(DataError, match=r"is empty"):
        load_dataset(tmp_path)


def test_error_unreadable_directory(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    # Simulated, because chmod does not stop root (and tests may run as root).
    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DataError, match=r"cannot be read \(Permission denied\).*permissions"):
        load_dataset(locked)


def test_error_no_class_subfolders(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no class subfolders.*<class_name>"):
        load_dataset(tmp_path)


def test_error_no_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"no images found.*supported extensions"):
        load_dataset(tmp_path)


def test_error_single_class(tmp_path):
    write_image_folder(tmp_path, classes=("only",), per_class=3)
    with pytest.raises(DataError, match="only one class"):
        load_dataset(tmp_path)


def test_error_missing_idx_file(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*missing"):
        load_dataset(tmp_path)


def test_error_bad_magic(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(DataError, match=r"not an IDX file: bad magic number 0x12340803"):
        load_dataset(tmp_path)


def test_error_swapped_files(tmp_path):
    arrays = write_idx_dir(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(arrays["train-labels-idx1-ubyte"]))
    with pytest.raises(DataError, match=r"has 1 dimensions, expected 3"):
        load_dataset(tmp_path)


def test_error_truncated_data(tmp_path):
    write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"truncated or corrupt"):
        load_dataset(tmp_path)


def test_error_corrupt_gzip(tmp_path):
    write_idx_dir(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:12])
    with pytest.raises(DataError, match=r"cannot read IDX file"):
        load_dataset(tmp_path)


def test_error_mismatched_counts(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(19, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"holds 20 images but .* holds 19 labels"):
        load_dataset(tmp_path)


def test_data_error_is_value_error_and_a_dagprune_error():
    assert issubclass(DataError, ValueError) and issubclass(DataError, DagpruneError)
    assert DataError.__doc__


# --------------------------------------------------------------------------- latency


def test_latency_fields_and_restored_state():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.train()
    threads_before = torch.get_num_threads()
    result = measure_latency(model, (3, 16, 16), batch_size=2, num_threads=1, warmup=1, repeats=5)
    assert isinstance(result, LatencyResult)
    assert result.median_ms > 0 and result.p25_ms > 0 and result.p75_ms >= result.p25_ms
    assert result.iqr_ms >= 0
    assert result.num_threads == 1 and result.batch_size == 2 and result.repeats == 5
    assert result.device == "cpu"
    assert torch.get_num_threads() == threads_before
    assert model.training


def test_latency_rejects_bad_arguments():
    with pytest.raises(ValueError):
        measure_latency(nn.Identity(), (3, 4, 4), repeats=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_latency_cuda_model_moved_back():
    model = nn.Conv2d(3, 4, 3)
    result = measure_latency(model, (3, 16, 16), device="cuda", repeats=3)
    assert result.median_ms > 0 and result.device == "cuda"
    assert next(model.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------- report


def test_comparison_table_alignment():
    rows = [
        dict(model="resnet18", accuracy=0.98123, kmapp=12.3456, flops_proportion=1.0,
             params=11_200_000, latency_ms=3.25, latency_iqr_ms=0.1),
        dict(model="resnet18-pruned", accuracy=0.97, kmapp=6.1, flops_proportion=0.5,
             params=5_000_000, latency_ms=None),
    ]
    lines = format_comparison_table(rows).splitlines()
    assert len(lines) == 4
    for title in ("model", "accuracy %", "normalized FLOPs (kmapp)", "FLOPs proportion",
                  "params (M)", "latency ms"):
        assert title in lines[0]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert "98.12" in lines[2] and "12.35" in lines[2] and "11.200" in lines[2]
    assert "3.25 ± 0.10" in lines[2]
    assert lines[3].endswith("-")
    # Right-aligned numeric columns end at the same position in every line.
    end = lines[0].index("accuracy %") + len("accuracy %")
    assert lines[2][end - 5:end] == "98.12" and lines[3][end - 5:end] == "97.00"


def test_json_report_atomic(tmp_path):
    path = tmp_path / "out" / "report.json"
    report = {"accuracy": np.float32(0.5), "shape": (3, 32, 32), "tensor": torch.tensor([1, 2]),
              "path": tmp_path, "name": "ü"}
    write_json_report(path, report)
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert loaded == {"accuracy": 0.5, "shape": [3, 32, 32], "tensor": [1, 2],
                      "path": str(tmp_path), "name": "ü"}
    write_json_report(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 2}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_json_report_failure_keeps_old_file(tmp_path):
    path = tmp_path / "report.json"
    write_json_report(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json_report(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def make_history(n=20, with_accuracy=True):
    history = []
    for step in range(n):
        entry = dict(step=step, proportion=1.0 - 0.02 * step, task_loss=2.0 / (step + 1),
                     flops_loss=torch.tensor(0.1 * step), entropy_loss=0.05, bkd_loss=0.3)
        if with_accuracy and step % 5 == 4:
            entry["val_accuracy"] = 0.5 + 0.02 * step
        history.append(entry)
    return history


@pytest.mark.parametrize("with_accuracy", [True, False])
def test_plot_training_history_png(tmp_path, with_accuracy):
    path = tmp_path / "plots" / "history.png"
    plot_training_history(make_history(with_accuracy=with_accuracy), path, target=0.6)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["history.png"]


def test_plot_training_history_rejects_bad_history(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_training_history([], tmp_path / "h.png")
    with pytest.raises(ValueError, match="lacks proportion"):
        plot_training_history([{"step": 0}], tmp_path / "h.png")
    assert not list(tmp_path.iterdir())
