"""Offline data sets for training, pruning and fine-tuning small image classifiers.

Three sources are supported, none of which needs network access:

* the 8x8 handwritten digits that ship inside scikit-learn (the default),
* a folder of MNIST-style IDX files (``train-images-idx3-ubyte[.gz]`` etc.),
* an image folder with one subfolder per class, read through timm.

Every loader returns a :class:`DatasetSplit` whose samples are ``(image, label)``
pairs, with ``image`` a float tensor of shape ``input_shape``.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from dagprune_algorithms.app.dataset_split import (DatasetSplit, PathLike, check_directory, grayscale_to_tensor,
                                                   split_indices, subsample)
from dagprune_algorithms.app.errors import DataError
from dagprune_algorithms.app.image_folder import load_image_folder_dataset

__all__ = [
    "DataError",
    "DatasetSplit",
    "count_samples",
    "load_dataset",
    "load_digits_dataset",
    "load_idx_dataset",
    "load_image_folder_dataset",
    "make_loaders",
    "read_idx",
]


# --------------------------------------------------------------------------- digits


def load_digits_dataset(image_size: int = 32, seed: int = 0, val_fraction: float = 0.2) -> DatasetSplit:
    """Load scikit-learn's bundled 8x8 handwritten digits as a 3-channel image data set.

    Pixel values are scaled to [0, 1], images are resized with bilinear interpolation,
    normalised with the mean and standard deviation of the training part, and replicated
    to three channels. The train/validation split is stratified and depends only on ``seed``.

    Args:
        image_size: Height and width of the returned images.
        seed: Seed for the train/validation split.
        val_fraction: Fraction of the 1797 images used for validation.

    Returns:
        A :class:`DatasetSplit` of ``TensorDataset`` objects with 10 classes.

    Raises:
        ValueError: If ``image_size`` is not positive or ``val_fraction`` is outside (0, 1).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    train_idx, val_idx = split_indices(labels, val_fraction, seed)

    x_train, mean, std = grayscale_to_tensor(images[train_idx], image_size)
    x_val, _, _ = grayscale_to_tensor(images[val_idx], image_size, mean, std)
    return DatasetSplit(
        train=TensorDataset(x_train, torch.from_numpy(labels[train_idx])),
        val=TensorDataset(x_val, torch.from_numpy(labels[val_idx])),
        num_classes=10,
        input_shape=(3, image_size, image_size),
        name="sklearn-digits",
        class_names=tuple(str(i) for i in range(10)),
    )


# --------------------------------------------------------------------------- IDX (MNIST)

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_IDX_PARTS = {
    "train_images": ("train-images", "idx3-ubyte"),
    "train_labels": ("train-labels", "idx1-ubyte"),
    "val_images": ("t10k-images", "idx3-ubyte"),
    "val_labels": ("t10k-labels", "idx1-ubyte"),
}


def _hex_magic(raw: bytes) -> str:
    """Format the first four bytes of a file for an error message."""
    return f"0x{raw[:4].hex()}" if raw else "(empty file)"


def read_idx(path: PathLike, expected_ndim: Optional[int] = None) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array.

    The header is a 4-byte magic number (two zero bytes, a type code, the number of
    dimensions), then one big-endian uint32 per dimension, then the data in big-endian
    order. Gzip compression is detected from the file content, not its name.

    Args:
        path: The IDX file.
        expected_ndim: If given, the number of dimensions the file must have.

    Returns:
        The array, with the shape recorded in the header and a native byte order.

    Raises:
        DataError: If the file cannot be read or decompressed, the magic number or the
            number of dimensions is wrong, or the data size does not match the header.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(
            f"cannot read IDX file '{path}' ({exc}); the file may be truncated or not "
            "gzip data, download it again"
        ) from exc

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"'{path}' is not an IDX file: bad magic number {_hex_magic(raw)}; "
            "expected 00 00 <type> <ndim>, e.g. 0x00000803 for images. "
            "Replace it with an intact copy"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(
            f"IDX file '{path}' has {ndim} dimensions, expected {expected_ndim} "
            f"(magic number {_hex_magic(raw)}); check that the images and labels files are "
            "not swapped or renamed"
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"IDX file '{path}' is truncated inside its header; download it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual_bytes = len(raw) - header_size
    if actual_bytes != expected_bytes:
        raise DataError(
            f"IDX file '{path}' holds {actual_bytes} bytes of data but its header "
            f"(shape {shape}, {dtype.itemsize}-byte values) needs {expected_bytes}; the file is "
            "truncated or corrupt, download it again"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_idx_file(directory: Path, stem: str, suffix: str) -> Optional[Path]:
    """Return the IDX file ``<stem>-<suffix>`` (or ``<stem>.<suffix>``, maybe ``.gz``) if present."""
    for sep in ("-", "."):
        for ext in ("", ".gz"):
            candidate = directory / f"{stem}{sep}{suffix}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _has_idx_files(directory: Path) -> bool:
    """Whether ``directory`` contains at least one of the standard MNIST IDX files."""
    return any(_find_idx_file(directory, stem, suffix) for stem, suffix in _IDX_PARTS.values())


def _read_idx_part(files: dict, part: str, limit: Optional[int], seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """The images and int64 labels of ``part`` ("train" or "val"), at most ``limit`` of them."""
    images = read_idx(files[f"{part}_images"], expected_ndim=3)
    labels = read_idx(files[f"{part}_labels"], expected_ndim=1)
    if len(images) != len(labels):
        raise DataError(
            f"'{files[f'{part}_images']}' holds {len(images)} images but "
            f"'{files[f'{part}_labels']}' holds {len(labels)} labels; the files do not belong "
            "together, replace them with a matching pair"
        )
    if len(images) == 0:
        raise DataError(f"IDX file '{files[f'{part}_images']}' holds no images; replace it")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit_{part} must be positive, got {limit}")
        keep = np.sort(np.random.default_rng(seed).permutation(len(images))[:limit])
        images, labels = images[keep], labels[keep]
    return images, labels.astype(np.int64)


def load_idx_dataset(
    directory: PathLike,
    image_size: int = 32,
    limit_train: Optional[int] = None,
    limit_val: Optional[int] = None,
    seed: int = 0,
) -> DatasetSplit:
    """Load an MNIST-style data set from the four standard IDX files in ``directory``.

    The ``train-*`` files become the training part and the ``t10k-*`` files the validation
    part. Files may be gzip-compressed. Images are scaled to [0, 1], resized with bilinear
    interpolation, normalised with the training mean and standard deviation, and
    replicated to three channels.

    Args:
        directory: Folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
        image_size: Height and width of the returned images.
        limit_train: If given, keep only this many training samples (a seeded random subset).
        limit_val: If given, keep only this many validation samples (a seeded random subset).
        seed: Seed for the subsets.

    Returns:
        A :class:`DatasetSplit` of ``TensorDataset`` objects.

    Raises:
        DataError: If the directory or a file is missing or unreadable, a header is corrupt,
            or the image and label counts (or image sizes) do not match.
    """
    root = check_directory(directory)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    files = {}
    for key, (stem, suffix) in _IDX_PARTS.items():
        found = _find_idx_file(root, stem, suffix)
        if found is None:
            raise DataError(
                f"IDX file '{stem}-{suffix}[.gz]' is missing from '{root}'; an IDX data directory "
                "needs train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
                "and t10k-labels-idx1-ubyte (each optionally gzipped)"
            )
        files[key] = found

    train_images, train_labels = _read_idx_part(files, "train", limit_train, seed)
    val_images, val_labels = _read_idx_part(files, "val", limit_val, seed + 1)
    if train_images.shape[1:] != val_images.shape[1:]:
        raise DataError(
            f"training images in '{files['train_images']}' are {train_images.shape[1:]} but "
            f"validation images in '{files['val_images']}' are {val_images.shape[1:]}; "
            "use files from the same data set"
        )
    if min(train_labels.min(), val_labels.min()) < 0:
        raise DataError(f"IDX label files in '{root}' contain negative labels; replace them")

    # Scale integer images to [0, 1] by their type's maximum; float images are used as they are.
    scale = float(np.iinfo(train_images.dtype).max) if train_images.dtype.kind in "ui" else 1.0
    x_train, mean, std = grayscale_to_tensor(train_images.astype(np.float32) / scale, image_size)
    x_val, _, _ = grayscale_to_tensor(val_images.astype(np.float32) / scale, image_size, mean, std)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    return DatasetSplit(
        train=TensorDataset(x_train, torch.from_numpy(train_labels)),
        val=TensorDataset(x_val, torch.from_numpy(val_labels)),
        num_classes=num_classes,
        input_shape=(3, image_size, image_size),
        name=f"idx:{root.name}",
        class_names=tuple(str(i) for i in range(num_classes)),
    )


# --------------------------------------------------------------------------- dispatch / loaders


def load_dataset(
    data_dir: Optional[PathLike] = None,
    image_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    limit_train: Optional[int] = None,
    limit_val: Optional[int] = None,
) -> DatasetSplit:
    """Load a data set, choosing the reader from what ``data_dir`` holds.

    ``None`` gives the scikit-learn digits; a folder with MNIST IDX files is read as IDX;
    any other folder is read as an image folder with one subfolder per class.

    Args:
        data_dir: Data directory, or None for the built-in digits.
        image_size: Height and width of the returned images.
        val_fraction: Validation fraction for sources without a predefined split
            (ignored for IDX, whose ``t10k`` files are the validation part).
        seed: Seed for the split and for the subsets.
        limit_train: If given, keep at most this many training samples (seeded subset).
        limit_val: If given, keep at most this many validation samples (seeded subset).

    Returns:
        The loaded :class:`DatasetSplit`.

    Raises:
        DataError: If ``data_dir`` is missing, unreadable, empty, or its contents cannot
            be understood.
    """
    if data_dir is None:
        split = load_digits_dataset(image_size=image_size, seed=seed, val_fraction=val_fraction)
    else:
        root = check_directory(data_dir)
        if _has_idx_files(root):
            return load_idx_dataset(
                root, image_size=image_size, limit_train=limit_train, limit_val=limit_val, seed=seed
            )
        split = load_image_folder_dataset(
            root, image_size=image_size, val_fraction=val_fraction, seed=seed
        )
    split.train = subsample(split.train, limit_train, seed)
    split.val = subsample(split.val, limit_val, seed + 1)
    return split


def count_samples(data_dir: Optional[PathLike] = None) -> Tuple[int, bool]:
    """How many images ``load_dataset(data_dir)`` reads, without reading them.

    Returns:
        ``(count, resized_before_limits)``: the number of images (train and validation), and
        whether the reader resizes all of them before applying ``limit_train``/``limit_val``
        (the built-in digits) rather than after (IDX files, image folders). 0 when the count
        cannot be told; :func:`load_dataset` then reports the problem.

    Raises:
        DataError: ``data_dir`` is missing, not a directory, unreadable or empty.
    """
    if data_dir is None:
        return len(load_digits().target), True
    root = check_directory(data_dir)
    if _has_idx_files(root):
        image_files = (_find_idx_file(root, *_IDX_PARTS[part]) for part in ("train_images", "val_images"))
        return sum(map(_idx_length, image_files)), False
    from timm.data.readers.img_extensions import get_img_extensions

    extensions = get_img_extensions(as_set=True)
    return sum(1 for folder in root.iterdir() if folder.is_dir() and not folder.name.startswith(".")
               for path in folder.iterdir() if path.suffix.lower() in extensions), False


def _idx_length(path: Optional[Path]) -> int:
    """The first dimension an IDX file's header declares (0 if it cannot be read)."""
    if path is None:
        return 0
    try:
        with open(path, "rb") as file:
            gzipped = file.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as file:
            header = file.read(8)
    except (OSError, EOFError):
        return 0
    return int.from_bytes(header[4:8], "big") if len(header) == 8 else 0


def make_loaders(
    split: DatasetSplit, batch_size: int, seed: int, num_workers: int = 0
) -> Tuple[DataLoader, DataLoader]:
    """Build reproducible data loaders for a split.

    The training loader shuffles with a generator seeded by ``seed``, so two loaders
    built with the same seed yield the same batches in the same order; the validation
    loader does not shuffle.

    Args:
        split: The data set split.
        batch_size: Samples per batch.
        seed: Seed for the shuffling order (and the worker seeds).
        num_workers: Worker processes per loader; 0 loads in the main process.

    Returns:
        ``(train_loader, val_loader)``.

    Raises:
        ValueError: If ``batch_size`` is not positive.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    train_loader = DataLoader(
        split.train, batch_size=batch_size, shuffle=True, generator=generator,
        num_workers=num_workers,
    )
    val_loader = DataLoader(split.val, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, val_loader
