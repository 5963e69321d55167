"""Training batches of an `ImageDataset`: seeded shuffling, augmentation, resume and sharding.

Every random draw derives from (seed, epoch) and (seed, epoch, rank, batch index) alone, so
the batch at a position is the same whether it is reached by iterating or by restoring a
saved position (epoch, batch_index):

    permutation of epoch e      torch.randperm(N) under a generator seeded from (seed, e),
                                the same on every rank
    rank r's shard of epoch e   the r-th of world_size equal contiguous slices of that
                                permutation, N // world_size images each. The last
                                N % world_size images of the permutation are skipped that epoch.
    batch b of the shard        images b * B .. (b + 1) * B - 1 of the shard
    flips and dequantization    drawn from a generator seeded from (seed, e, r, b)
"""

from __future__ import annotations

import logging
import numbers

import numpy as np
import torch

from qcsbm.data.images_dataset import ImageDataset
from qcsbm.errors import UsageError

logger = logging.getLogger(__name__)

# Leading entropy words that keep the two random streams apart.
_PERMUTATION_STREAM = 0
_AUGMENTATION_STREAM = 1

#: Keys of `ImageLoader.state_dict()`; all values are plain ints.
STATE_KEYS = ("epoch", "batch_index", "seed", "batch_size", "world_size", "num_images")


def seeded_generator(*entropy: int) -> torch.Generator:
    """Return a CPU generator seeded from a tuple of non-negative ints via NumPy's SeedSequence.

    SeedSequence hashes the whole tuple, so nearby tuples such as (seed, 1) and (seed + 1, 0)
    give unrelated streams.
    """
    state = np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UsageError(f"invalid {name} {value!r}; expected an integer >= {minimum}")


class ImageLoader:
    """An endless iterator over float image batches in [0, 1] with a resumable position.

    Iterating yields (B, C, H, W) tensors and moves on to the next epoch, reshuffled, after
    the last batch of an epoch. See the module docstring for how batches are drawn.

    Args:
        dataset: the images.
        batch_size: B, images per batch.
        seed: non-negative int from which every permutation and augmentation derives.
        shuffle: draw a new permutation each epoch; otherwise keep dataset order.
        drop_last: skip a final batch smaller than B (then every batch has B images).
        flip: mirror each image left to right with probability 1/2.
        dequantize: uniform dequantization, (k + u) / L; otherwise k / (L - 1).
        rank, world_size: this process's shard for distributed training (0 and 1 without).
        dtype, device: of the batches; the random draws happen on the CPU either way.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, flip: bool = False,
                 dequantize: bool = False, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise UsageError(f"invalid rank {rank!r}; expected 0 <= rank < world_size "
                             f"({world_size})")

        self.shard_size = len(dataset) // world_size
        if self.shard_size == 0:
            raise UsageError(f"invalid world_size {world_size!r}; the data set {dataset.name} "
                             f"has only {len(dataset)} images, fewer than world_size")
        if drop_last and self.shard_size < batch_size:
            raise UsageError(f"invalid batch_size {batch_size!r}; with drop_last each rank's "
                             f"shard of {self.shard_size} images must hold at least one batch")

        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.flip = flip
        self.dequantize = dequantize
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.dtype = dtype
        self.device = device

        self.epoch = 0
        self.batch_index = 0
        self._cached_shard = (None, None)

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch."""
        full, remainder = divmod(self.shard_size, self.batch_size)
        return full if self.drop_last or remainder == 0 else full + 1

    def __len__(self) -> int:
        return self.batches_per_epoch

    # --- which images ----------------------------------------------------------------------

    def shard_indices(self, epoch: int) -> torch.Tensor:
        """Return the dataset indices of this rank's shard of `epoch`, in visiting order."""
        if self._cached_shard[0] == epoch:
            return self._cached_shard[1]

        num_images = len(self.dataset)
        if self.shuffle:
            generator = seeded_generator(self.seed, _PERMUTATION_STREAM, epoch)
            order = torch.randperm(num_images, generator=generator)
        else:
            order = torch.arange(num_images)
        start = self.rank * self.shard_size
        shard = order[start:start + self.shard_size]

        self._cached_shard = (epoch, shard)
        return shard

    def batch_indices(self, epoch: int, batch_index: int) -> torch.Tensor:
        """Return the dataset indices of batch `batch_index` of `epoch` on this rank."""
        if not 0 <= batch_index < self.batches_per_epoch:
            raise UsageError(f"invalid batch_index {batch_index!r}; expected 0 <= batch_index < "
                             f"{self.batches_per_epoch} (batches per epoch)")
        start = batch_index * self.batch_size
        return self.shard_indices(epoch)[start:start + self.batch_size]

    def batch(self, epoch: int, batch_index: int) -> torch.Tensor:
        """Return the float batch at a position without moving the iterator."""
        indices = self.batch_indices(epoch, batch_index)
        generator = seeded_generator(self.seed, _AUGMENTATION_STREAM, epoch, self.rank,
                                     batch_index)
        return self.dataset.images(indices, dequantize=self.dequantize, flip=self.flip,
                                   generator=generator, dtype=self.dtype, device=self.device)

    # --- iteration -------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        images = self.batch(self.epoch, self.batch_index)
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        return images

    def epoch_batches(self):
        """Yield the remaining batches of the current epoch; the position then starts the next."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield next(self)

    # --- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """Return the position and the settings it depends on, as plain ints.

        All ranks advance in lockstep, so one rank's state resumes every rank.
        """
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_images": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by `state_dict`, so the next batch is the one that followed.

        Raises UsageError when the state is malformed or when its seed, batch_size,
        world_size or data set size differ from this loader's, because the remaining batches
        would differ. The flip, dequantize, shuffle and drop_last settings are not stored and
        must match the saved run's for the batches to match.
        """
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise UsageError(f"invalid loader state: missing {', '.join(missing)}; expected "
                             f"the keys {', '.join(STATE_KEYS)}")
        for key in STATE_KEYS:
            _check_int(f"loader state {key}", state[key], 0)

        current = self.state_dict()
        for key in ("seed", "batch_size", "world_size", "num_images"):
            if state[key] != current[key]:
                raise UsageError(f"loader state has {key} {state[key]}, but this loader has "
                                 f"{current[key]}; resume with the saved run's settings")
        if state["batch_index"] >= self.batches_per_epoch:
            raise UsageError(f"invalid loader state batch_index {state['batch_index']}; expected "
                             f"< {self.batches_per_epoch} (batches per epoch)")

        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
        logger.info("resumed image loader at epoch %d, batch %d", self.epoch, self.batch_index)
