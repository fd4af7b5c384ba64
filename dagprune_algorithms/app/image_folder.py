"""Image folders (one subfolder of images per class) read through timm, with the images that
cannot be decoded skipped and reported."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from dagprune_algorithms.app.dataset_split import DatasetSplit, PathLike, check_directory, split_indices
from dagprune_algorithms.app.errors import DataError

__all__ = ["load_image_folder_dataset", "undecodable_images"]

LOG = logging.getLogger("dagprune.data")

NAMED_BROKEN_IMAGES = 3
"""How many of the images that cannot be decoded a warning or an error names."""


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
    and have an extension timm recognises (``.png``, ``.jpg``, ``.jpeg``). Every image is
    decoded once here: those that cannot be (corrupt, truncated, not an image) are left out
    with a warning that counts them and names the first few. They are read as
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
            subfolders, fewer than two of them contain images, no image can be decoded,
            or there are too few images to split.
        ValueError: If ``image_size`` or ``val_fraction`` is out of range.
    """
    from timm.data import ImageDataset, create_transform
    from timm.data.readers.img_extensions import get_img_extensions

    root = check_directory(directory)
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
    _leave_out_undecodable_images(root, {id(d): d for d in (val_set, train_set)}.values())
    labels = np.array([target for _, target in val_set.reader.samples], dtype=np.int64)
    try:
        train_idx, val_idx = split_indices(labels, val_fraction, seed)
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


def undecodable_images(paths) -> list[tuple[str, str]]:
    """``(path, reason)`` of each of ``paths`` that PIL cannot decode (every pixel is read, so
    a truncated file is found too)."""
    from PIL import Image, UnidentifiedImageError

    broken = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except UnidentifiedImageError:
            broken.append((str(path), "not an image file PIL can identify"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            broken.append((str(path), f"{type(error).__name__}: {error}"))
    return broken


def _leave_out_undecodable_images(root: Path, datasets) -> None:
    """Removes the images that cannot be decoded from the readers of ``datasets`` (timm would
    silently serve the next image in their place) and warns about them.

    Raises:
        DataError: no image of ``root`` can be decoded.
    """
    datasets = list(datasets)
    samples = datasets[0].reader.samples
    broken = undecodable_images(path for path, _ in samples)
    if not broken:
        return
    named = ", ".join(f"{Path(path).relative_to(root)} ({reason})" for path, reason in broken[:NAMED_BROKEN_IMAGES])
    more = f" and {len(broken) - NAMED_BROKEN_IMAGES} more" if len(broken) > NAMED_BROKEN_IMAGES else ""
    if len(broken) == len(samples):
        raise DataError(f"none of the {len(samples)} images in '{root}' can be decoded: {named}{more}; "
                        "replace them with intact image files")
    broken_paths = {path for path, _ in broken}
    for dataset in datasets:
        dataset.reader.samples = [sample for sample in dataset.reader.samples if str(sample[0]) not in broken_paths]
    LOG.warning("skipped %d of the %d images in '%s' that cannot be decoded: %s%s; replace or delete them",
                len(broken), len(samples), root, named, more)
