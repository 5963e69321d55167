"""Image sources, scaling, dequantization, flips, resumable loading and sharding."""

import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from qcsbm.data.images import (IMAGE_SOURCES, ImageDataset, ImageLoader, bits_per_dim_offset,
                               levels_to_unit, load_images, random_horizontal_flip)
from qcsbm.errors import UsageError


def _random_levels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _toy_dataset(num_images=10, seed=0):
    levels = torch.from_numpy(_random_levels((num_images, 3, 4, 5), seed))
    return ImageDataset(levels, 256, "toy")


# --- digits ----------------------------------------------------------------------------------


def test_digits_shapes_and_levels():
    train = load_images("digits")
    assert train.image_shape == (1, 8, 8)
    assert train.num_dims == 64
    assert train.num_levels == 17
    assert train.levels.dtype == torch.uint8
    assert int(train.levels.min()) == 0
    assert int(train.levels.max()) == 16
    assert train.labels is not None


def test_digits_split_is_stratified_partition():
    everything = load_images("digits", split="all")
    train = load_images("digits", split="train")
    test = load_images("digits", split="test")
    assert len(everything) == 1797
    assert len(train) + len(test) == len(everything)

    # Rebuild the documented rule: the 5th, 10th, ... image of each class is a test image.
    labels = everything.labels.numpy()
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        is_test[members[4::5]] = True
    assert torch.equal(test.levels, everything.levels[torch.from_numpy(is_test)])
    assert torch.equal(train.levels, everything.levels[torch.from_numpy(~is_test)])

    per_class = np.bincount(test.labels.numpy(), minlength=10)
    assert per_class.min() >= 34
    assert per_class.max() <= 36


def test_digits_values_on_level_grid():
    dataset = load_images("digits", split="test")
    x = dataset.images()
    assert x.dtype == torch.float32
    assert float(x.min()) == 0.0
    assert float(x.max()) == 1.0
    assert torch.equal(x * 16, dataset.levels.float())


# --- scaling, dequantization, flips ----------------------------------------------------------


@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_levels_to_unit_without_dequantization(num_levels):
    levels = torch.arange(num_levels, dtype=torch.uint8)
    x = levels_to_unit(levels, num_levels, dtype=torch.float64)
    expected = torch.arange(num_levels, dtype=torch.float64) / (num_levels - 1)
    assert torch.allclose(x, expected)


def test_dequantization_stays_in_own_cell():
    num_levels = 17
    levels = torch.arange(num_levels, dtype=torch.uint8).repeat(2000)
    generator = torch.Generator().manual_seed(0)
    x = levels_to_unit(levels, num_levels, dequantize=True, generator=generator,
                       dtype=torch.float64)
    assert float(x.min()) >= 0.0
    assert float(x.max()) < 1.0
    assert torch.equal(torch.floor(x * num_levels).to(torch.uint8), levels)


def test_dequantization_noise_is_uniform():
    num_levels = 256
    levels = torch.from_numpy(_random_levels(100_000))
    generator = torch.Generator().manual_seed(1)
    x = levels_to_unit(levels, num_levels, dequantize=True, generator=generator,
                       dtype=torch.float64)
    noise = (x * num_levels - levels.double()).numpy()

    # Mean 1/2 and variance 1/12 within about ten standard errors, and a KS test.
    assert abs(noise.mean() - 0.5) < 0.01
    assert abs(noise.var() - 1 / 12) < 0.003
    assert stats.kstest(noise, "uniform").pvalue > 1e-4


def test_dequantization_follows_generator():
    levels = torch.from_numpy(_random_levels((8, 3, 4, 4)))
    first = levels_to_unit(levels, 256, dequantize=True,
                           generator=torch.Generator().manual_seed(5))
    again = levels_to_unit(levels, 256, dequantize=True,
                           generator=torch.Generator().manual_seed(5))
    other = levels_to_unit(levels, 256, dequantize=True,
                           generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_bits_per_dim_offset_values():
    assert bits_per_dim_offset(256) == 8.0
    assert bits_per_dim_offset(256, scale=2.0) == 7.0
    assert bits_per_dim_offset(17) == pytest.approx(math.log2(17))
    assert load_images("digits").bits_per_dim_offset() == pytest.approx(math.log2(17))


@pytest.mark.parametrize("num_levels", [1, 257])
def test_bits_per_dim_offset_rejects_levels(num_levels):
    with pytest.raises(UsageError, match="num_levels"):
        bits_per_dim_offset(num_levels)


def test_random_flip_mirrors_about_half():
    levels = torch.from_numpy(_random_levels((2000, 1, 3, 4)))
    flipped = random_horizontal_flip(levels, torch.Generator().manual_seed(0))
    same = (flipped == levels).flatten(1).all(1)
    mirrored = (flipped == levels.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())

    # Random images are almost never their own mirror image, so `mirrored` counts flips.
    only_mirrored = mirrored & ~same
    assert 900 < int(only_mirrored.sum()) < 1100


def test_dataset_images_flip_and_dequantize():
    dataset = _toy_dataset(num_images=400)
    generator = torch.Generator().manual_seed(2)
    x = dataset.images(flip=True, dequantize=True, generator=generator)
    cells = torch.floor(x * 256).to(torch.uint8)
    same = (cells == dataset.levels).flatten(1).all(1)
    mirrored = (cells == dataset.levels.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0 < int(mirrored.sum()) < 400


def test_dataset_rejects_level_out_of_range():
    levels = torch.full((2, 1, 2, 2), 17, dtype=torch.uint8)
    with pytest.raises(UsageError, match="level 17"):
        ImageDataset(levels, 17, "bad")


def test_dataset_subset_and_indexed_images():
    dataset = load_images("digits", split="test")
    part = dataset.subset([3, 0, 7])
    assert torch.equal(part.levels, dataset.levels[[3, 0, 7]])
    assert torch.equal(part.labels, dataset.labels[[3, 0, 7]])
    assert torch.equal(dataset.images([3, 0, 7]), part.images())
    assert torch.equal(dataset.images(slice(2, 4)), dataset.images()[2:4])


# --- npz -------------------------------------------------------------------------------------


def test_npz_channel_last_with_labels(tmp_path):
    images = _random_levels((5, 6, 4, 3))
    labels = np.arange(5)
    np.savez(tmp_path / "set.npz", x=images, labels=labels)
    dataset = load_images("npz", root=tmp_path / "set.npz")
    assert dataset.image_shape == (3, 6, 4)
    assert dataset.num_levels == 256
    assert torch.equal(dataset.levels, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(dataset.labels, torch.from_numpy(labels))


def test_npz_grayscale_three_dims(tmp_path):
    images = _random_levels((4, 5, 5))
    np.savez(tmp_path / "gray.npz", images)
    dataset = load_images("npz", root=tmp_path / "gray.npz", channels=1)
    assert torch.equal(dataset.levels[:, 0], torch.from_numpy(images))
    assert dataset.labels is None


def test_npz_key_option(tmp_path):
    first = _random_levels((3, 4, 4, 1), seed=1)
    second = _random_levels((3, 4, 4, 3), seed=2)
    np.savez(tmp_path / "two.npz", first=first, second=second)
    dataset = load_images("npz", root=tmp_path / "two.npz", key="second")
    assert torch.equal(dataset.levels, torch.from_numpy(second).permute(0, 3, 1, 2))
    with pytest.raises(UsageError, match="choose the image array"):
        load_images("npz", root=tmp_path / "two.npz")
    with pytest.raises(UsageError, match="no array 'third'"):
        load_images("npz", root=tmp_path / "two.npz", key="third")


def test_npz_downsampled_imagenet_layout(tmp_path):
    data = _random_levels((6, 3 * 8 * 8))
    labels = np.arange(1, 7)
    np.savez(tmp_path / "val_data.npz", data=data, labels=labels, mean=np.zeros(3))
    dataset = load_images("npz", root=tmp_path / "val_data.npz")
    assert dataset.image_shape == (3, 8, 8)

    # Rows are channel-major: value (c, h, w) sits at column c * 64 + h * 8 + w.
    for n, c, h, w in [(0, 0, 0, 0), (2, 1, 3, 5), (5, 2, 7, 7)]:
        assert int(dataset.levels[n, c, h, w]) == int(data[n, c * 64 + h * 8 + w])
    assert torch.equal(dataset.labels, torch.from_numpy(labels))


def test_npz_folder_natural_order(tmp_path):
    batches = {}
    for number in (1, 2, 10):
        batches[number] = _random_levels((2, 3 * 4 * 4), seed=number)
        np.savez(tmp_path / f"train_data_batch_{number}.npz", data=batches[number],
                 labels=np.full(2, number))
    dataset = load_images("npz", root=tmp_path)
    expected = np.concatenate([batches[1], batches[2], batches[10]]).reshape(6, 3, 4, 4)
    assert torch.equal(dataset.levels, torch.from_numpy(expected))
    assert dataset.labels.tolist() == [1, 1, 2, 2, 10, 10]


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 4, 4, 3), dtype=np.float32), "dtype float32"),
    (np.zeros((2, 4, 4, 3), dtype=np.int64), "dtype int64"),
    (np.full((2, 4, 4, 3), np.nan), "NaN"),
    (np.zeros(5, dtype=np.uint8), "1 dimensions"),
    (np.zeros((2, 1, 4, 4, 3), dtype=np.uint8), "5 dimensions"),
    (np.zeros((2, 3, 8, 8), dtype=np.uint8), "channel-first"),
    (np.zeros((2, 50), dtype=np.uint8), "not 3 channels of a square image"),
])
def test_npz_rejects_bad_array(tmp_path, array, message):
    path = tmp_path / "bad.npz"
    np.savez(path, x=array)
    with pytest.raises(UsageError, match=message) as error:
        load_images("npz", root=path)
    assert "bad.npz" in str(error.value)


def test_npz_rejects_wrong_channels(tmp_path):
    path = tmp_path / "rgb.npz"
    np.savez(path, x=_random_levels((2, 4, 4, 3)))
    with pytest.raises(UsageError, match="3 channel.*channels 1 was requested"):
        load_images("npz", root=path, channels=1)


def test_npz_rejects_missing_and_corrupt(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_images("npz", root=tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip archive")
    with pytest.raises(UsageError, match="corrupt.npz"):
        load_images("npz", root=corrupt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="contains no .npz files"):
        load_images("npz", root=tmp_path / "empty")


def test_npz_rejects_bad_labels(tmp_path):
    path = tmp_path / "labels.npz"
    np.savez(path, x=_random_levels((3, 4, 4, 1)), labels=np.arange(4))
    with pytest.raises(UsageError, match="'labels'.*shape"):
        load_images("npz", root=path)


# --- image folder ----------------------------------------------------------------------------


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def test_folder_reads_png_recursively(tmp_path):
    arrays = [_random_levels((5, 7, 3), seed=seed) for seed in range(3)]
    _write_png(tmp_path / "a.png", arrays[0])
    _write_png(tmp_path / "sub" / "b.PNG", arrays[1])
    _write_png(tmp_path / "sub" / "deeper" / "c.png", arrays[2])
    (tmp_path / "notes.txt").write_text("not an image")

    dataset = load_images("folder", root=tmp_path)
    assert dataset.image_shape == (3, 5, 7)
    assert dataset.num_levels == 256
    expected = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    assert torch.equal(dataset.levels, expected)


def test_folder_reads_grayscale_and_palette(tmp_path):
    gray = _random_levels((4, 4, 1))
    _write_png(tmp_path / "gray" / "g.png", gray)
    dataset = load_images("folder", root=tmp_path / "gray", channels=1)
    assert torch.equal(dataset.levels[0, 0], torch.from_numpy(gray[:, :, 0]))

    rgb = _random_levels((4, 4, 3))
    palette = Image.fromarray(rgb).quantize(colors=8)
    (tmp_path / "palette").mkdir()
    palette.save(tmp_path / "palette" / "p.png")
    dataset = load_images("folder", root=tmp_path / "palette")
    expected = np.array(palette.convert("RGB"))
    assert torch.equal(dataset.levels[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_folder_reads_jpeg(tmp_path):
    color = np.empty((8, 8, 3), dtype=np.uint8)
    color[:] = (200, 40, 90)
    Image.fromarray(color).save(tmp_path / "flat.jpg", quality=95)
    Image.fromarray(color).save(tmp_path / "flat2.jpeg", quality=95)
    dataset = load_images("folder", root=tmp_path)
    assert tuple(dataset.levels.shape) == (2, 3, 8, 8)

    # JPEG is lossy, but a flat color survives within a few levels.
    expected = torch.tensor([200, 40, 90]).reshape(1, 3, 1, 1)
    assert int((dataset.levels.int() - expected).abs().max()) <= 3


def test_folder_rejects_missing_and_empty(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_images("folder", root=tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(UsageError, match="contains no"):
        load_images("folder", root=tmp_path / "empty")
    file = tmp_path / "file.png"
    _write_png(file, _random_levels((2, 2, 3)))
    with pytest.raises(UsageError, match="is not a folder"):
        load_images("folder", root=file)


def test_folder_rejects_corrupt_image(tmp_path):
    _write_png(tmp_path / "good.png", _random_levels((4, 4, 3)))
    (tmp_path / "garbage.png").write_bytes(b"\x00\x01\x02 definitely not a PNG")
    with pytest.raises(UsageError, match="garbage.png"):
        load_images("folder", root=tmp_path)


def test_folder_rejects_truncated_image(tmp_path):
    _write_png(tmp_path / "whole.png", _random_levels((16, 16, 3)))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "whole.png").unlink()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="cut.png"):
        load_images("folder", root=tmp_path)


def test_folder_rejects_mixed_sizes(tmp_path):
    _write_png(tmp_path / "a.png", _random_levels((4, 4, 3)))
    _write_png(tmp_path / "b.png", _random_levels((4, 5, 3)))
    with pytest.raises(UsageError, match="b.png.*a.png.*one size and mode"):
        load_images("folder", root=tmp_path)


def test_folder_rejects_mixed_modes(tmp_path):
    _write_png(tmp_path / "a.png", _random_levels((4, 4, 3)))
    _write_png(tmp_path / "b.png", _random_levels((4, 4, 1)))
    with pytest.raises(UsageError, match="one size and mode"):
        load_images("folder", root=tmp_path)


def test_folder_rejects_wrong_channels(tmp_path):
    _write_png(tmp_path / "a.png", _random_levels((4, 4, 3)))
    with pytest.raises(UsageError, match="a.png.*3 channel.*channels 1 was requested"):
        load_images("folder", root=tmp_path, channels=1)


def test_folder_rejects_sixteen_bit(tmp_path):
    array = np.random.default_rng(0).integers(0, 65535, size=(4, 4), dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")
    with pytest.raises(UsageError, match="deep.png.*mode 'I;16'"):
        load_images("folder", root=tmp_path)


# --- names, options, torchvision -------------------------------------------------------------


def test_unknown_name_lists_sources():
    with pytest.raises(UsageError, match="'imagenet'") as error:
        load_images("imagenet")
    for name in IMAGE_SOURCES:
        assert repr(name) in str(error.value)


@pytest.mark.parametrize("name, options, message", [
    ("digits", {"root": "/data"}, "root"),
    ("digits", {"key": "x"}, "key"),
    ("digits", {"download": True}, "download"),
    ("digits", {"split": "validation"}, "split"),
    ("folder", {"root": "/data", "split": "test"}, "split"),
    ("npz", {}, "needs root"),
    ("cifar10", {"root": "/data", "split": "extra"}, "split of cifar10"),
    ("digits", {"channels": 0}, "channels"),
])
def test_load_images_rejects_bad_options(name, options, message):
    with pytest.raises(UsageError, match=message):
        load_images(name, **options)


def test_digits_rejects_wrong_channels():
    with pytest.raises(UsageError, match="1 channel.*channels 3 was requested"):
        load_images("digits", channels=3)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist"])
def test_torchvision_missing_install_hint(monkeypatch, tmp_path, name):
    # A None entry in sys.modules makes `import torchvision` raise ImportError.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(UsageError, match="needs torchvision.*pip install") as error:
        load_images(name, root=tmp_path)
    assert repr(name) in str(error.value)


def _install_fake_torchvision(monkeypatch, classes):
    """Put a stand-in `torchvision.datasets` with the given classes into sys.modules."""
    package = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    for class_name, dataset_class in classes.items():
        setattr(datasets, class_name, dataset_class)
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_torchvision_missing_files_location(monkeypatch, tmp_path):
    class NotFound:
        def __init__(self, root, train=True, split=None, download=False):
            raise RuntimeError("Dataset not found or corrupted. You can use download=True")

    _install_fake_torchvision(monkeypatch, {"CIFAR10": NotFound, "SVHN": NotFound})
    with pytest.raises(UsageError, match="cifar-10-batches-py.*download") as error:
        load_images("cifar10", root=tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(UsageError, match="test_32x32.mat"):
        load_images("svhn", root=tmp_path, split="test")


def test_torchvision_layouts_become_nchw(monkeypatch, tmp_path):
    # Stand-ins that store `data` the way torchvision's classes do.
    nhwc = _random_levels((4, 6, 5, 3), seed=1)
    nchw = _random_levels((4, 3, 6, 5), seed=2)
    nhw = _random_levels((4, 6, 5), seed=3)
    calls = []

    class Cifar:
        def __init__(self, root, train=True, download=False):
            calls.append(("cifar", train, download))
            self.data, self.targets = nhwc, [0, 1, 2, 3]

    class Svhn:
        def __init__(self, root, split="train", download=False):
            calls.append(("svhn", split, download))
            self.data, self.labels = nchw, np.array([3, 2, 1, 0])

    class Mnist:
        def __init__(self, root, train=True, download=False):
            calls.append(("mnist", train, download))
            self.data, self.targets = torch.from_numpy(nhw), torch.arange(4)

    _install_fake_torchvision(monkeypatch, {"CIFAR10": Cifar, "CIFAR100": Cifar, "SVHN": Svhn,
                                            "MNIST": Mnist})

    cifar = load_images("cifar100", root=tmp_path, split="test")
    assert torch.equal(cifar.levels, torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    assert cifar.labels.tolist() == [0, 1, 2, 3]
    svhn = load_images("svhn", root=tmp_path, split="extra", download=True)
    assert torch.equal(svhn.levels, torch.from_numpy(nchw))
    assert svhn.labels.tolist() == [3, 2, 1, 0]
    mnist = load_images("mnist", root=tmp_path, channels=1)
    assert torch.equal(mnist.levels[:, 0], torch.from_numpy(nhw))
    assert calls == [("cifar", False, False), ("svhn", "extra", True), ("mnist", True, False)]


# --- loader ----------------------------------------------------------------------------------


def test_loader_epoch_visits_each_image_once():
    loader = ImageLoader(_toy_dataset(num_images=10), batch_size=3, seed=4, drop_last=False)
    assert loader.batches_per_epoch == 4
    orders = []
    for epoch in range(3):
        indices = torch.cat([loader.batch_indices(epoch, b) for b in range(4)])
        assert sorted(indices.tolist()) == list(range(10))
        orders.append(indices.tolist())
    assert orders[0] != orders[1]
    assert orders[1] != orders[2]


def test_loader_batches_match_dataset():
    dataset = _toy_dataset(num_images=9)
    loader = ImageLoader(dataset, batch_size=4, seed=1)
    assert loader.batches_per_epoch == 2
    for epoch in range(2):
        for batch_index in range(2):
            indices = loader.batch_indices(epoch, batch_index)
            assert torch.equal(next(loader), dataset.images(indices))
    assert loader.state_dict()["epoch"] == 2


def test_loader_drop_last_sizes():
    dataset = _toy_dataset(num_images=10)
    with_last = ImageLoader(dataset, batch_size=4, drop_last=False)
    assert [batch.shape[0] for batch in with_last.epoch_batches()] == [4, 4, 2]
    assert with_last.epoch == 1
    dropped = ImageLoader(dataset, batch_size=4)
    assert [batch.shape[0] for batch in dropped.epoch_batches()] == [4, 4]


def test_loader_without_shuffle_keeps_order():
    dataset = _toy_dataset(num_images=6)
    loader = ImageLoader(dataset, batch_size=3, shuffle=False)
    assert loader.batch_indices(0, 1).tolist() == [3, 4, 5]
    assert loader.batch_indices(7, 0).tolist() == [0, 1, 2]


def test_loader_resume_gives_same_batches():
    dataset = _toy_dataset(num_images=11)
    options = dict(batch_size=3, seed=7, flip=True, dequantize=True)
    original = ImageLoader(dataset, **options)
    for _ in range(5):  # three batches per epoch, so this stops inside epoch 1
        next(original)
    state = json.loads(json.dumps(original.state_dict()))
    assert state["epoch"] == 1
    assert state["batch_index"] == 2
    assert all(type(value) is int for value in state.values())
    expected = [next(original) for _ in range(7)]

    resumed = ImageLoader(dataset, **options)
    resumed.load_state_dict(state)
    for batch, reference in zip([next(resumed) for _ in range(7)], expected):
        assert torch.equal(batch, reference)


def test_loader_augmentation_differs_per_batch():
    dataset = ImageDataset(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), 256, "zeros")
    loader = ImageLoader(dataset, batch_size=4, shuffle=False, dequantize=True)
    first, second = next(loader), next(loader)
    third = next(loader)
    assert not torch.equal(first, second)
    assert not torch.equal(first, third)


@pytest.mark.parametrize("num_images, world_size", [(12, 3), (10, 3), (7, 7)])
def test_shards_disjoint_and_covering(num_images, world_size):
    dataset = _toy_dataset(num_images=num_images)
    shard_size = num_images // world_size
    for epoch in range(3):
        shards = [ImageLoader(dataset, batch_size=1, seed=3, rank=rank,
                              world_size=world_size).shard_indices(epoch)
                  for rank in range(world_size)]
        union = torch.cat(shards).tolist()
        assert all(len(shard) == shard_size for shard in shards)
        assert len(set(union)) == shard_size * world_size
        if num_images % world_size == 0:
            assert sorted(union) == list(range(num_images))


def test_shards_batches_follow_shard():
    dataset = _toy_dataset(num_images=12)
    loader = ImageLoader(dataset, batch_size=2, seed=3, rank=1, world_size=3)
    assert loader.batches_per_epoch == 2
    shard = loader.shard_indices(0)
    batches = torch.cat([loader.batch_indices(0, 0), loader.batch_indices(0, 1)])
    assert torch.equal(batches, shard)


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2, "seed": -1}, "seed"),
    ({"batch_size": 2, "rank": 3, "world_size": 3}, "rank"),
    ({"batch_size": 2, "world_size": 0}, "world_size"),
    ({"batch_size": 2, "world_size": 11}, "world_size"),
    ({"batch_size": 4, "world_size": 3}, "batch_size"),
])
def test_loader_rejects_bad_options(options, message):
    with pytest.raises(UsageError, match=message):
        ImageLoader(_toy_dataset(num_images=10), **options)


def test_loader_rejects_mismatched_state():
    dataset = _toy_dataset(num_images=10)
    state = ImageLoader(dataset, batch_size=2, seed=1).state_dict()
    with pytest.raises(UsageError, match="seed 1"):
        ImageLoader(dataset, batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(UsageError, match="batch_size 2"):
        ImageLoader(dataset, batch_size=5, seed=1).load_state_dict(state)
    with pytest.raises(UsageError, match="missing batch_index"):
        ImageLoader(dataset, batch_size=2, seed=1).load_state_dict({"epoch": 0})
    with pytest.raises(UsageError, match="batch_index 5"):
        ImageLoader(dataset, batch_size=2, seed=1).load_state_dict({**state, "batch_index": 5})

