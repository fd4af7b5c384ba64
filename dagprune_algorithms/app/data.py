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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from dagprune_algorithms.app.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "DataError",
    "DatasetSplit",
    "load_dataset",
    "load_digits_dataset",
    "load_idx_dataset",
    "load_image_folder_dataset",
    "make_loaders",
    "read_idx",
]


@dataclass
class DatasetSplit:
    """A train/validation pair of data sets plus what a model needs to know about them.

    Attributes:
        train: Training samples, each an ``(image, label)`` pair.
        val: Validation samples, each an ``(image, label)`` pair.
        num_classes: Number of classes; labels are in ``range(num_classes)``.
        input_shape: Shape ``(C, H, W)`` of one image tensor.
        name: Short human-readable description of the source.
        class_names: Name of each class, indexed by label.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: Tuple[int, int, int]
    name: str
    class_names: Tuple[str, ...] = ()


# --------------------------------------------------------------------------- helpers


def _split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split sample indices into train and validation parts, stratified where possible.

    Args:
        labels: Integer label of every sample.
        val_fraction: Fraction of samples that go to validation, in (0, 1).
        seed: Seed that makes the split reproducible.

    Returns:
        Sorted train indices and sorted validation indices.

    Raises:
        ValueError: If ``val_fraction`` is outside (0, 1) or the data set is too small to split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    n = len(labels)
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(
            f"cannot split {n} samples with val_fraction={val_fraction}: "
            "both parts need at least one sample"
        )
    _, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2 or min(n_val, n - n_val) < len(counts):
        # Too few samples per class to stratify: fall back to a plain seeded shuffle.
        order = np.random.default_rng(seed).permutation(n)
        return np.sort(order[n_val:]), np.sort(order[:n_val])
    train_idx, val_idx = train_test_split(
        np.arange(n), test_size=n_val, random_state=seed, stratify=labels
    )
    return np.sort(train_idx), np.sort(val_idx)


def _subsample(dataset: Dataset, limit: Optional[int], seed: int) -> Dataset:
    """Return a deterministic random subset of at most ``limit`` samples (or ``dataset`` itself)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"sample limits must be positive, got {limit}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:limit])
    return Subset(dataset, idx.tolist())


def _grayscale_to_tensor(
    images: np.ndarray, image_size: int, mean: Optional[float] = None, std: Optional[float] = None
) -> Tuple[torch.Tensor, float, float]:
    """Resize grayscale images, normalise them and replicate them to three channels.

    Args:
        images: Array ``(N, H, W)`` with values already scaled to [0, 1].
        image_size: Output height and width.
        mean: Normalisation mean; computed from ``images`` when None.
        std: Normalisation standard deviation; computed from ``images`` when None.

    Returns:
        Tensor ``(N, 3, image_size, image_size)`` (channels share memory), and the mean and
        std that were used.
    """
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    if x.shape[-2:] != (image_size, image_size):
        shrink = image_size < max(x.shape[-2:])
        # Resize in chunks so that full MNIST does not need a huge temporary buffer.
        x = torch.cat(
            [
                F.interpolate(
                    chunk, size=(image_size, image_size), mode="bilinear",
                    align_corners=False, antialias=shrink,
                )
                for chunk in x.split(4096)
            ]
        )
    if mean is None or std is None:
        mean, std = float(x.mean()), float(x.std())
    x = (x - mean) / max(std, 1e-8)
    # A stride-0 view: three identical channels at the memory cost of one.
    return x.expand(-1, 3, -1, -1), mean, std


def _check_directory(directory: PathLike) -> Path:
    """Check that ``directory`` exists, is a readable directory and is not empty.

    Args:
        directory: Path to check.

    Returns:
        The directory as a :class:`Path`.

    Raises:
        DataError: If any of the checks fails.
    """
    path = Path(directory).expanduser()
    if not path.exists():
        raise DataError(
            f"data directory '{path}' does not exist; check the path, or leave --data-dir out "
            "to use the built-in scikit-learn digits data set"
        )
    if not path.is_dir():
        raise DataError(
            f"data path '{path}' is not a directory; pass a folder that holds MNIST IDX files "
            "or one subfolder of images per class"
        )
    try:
        entries = list(path.iterdir())
    except OSError as exc:  # PermissionError and friends
        raise DataError(
            f"data directory '{path}' cannot be read ({exc.strerror or exc}); "
            "check its permissions"
        ) from exc
    if not entries:
        raise DataError(
            f"data directory '{path}' is empty; put MNIST IDX files or one subfolder of "
            "images per class in it"
        )
    return path


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
    train_idx, val_idx = _split_indices(labels, val_fraction, seed)

    x_train, mean, std = _grayscale_to_tensor(images[train_idx], image_size)
    x_val, _, _ = _grayscale_to_tensor(images[val_idx], image_size, mean, std)
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
    root = _check_directory(directory)
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
    x_train, mean, std = _grayscale_to_tensor(train_images.astype(np.float32) / scale, image_size)
    x_val, _, _ = _grayscale_to_tensor(val_images.astype(np.float32) / scale, image_size, mean, std)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    return DatasetSplit(
        train=TensorDataset(x_train, torch.from_numpy(train_labels)),
        val=TensorDataset(x_val, torch.from_numpy(val_labels)),
        num_classes=num_classes,
        input_shape=(3, image_size, image_size),
        name=f"idx:{root.name}",
        class_names=tuple(str(i) for i in range(num_classes)),
    )


# --------------------------------------------------------------------------- image folder


def _image_class_names(root: Path, extensions) -> list:
    """Names of the class subfolders of ``root`` holding images with ``extensions`` (at least two)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"image folder '{root}' has no class subfolders; arrange the images as "
            f"'{root}/<class_name>/<image>.png', one subfolder per class"
        )
    counts = {}
    for class_dir in class_dirs:
        try:
            counts[class_dir.name] = sum(
                1 for f in class_dir.iterdir() if f.is_file() and f.suffix.lower() in extensions
            )
        except OSError as exc:
            raise DataError(
                f"class folder '{class_dir}' cannot be read ({exc.strerror or exc}); "
                "check its permissions"
            ) from exc
    class_names = [name for name, count in counts.items() if count > 0]
    if not class_names:
        raise DataError(
            f"no images found in the class subfolders of '{root}' "
            f"({', '.join(sorted(counts))}); supported extensions are "
            f"{', '.join(sorted(extensions))}"
        )
    if len(class_names) < 2:
        raise DataError(
            f"image folder '{root}' has images for only one class ('{class_names[0]}'); "
            "a classifier needs at least two class subfolders with images"
        )
    return class_names


def load_image_folder_dataset(
    directory: PathLike,
    image_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    augment: bool = False,
) -> DatasetSplit:
    """Load an image folder with one subfolder of images per class through timm.

    Images must sit directly inside their class subfolder (``directory/<class>/<file>``)
    and have an extension timm recognises (``.png``, ``.jpg``, ``.jpeg``). They are read as
    RGB, resized to ``image_size`` and normalised with ImageNet statistics by a
    ``timm.data.create_transform`` pipeline. The split is stratified and depends only on
    ``seed``.

    Args:
        directory: The root folder.
        image_size: Height and width of the returned images.
        val_fraction: Fraction of the images used for validation.
        seed: Seed for the train/validation split.
        augment: Apply timm's random training augmentation to the training part.

    Returns:
        A :class:`DatasetSplit` of ``Subset`` views over ``timm.data.ImageDataset`` objects.

    Raises:
        DataError: If the directory is missing, unreadable or empty, has no class
            subfolders, fewer than two of them contain images, or there are too few
            images to split.
        ValueError: If ``image_size`` or ``val_fraction`` is out of range.
    """
    from timm.data import ImageDataset, create_transform
    from timm.data.readers.img_extensions import get_img_extensions

    root = _check_directory(directory)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    class_names = _image_class_names(root, get_img_extensions(as_set=True))
    class_map = {name: idx for idx, name in enumerate(class_names)}

    def make(is_training: bool) -> Dataset:
        transform = create_transform(
            (3, image_size, image_size), is_training=is_training,
            interpolation="bilinear", crop_pct=1.0, crop_mode="squash",
        )
        return ImageDataset(str(root), class_map=class_map, transform=transform)

    val_set = make(False)
    train_set = make(True) if augment else val_set
    labels = np.array([target for _, target in val_set.reader.samples], dtype=np.int64)
    try:
        train_idx, val_idx = _split_indices(labels, val_fraction, seed)
    except ValueError as exc:
        raise DataError(
            f"image folder '{root}' has too few images to split ({exc}); add more images "
            "or change val_fraction"
        ) from exc
    return DatasetSplit(
        train=Subset(train_set, train_idx.tolist()),
        val=Subset(val_set, val_idx.tolist()),
        num_classes=len(class_names),
        input_shape=(3, image_size, image_size),
        name=f"folder:{root.name}",
        class_names=tuple(class_names),
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
        root = _check_directory(data_dir)
        if _has_idx_files(root):
            return load_idx_dataset(
                root, image_size=image_size, limit_train=limit_train, limit_val=limit_val, seed=seed
            )
        split = load_image_folder_dataset(
            root, image_size=image_size, val_fraction=val_fraction, seed=seed
        )
    split.train = _subsample(split.train, limit_train, seed)
    split.val = _subsample(split.val, limit_val, seed + 1)
    return split


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
