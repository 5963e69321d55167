"""Image sources read from local files: `.npz` archives and folders of PNG/JPEG files.

Both return an `ImageDataset` of uint8 levels (N, C, H, W) with 256 levels (8-bit data).
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qcsbm.data.images_dataset import ImageDataset
from qcsbm.errors import UsageError

logger = logging.getLogger(__name__)

#: Array names tried in order when an npz archive has several arrays and no key is given.
#: "data" is the layout of the downsampled ImageNet npz files: N rows of uint8, each row one
#: image flattened channel-major (CHW), 3 x 32 x 32 = 3072 values for the 32 x 32 variant.
NPZ_IMAGE_KEYS = ("x", "images", "arr_0", "data")
#: Array names read as class labels when present: (N,) integers.
NPZ_LABEL_KEYS = ("labels", "y")
#: Channel counts accepted for an N x H x W x C array (grayscale, RGB, RGBA).
IMAGE_CHANNELS = (1, 3, 4)
#: Suffixes read from an image folder, compared in lower case.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Pillow modes kept as they are, with their channel counts.
PIL_MODES = {"L": 1, "RGB": 3, "RGBA": 4}
#: Pillow modes converted on load: bilevel to grayscale, CMYK to RGB. Palette images ("P")
#: become RGBA when they carry transparency and RGB otherwise.
PIL_CONVERSIONS = {"1": "L", "CMYK": "RGB"}


# --- npz -------------------------------------------------------------------------------------


def _natural_key(path: Path):
    """Sort key that orders "batch_2" before "batch_10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_npz(path, *, key: str | None = None, channels: int | None = None) -> ImageDataset:
    """Read 8-bit images from an `.npz` file, or from every `.npz` file in a folder.

    Accepted layouts of the image array (uint8, values 0..255):
        N x H x W x C   C in 1, 3, 4 (channel-last, as NumPy and Pillow store images)
        N x H x W       one channel
        N x (C*H*W)     rows flattened channel-major (CHW), as in downsampled ImageNet's
                        "data" array; C is `channels` (default 3) and H = W.

    Args:
        path: an `.npz` file, or a folder whose `.npz` files (not recursive, in natural
            order: batch_2 before batch_10) are concatenated, like downsampled ImageNet's
            train_data_batch_1..10.
        key: name of the image array; None picks the only array, else the first of
            `NPZ_IMAGE_KEYS` present. Labels come from the first of `NPZ_LABEL_KEYS` present
            and are kept only when every file has them.
        channels: expected channel count; None accepts any.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"npz path {str(path)!r} not found; expected an .npz file or a folder "
                         "of .npz files")
    if path.is_dir():
        files = sorted(path.glob("*.npz"), key=_natural_key)
        if not files:
            raise UsageError(f"folder {str(path)!r} contains no .npz files")
    else:
        files = [path]

    parts = [_read_npz_file(file, key, channels) for file in files]

    levels = [part[0] for part in parts]
    for file, part in zip(files, levels):
        if part.shape[1:] != levels[0].shape[1:]:
            raise UsageError(f"npz file {str(file)!r} contains images of shape "
                             f"{tuple(part.shape[1:])}, but {str(files[0])!r} contains "
                             f"{tuple(levels[0].shape[1:])}; expected one image shape")
    labels = [part[1] for part in parts]
    if any(label is None for label in labels):
        labels = None
    else:
        labels = torch.cat(labels)

    dataset = ImageDataset(torch.cat(levels), 256, f"npz:{path}", labels)
    logger.debug("read %d images of shape %s from %d npz file(s) in %s", len(dataset),
                dataset.image_shape, len(files), path)
    return dataset


def _read_npz_file(file: Path, key: str | None, channels: int | None):
    """Return (levels (N, C, H, W) uint8 tensor, labels (N,) int64 tensor or None)."""
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UsageError(f"failed to read npz file {str(file)!r}: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UsageError(f"file {str(file)!r} is a single .npy array, expected an .npz archive "
                         "(save it with numpy.savez)")

    with archive:
        image_key = _choose_image_key(file, archive.files, key)
        label_key = next((name for name in NPZ_LABEL_KEYS
                          if name in archive.files and name != image_key), None)
        try:
            array = archive[image_key]
            labels = archive[label_key] if label_key is not None else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise UsageError(f"failed to read array {image_key!r} of npz file {str(file)!r}: "
                             f"{error}") from error

    levels = _array_to_levels(file, image_key, array, channels)
    if labels is not None:
        labels = _labels_to_tensor(file, label_key, labels, levels.shape[0])
    return levels, labels


def _choose_image_key(file: Path, names: list[str], key: str | None) -> str:
    if key is not None:
        if key not in names:
            raise UsageError(f"npz file {str(file)!r} has no array {key!r}; it contains "
                             f"{', '.join(map(repr, names)) or 'no arrays'}")
        return key
    if len(names) == 1:
        return names[0]
    for name in NPZ_IMAGE_KEYS:
        if name in names:
            return name
    raise UsageError(f"npz file {str(file)!r} contains arrays {', '.join(map(repr, names))} and "
                     f"none of the default names {', '.join(map(repr, NPZ_IMAGE_KEYS))}; choose "
                     "the image array with the key option")


def _array_to_levels(file: Path, key: str, array: np.ndarray, channels: int | None) -> torch.Tensor:
    """Check dtype and layout of an image array and return it as (N, C, H, W) uint8."""
    where = f"array {key!r} of npz file {str(file)!r}"

    # Check values before the layout, because a NaN or dtype error is the more useful one.
    if np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
        raise UsageError(f"{where} contains NaN; expected uint8 levels 0..255")
    if array.dtype != np.uint8:
        raise UsageError(f"{where} has dtype {array.dtype}; expected uint8 levels 0..255")

    if array.ndim == 4:
        if array.shape[-1] not in IMAGE_CHANNELS:
            hint = ""
            if array.shape[1] in IMAGE_CHANNELS:
                hint = "; it looks channel-first, so transpose it with x.transpose(0, 2, 3, 1)"
            raise UsageError(f"{where} has shape {array.shape}; expected N x H x W x C with C in "
                             f"{', '.join(map(str, IMAGE_CHANNELS))}{hint}")
        nchw = array.transpose(0, 3, 1, 2)
    elif array.ndim == 3:
        nchw = array[:, None]
    elif array.ndim == 2:
        nchw = _unflatten_chw(where, array, channels or 3)
    else:
        raise UsageError(f"{where} has {array.ndim} dimensions (shape {array.shape}); expected "
                         "N x H x W x C, N x H x W, or N x (C*H*W) flattened channel-major")

    if channels is not None and nchw.shape[1] != channels:
        raise UsageError(f"{where} contains images with {nchw.shape[1]} channel(s), but channels "
                         f"{channels} was requested")
    return torch.from_numpy(np.ascontiguousarray(nchw))


def _unflatten_chw(where: str, array: np.ndarray, channels: int) -> np.ndarray:
    """Reshape N x (C*H*W) rows, flattened channel-major, to (N, C, H, W) with H = W."""
    num_pixels, remainder = divmod(array.shape[1], channels)
    side = math.isqrt(num_pixels)
    if remainder or side * side != num_pixels:
        raise UsageError(f"{where} has shape {array.shape}; a row of {array.shape[1]} values is "
                         f"not {channels} channels of a square image (expected C * H * H values)")
    return array.reshape(array.shape[0], channels, side, side)


def _labels_to_tensor(file: Path, key: str, labels: np.ndarray, num_images: int) -> torch.Tensor:
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"array {key!r} of npz file {str(file)!r} has dtype {labels.dtype} and "
                         f"shape {labels.shape}; expected integer class labels of shape "
                         f"({num_images},)")
    return torch.from_numpy(labels.astype(np.int64))


# --- image folder ----------------------------------------------------------------------------


def _import_pillow():
    try:
        from PIL import Image
    except ImportError as error:
        raise UsageError("reading an image folder needs Pillow; install it with "
                         "`pip install pillow` (or `pip install qcsbm[images]`)") from error
    return Image


def read_folder(path, *, channels: int | None = None, progress: bool = False) -> ImageDataset:
    """Read every PNG/JPEG file under a folder (recursively, sorted by path) as 8-bit images.

    All files must have one size and one channel layout: grayscale (L), RGB or RGBA after
    the conversions in `PIL_CONVERSIONS` and of palette images. 16-bit and float images are
    rejected, because their levels do not fit 8 bits.

    Args:
        path: the folder.
        channels: expected channel count; None accepts any.
        progress: show a progress bar while reading.
    """
    Image = _import_pillow()
    root = Path(path)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "not found"
        raise UsageError(f"image folder {str(root)!r} {problem}; expected a folder of PNG or JPEG "
                         "files")
    files = sorted(file for file in root.rglob("*")
                   if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file())
    if not files:
        raise UsageError(f"image folder {str(root)!r} contains no "
                         f"{', '.join(IMAGE_SUFFIXES)} files (searched recursively)")

    arrays = []
    first = None
    for file in tqdm(files, desc="reading images", unit="image", disable=not progress):
        array = _read_image(Image, file)
        if channels is not None and array.shape[2] != channels:
            raise UsageError(f"image file {str(file)!r} has {array.shape[2]} channel(s), but "
                             f"channels {channels} was requested")
        if first is None:
            first = (file, array.shape)
        elif array.shape != first[1]:
            raise UsageError(f"image file {str(file)!r} has height x width x channels "
                             f"{array.shape}, but {str(first[0])!r} has {first[1]}; expected "
                             "all images of one size and mode")
        arrays.append(array)

    levels = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
    dataset = ImageDataset(levels, 256, f"folder:{root}")
    logger.debug("read %d images of shape %s from %s", len(dataset), dataset.image_shape, root)
    return dataset


def _read_image(Image, file: Path) -> np.ndarray:
    """Decode one image file to an H x W x C uint8 array."""
    try:
        with Image.open(file) as image:
            image.load()
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif image.mode in PIL_CONVERSIONS:
                image = image.convert(PIL_CONVERSIONS[image.mode])
            mode = image.mode
            array = np.asarray(image) if mode in PIL_MODES else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UsageError(f"failed to read image file {str(file)!r}: {error}") from error

    if array is None:
        raise UsageError(f"image file {str(file)!r} has Pillow mode {mode!r}; expected 8-bit "
                         f"{', '.join(PIL_MODES)}, or one of {', '.join(['P', *PIL_CONVERSIONS])} "
                         "(converted on load)")
    if array.ndim == 2:
        array = array[:, :, None]
    return array
