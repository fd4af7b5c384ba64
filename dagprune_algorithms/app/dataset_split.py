"""The :class:`DatasetSplit` every data reader of the app returns, and the helpers the readers
share: splitting, subsampling, grayscale conversion and directory checks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset

from dagprune_algorithms.app.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["DatasetSplit", "split_indices", "subsample", "grayscale_to_tensor", "check_directory"]


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


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
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


def subsample(dataset: Dataset, limit: Optional[int], seed: int) -> Dataset:
    """Return a deterministic random subset of at most ``limit`` samples (or ``dataset`` itself)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"sample limits must be positive, got {limit}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:limit])
    return Subset(dataset, idx.tolist())


def grayscale_to_tensor(
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


def check_directory(directory: PathLike) -> Path:
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
