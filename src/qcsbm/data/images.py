"""Image data: sources, scaling to [0, 1], dequantization and resumable training batches.

Sources (`load_images(name, ...)`), each returning an `ImageDataset` of uint8 levels
(N, C, H, W) that reports its own number of intensity levels L:

    digits      scikit-learn's 8 x 8 handwritten digits, 1 channel, L = 17, fixed train/test
                split; needs no download (the offline default)
    npz         an .npz archive (or a folder of them) with an N x H x W x C uint8 array, or
                downsampled ImageNet's N x 3072 "data" rows; L = 256
    folder      a folder of PNG/JPEG files of one size and mode, read recursively; L = 256
    cifar10, cifar100, svhn, mnist
                through torchvision when it is installed; L = 256

Scaling to [0, 1], with L the data's own number of levels:

    without dequantization   level k in 0..L-1  ->  k / (L - 1)
    uniform dequantization   level k            ->  (k + u) / L,   u ~ U(0, 1) per pixel

Bits per dimension assume the dequantized scaling: a model's continuous bits per dimension
on it plus log2(L) (`bits_per_dim_offset`) bound the discrete data's from above.

Typical use:

    dataset = load_images("digits", split="train")
    loader = ImageLoader(dataset, batch_size=64, seed=0, flip=True, dequantize=True)
    for step, x in zip(range(num_steps), loader):
        ...
    checkpoint["data"] = loader.state_dict()    # plain ints; load_state_dict resumes
"""

from __future__ import annotations

from qcsbm.data.images_dataset import (ImageDataset, bits_per_dim_offset, levels_to_unit,
                                       random_horizontal_flip)
from qcsbm.data.images_files import read_folder, read_npz
from qcsbm.data.images_loader import ImageLoader, seeded_generator
from qcsbm.data.images_named import TORCHVISION_SETS, load_digits, load_torchvision
from qcsbm.errors import UsageError, check_choice

__all__ = [
    "IMAGE_SOURCES", "ImageDataset", "ImageLoader", "bits_per_dim_offset", "levels_to_unit",
    "load_images", "random_horizontal_flip", "read_folder", "read_npz", "seeded_generator",
]

#: Names accepted by `load_images`.
IMAGE_SOURCES = ("digits", "npz", "folder", *TORCHVISION_SETS)


def load_images(name: str, *, root=None, split: str | None = None, key: str | None = None,
                channels: int | None = None, download: bool = False,
                progress: bool = False) -> ImageDataset:
    """Load an image source by name (see the module docstring for the sources).

    Args:
        name: one of `IMAGE_SOURCES`.
        root: where the files are. That is an .npz file or a folder of them for "npz", the
            image folder for "folder" and the folder of the files for the torchvision sets.
            "digits" takes no root.
        split: "train" (default) or "test" for the named sets; also "all" for digits and
            "extra" for SVHN. File sources have no splits (must be None): point root at the
            split's file or folder.
        key: name of the image array inside an .npz archive ("npz" only).
        channels: expected channel count; a source with another count raises UsageError.
        download: let torchvision download missing files (torchvision sets only).
        progress: show a progress bar while reading an image folder.
    """
    check_choice("data set", name, IMAGE_SOURCES)
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int)
                                 or channels < 1):
        raise UsageError(f"invalid channels {channels!r}; expected a positive integer or None")
    _check_unused(name, root=root, split=split, key=key, download=download)

    if name == "digits":
        dataset = load_digits(split or "train")
    elif name == "npz":
        dataset = read_npz(_require_root(name, root), key=key, channels=channels)
    elif name == "folder":
        dataset = read_folder(_require_root(name, root), channels=channels, progress=progress)
    else:
        dataset = load_torchvision(name, root, split or "train", download=download)

    if channels is not None and dataset.num_channels != channels:
        raise UsageError(f"data set {dataset.name} has {dataset.num_channels} channel(s), but "
                         f"channels {channels} was requested")
    return dataset


def _require_root(name: str, root):
    if root is None:
        raise UsageError(f"data set {name!r} needs root, the path of its files")
    return root


def _check_unused(name: str, *, root, split, key, download) -> None:
    """Raise UsageError for an option that the chosen source would otherwise ignore."""
    unused = []
    if name == "digits" and root is not None:
        unused.append(f"root {str(root)!r}")
    if name in ("npz", "folder") and split is not None:
        unused.append(f"split {split!r} (point root at the split's files instead)")
    if name != "npz" and key is not None:
        unused.append(f"key {key!r}")
    if name not in TORCHVISION_SETS and download:
        unused.append("download")
    if unused:
        raise UsageError(f"data set {name!r} takes no {', '.join(unused)}")
