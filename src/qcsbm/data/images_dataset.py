"""An in-memory image data set of integer intensity levels and its scaling to [0, 1].

Scaling, with L the number of intensity levels of the data (256 for 8-bit images):

    without dequantization   level k in 0..L-1  ->  k / (L - 1), so 0 and 1 are both reached
    uniform dequantization   level k            ->  (k + u) / L,   u ~ U(0, 1) per pixel

The dequantized values fill [0, 1) and their density is the one that bits per dimension
refers to. For a density p on [0, 1]^D, P(k) = L^-D * E_u[p((k + u) / L)], and Jensen's
inequality gives -log2 P(k) / D <= E_u[-log2 p((k + u) / L)] / D + log2(L). So a model's
continuous bits per dimension plus log2(L) bound the discrete ones from above.
`bits_per_dim_offset` returns that log2(L), which is 8 bits for 8-bit images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qcsbm.errors import UsageError

#: Maximum number of intensity levels of a source, because levels are stored as uint8.
MAX_LEVELS = 256


def levels_to_unit(levels: torch.Tensor, num_levels: int, *, dequantize: bool = False,
                   generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scale integer levels 0..num_levels-1 to [0, 1] (see the module docstring).

    Args:
        levels: integer tensor of any shape.
        num_levels: L, the number of intensity levels of the data (>= 2).
        dequantize: add u ~ U(0, 1) to each level and divide by L instead of L - 1.
        generator: CPU generator for u. The noise is drawn on the CPU and then moved to
            `levels.device`, so a seed gives the same values on every device.
        dtype: floating dtype of the result.
    """
    _check_num_levels(num_levels)
    values = levels.to(dtype)
    if not dequantize:
        return values.div_(num_levels - 1)

    noise = torch.rand(levels.shape, generator=generator, dtype=dtype).to(levels.device)
    return values.add_(noise).div_(num_levels)


def random_horizontal_flip(images: torch.Tensor,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of a (N, C, H, W) batch left to right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    flip = flip.to(images.device).reshape(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


def bits_per_dim_offset(num_levels: int, scale: float = 1.0) -> float:
    """Return the bits per dimension to add to a continuous model's -log2 p / D.

    The continuous model is fit to y = scale * x + shift, where x in [0, 1] comes from uniform
    dequantization of data with `num_levels` levels. The offset is log2(num_levels) for the
    discretization (see the module docstring) minus log2(scale) for the change of variables:
    8 for 8-bit data in [0, 1], 7 for 8-bit data centered to [-1, 1] (scale 2).
    """
    _check_num_levels(num_levels)
    if not scale > 0:
        raise UsageError(f"invalid scale {scale!r}; expected a number > 0")
    return math.log2(num_levels) - math.log2(scale)


def _check_num_levels(num_levels: int) -> None:
    if not isinstance(num_levels, int) or not 2 <= num_levels <= MAX_LEVELS:
        raise UsageError(f"invalid num_levels {num_levels!r}; expected an integer in "
                         f"2..{MAX_LEVELS}")


@dataclass(frozen=True)
class ImageDataset:
    """Images stored as integer levels, shape (N, C, H, W), uint8, with optional labels.

    Attributes:
        levels: uint8 tensor (N, C, H, W) with values in 0..num_levels-1.
        num_levels: L, the number of intensity levels of the source (256 for 8-bit data,
            17 for scikit-learn's digits).
        name: the source name and where the data came from, for logs.
        labels: int64 tensor (N,) of class labels, or None where the source has none.
    """

    levels: torch.Tensor
    num_levels: int
    name: str
    labels: torch.Tensor | None = None

    def __post_init__(self):
        _check_num_levels(self.num_levels)
        if self.levels.dtype != torch.uint8 or self.levels.dim() != 4:
            raise UsageError(f"invalid levels for {self.name}: expected a uint8 tensor of shape "
                             f"(N, C, H, W), got {self.levels.dtype} of shape "
                             f"{tuple(self.levels.shape)}")
        if self.levels.shape[0] == 0:
            raise UsageError(f"data set {self.name} contains no images")
        if self.levels.numel() > 0 and int(self.levels.max()) >= self.num_levels:
            raise UsageError(f"data set {self.name} contains level {int(self.levels.max())}, "
                             f"expected levels 0..{self.num_levels - 1}")
        if self.labels is not None and self.labels.shape != (self.levels.shape[0],):
            raise UsageError(f"invalid labels for {self.name}: expected shape "
                             f"({self.levels.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.levels.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.levels.shape[1:])

    @property
    def num_channels(self) -> int:
        return self.levels.shape[1]

    @property
    def num_dims(self) -> int:
        """D = C * H * W, the number of dimensions of one image (the bits/dim divisor)."""
        return math.prod(self.image_shape)

    def bits_per_dim_offset(self, scale: float = 1.0) -> float:
        """Return `bits_per_dim_offset(self.num_levels, scale)`."""
        return bits_per_dim_offset(self.num_levels, scale)

    def subset(self, indices) -> ImageDataset:
        """Return the images (and labels) at `indices`, a sequence, tensor or slice."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long)
        labels = self.labels[indices] if self.labels is not None else None
        return ImageDataset(self.levels[indices], self.num_levels, self.name, labels)

    def images(self, indices=None, *, dequantize: bool = False, flip: bool = False,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Return float images in [0, 1], shape (n, C, H, W), scaled as `levels_to_unit`.

        Args:
            indices: which images (sequence, tensor or slice); None for all of them.
            dequantize: uniform dequantization, (k + u) / L; otherwise k / (L - 1).
            flip: mirror each image left to right with probability 1/2.
            generator: CPU generator for the flips and the dequantization noise.
            dtype, device: of the result.
        """
        levels = self.levels
        if isinstance(indices, slice):
            levels = levels[indices]
        elif indices is not None:
            # index_select is much faster than advanced indexing for uint8 gathers on the CPU.
            levels = levels.index_select(0, torch.as_tensor(indices, dtype=torch.long))
        if device is not None:
            levels = levels.to(device)
        if flip:
            levels = random_horizontal_flip(levels, generator)
        return levels_to_unit(levels, self.num_levels, dequantize=dequantize,
                              generator=generator, dtype=dtype)
