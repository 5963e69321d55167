"""Named image data sets: scikit-learn's digits and the torchvision sets.

digits
    scikit-learn's copy of the UCI optical recognition of handwritten digits test set:
    1797 images of 8 x 8 pixels, one channel, intensity levels 0..16 (17 levels). It ships
    with scikit-learn, so it needs no download. The split is fixed and stratified: in
    `load_digits()` order, every fifth image of each class (its 5th, 10th, ... occurrence)
    belongs to "test" (355 images, 34 to 36 per class) and the rest to "train" (1442 images).
cifar10, cifar100, svhn, mnist
    read through torchvision (imported only here, only when asked for), 256 levels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from qcsbm.data.images_dataset import ImageDataset
from qcsbm.errors import UsageError, check_choice

logger = logging.getLogger(__name__)

#: Levels 0..16 of scikit-learn's digits: each pixel counts the set pixels of a 4 x 4 block
#: of the original 32 x 32 bitmap (scikit-learn's description of the data set).
DIGITS_LEVELS = 17
#: Every DIGITS_TEST_STRIDE-th image of each class goes to the test split.
DIGITS_TEST_STRIDE = 5
DIGITS_SPLITS = ("train", "test", "all")


def load_digits(split: str = "train") -> ImageDataset:
    """Load scikit-learn's 8 x 8 digits, shape (N, 1, 8, 8), 17 levels (see module docstring)."""
    check_choice("split", split, DIGITS_SPLITS)
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise UsageError("data set 'digits' needs scikit-learn; install it with "
                         "`pip install scikit-learn` (or `pip install qcsbm[images]`)") from error

    bunch = sklearn_load_digits()
    images = bunch.images
    assert np.array_equal(images, np.round(images))
    assert images.max() < DIGITS_LEVELS
    levels = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))

    rank_in_class = torch.zeros_like(labels)
    for digit in labels.unique():
        members = torch.nonzero(labels == digit).flatten()
        rank_in_class[members] = torch.arange(len(members))
    is_test = rank_in_class % DIGITS_TEST_STRIDE == DIGITS_TEST_STRIDE - 1

    if split == "train":
        levels, labels = levels[~is_test], labels[~is_test]
    elif split == "test":
        levels, labels = levels[is_test], labels[is_test]
    return ImageDataset(levels.contiguous(), DIGITS_LEVELS, f"digits:{split}", labels)


# --- torchvision -----------------------------------------------------------------------------

#: name -> (torchvision class, splits, where the files go under root).
TORCHVISION_SETS = {
    "cifar10": ("CIFAR10", ("train", "test"), "cifar-10-batches-py/ (from cifar-10-python.tar.gz)"),
    "cifar100": ("CIFAR100", ("train", "test"), "cifar-100-python/ (from cifar-100-python.tar.gz)"),
    "svhn": ("SVHN", ("train", "test", "extra"), "{split}_32x32.mat"),
    "mnist": ("MNIST", ("train", "test"), "MNIST/raw/ (the four idx files, unpacked)"),
}


def load_torchvision(name: str, root, split: str = "train", *,
                     download: bool = False) -> ImageDataset:
    """Load CIFAR-10, CIFAR-100, SVHN or MNIST through torchvision as (N, C, H, W) uint8 levels.

    Args:
        name: one of `TORCHVISION_SETS`.
        root: folder that contains the files (or receives them with `download`).
        split: "train" or "test"; SVHN also has "extra".
        download: let torchvision download missing files into `root`.
    """
    check_choice("data set", name, tuple(TORCHVISION_SETS))
    class_name, splits, layout = TORCHVISION_SETS[name]
    check_choice(f"split of {name}", split, splits)
    if root is None:
        raise UsageError(f"data set {name!r} needs a root folder that contains its files or "
                         "receives them with download")
    root = Path(root)
    expected_files = root / layout.format(split=split)

    try:
        import torchvision.datasets
    except ImportError as error:
        raise UsageError(f"data set {name!r} needs torchvision, which failed to import "
                         f"({error}); install the torchvision build that matches your torch "
                         "(`pip install qcsbm[vision]`), or use the 'npz' or 'folder' source "
                         "with files you convert yourself") from error

    dataset_class = getattr(torchvision.datasets, class_name)
    try:
        if name == "svhn":
            source = dataset_class(str(root), split=split, download=download)
        else:
            source = dataset_class(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as error:
        # torchvision raises RuntimeError for missing or corrupt files and for failed
        # downloads; URLError (an OSError) escapes some downloads.
        hint = "" if download else ", or pass download to fetch them"
        raise UsageError(f"data set {name!r} ({split}) could not be loaded from "
                         f"{str(root)!r}: {error}. Put the files at {str(expected_files)!r}"
                         f"{hint}") from error

    levels = _torchvision_levels(name, source.data)
    targets = getattr(source, "targets", None)
    if targets is None:
        targets = getattr(source, "labels", None)
    labels = torch.as_tensor(np.asarray(targets), dtype=torch.long) if targets is not None else None
    dataset = ImageDataset(levels, 256, f"{name}:{split}", labels)
    logger.info("loaded %d images of shape %s from %s (%s)", len(dataset), dataset.image_shape,
                name, split)
    return dataset


def _torchvision_levels(name: str, data) -> torch.Tensor:
    """Bring torchvision's `data` attribute to a (N, C, H, W) uint8 tensor.

    CIFAR stores N x H x W x C NumPy arrays, SVHN N x C x H x W NumPy arrays and MNIST a
    N x H x W uint8 tensor.
    """
    levels = torch.as_tensor(np.asarray(data))
    if levels.dtype != torch.uint8:
        raise UsageError(f"torchvision's {name} data has dtype {levels.dtype}; expected uint8")
    if name in ("cifar10", "cifar100"):
        levels = levels.permute(0, 3, 1, 2)
    elif name == "mnist":
        levels = levels.unsqueeze(1)
    return levels.contiguous()
