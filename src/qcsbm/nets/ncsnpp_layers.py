"""Building blocks of NCSN++ (Song et al., "Score-Based Generative Modeling through Stochastic
Differential Equations", ICLR 2021), in pure PyTorch.

Attribute names (`GroupNorm_0`, `Conv_0`, `Dense_0`, `NIN_0`, `Conv2d_0`, ...) and the shapes
of their tensors follow the state dicts written by yang-song/score_sde_pytorch, so that its
checkpoints load strictly. That includes the attention projections (`NIN`), which store their
weight as (in, out) rather than the (out, in) of `nn.Linear`.

FIR resampling, as in StyleGAN2 (Karras et al., CVPR 2020), filters with the normalised outer
product of a 1-D kernel, [1, 3, 3, 1] by default, so each 2-D tap is k_i k_j / 64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# score_sde_pytorch's GroupNorm: min(C // 4, 32) groups and this epsilon everywhere.
GROUP_NORM_EPS = 1e-6
GROUP_NORM_MAX_GROUPS = 32

# Skip rescaling divides each residual sum by sqrt(2) to keep its variance unchanged.
SQRT2 = math.sqrt(2.0)


def group_norm_groups(num_channels: int) -> int:
    """Return the number of GroupNorm groups NCSN++ uses for `num_channels`: min(C // 4, 32)."""
    return min(num_channels // 4, GROUP_NORM_MAX_GROUPS)


def group_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_norm_groups(num_channels), num_channels, eps=GROUP_NORM_EPS)


# ----------------------------------------------------------------------------------------------
# Initialisation


def init_variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Fill `weight` uniformly with variance scale * 2 / (fan_in + fan_out), DDPM's default.

    A scale of 0 becomes 1e-10, as in score_sde_pytorch's `default_init`, so that the "zero"
    initialised output layers are tiny but not exactly zero.
    """
    scale = 1e-10 if scale == 0 else scale
    if weight.dim() < 2:
        raise ValueError(f"variance scaling needs a weight with >= 2 dimensions, got "
                         f"{weight.dim()}")

    # Fans count the receptive field, so both conv (out, in, k, k) and NIN (in, out) work.
    receptive_field = weight[0][0].numel()
    fan_sum = (weight.shape[0] + weight.shape[1]) * receptive_field
    bound = math.sqrt(3 * scale * 2 / fan_sum)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv3x3(in_ch: int, out_ch: int, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
    init_variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def conv1x1(in_ch: int, out_ch: int, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=1)
    init_variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def dense(in_features: int, out_features: int) -> nn.Linear:
    linear = nn.Linear(in_features, out_features)
    init_variance_scaling_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


# ----------------------------------------------------------------------------------------------
# FIR resampling


def fir_kernel_2d(kernel, dtype: torch.dtype, device) -> torch.Tensor:
    """Return the 2-D FIR filter: the outer product of the 1-D `kernel`, normalised to sum 1."""
    k = torch.as_tensor(kernel, dtype=dtype, device=device)
    k2d = torch.outer(k, k)
    return k2d / k2d.sum()


def _fir_filter(x: torch.Tensor, k2d: torch.Tensor, pad: tuple[int, int], stride: int = 1):
    """Pad H and W by `pad` (before, after) and filter every channel with `k2d`.

    The filter is symmetric for every kernel this module builds, so correlation and
    convolution agree.
    """
    channels = x.shape[1]
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = k2d.expand(channels, 1, *k2d.shape)
    return F.conv2d(x, weight, stride=stride, groups=channels)


def upsample_fir(x: torch.Tensor, kernel, factor: int = 2) -> torch.Tensor:
    """Upsample (B, C, H, W) by `factor`: insert zeros, then FIR-filter with gain factor^2."""
    batch, channels, height, width = x.shape
    k2d = fir_kernel_2d(kernel, x.dtype, x.device) * factor**2

    # Zero insertion: each pixel becomes the top-left sample of a factor x factor cell.
    up = x.new_zeros(batch, channels, height, factor, width, factor)
    up[:, :, :, 0, :, 0] = x
    up = up.reshape(batch, channels, height * factor, width * factor)

    # Padding that keeps the output at exactly factor * H, centred like the reference.
    taps = k2d.shape[0] - factor
    return _fir_filter(up, k2d, ((taps + 1) // 2 + factor - 1, taps // 2))


def downsample_fir(x: torch.Tensor, kernel, factor: int = 2) -> torch.Tensor:
    """Downsample (B, C, H, W) by `factor`: FIR-filter, then keep every factor-th sample."""
    k2d = fir_kernel_2d(kernel, x.dtype, x.device)
    taps = k2d.shape[0] - factor
    return _fir_filter(x, k2d, ((taps + 1) // 2, taps // 2), stride=factor)


class FIRDownsampleConv(nn.Module):
    """A 3x3 convolution with stride 2 after FIR filtering: the input-pyramid downsampler.

    Its parameters are `Conv2d_0.weight` (out, in, 3, 3) and `Conv2d_0.bias`, as in the
    reference's `Downsample(with_conv=True, fir=True)`.
    """

    def __init__(self, in_ch: int, out_ch: int, fir_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.fir_kernel = tuple(fir_kernel)
        self.Conv2d_0 = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=2)
        init_variance_scaling_(self.Conv2d_0.weight)
        nn.init.zeros_(self.Conv2d_0.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad so that filter plus 3x3 stride-2 conv maps H to H / 2: (len(k) - 2) + (3 - 1).
        k2d = fir_kernel_2d(self.fir_kernel, x.dtype, x.device)
        total_pad = (k2d.shape[0] - 2) + (self.Conv2d_0.kernel_size[0] - 1)
        x = _fir_filter(x, k2d, ((total_pad + 1) // 2, total_pad // 2))
        return self.Conv2d_0(x)


# ----------------------------------------------------------------------------------------------
# Embedding, attention, residual blocks


class GaussianFourierProjection(nn.Module):
    """Random Fourier features [sin(2 pi W s), cos(2 pi W s)] of a scalar s per sample.

    `W` ~ N(0, scale^2) is a frozen `nn.Parameter` (requires_grad False), as in the reference,
    so it appears in `parameters()` and the state dict but never in the optimiser or the EMA.
    """

    def __init__(self, embedding_size: int, scale: float = 16.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        angles = s[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class NIN(nn.Module):
    """A 1x1 projection over channels with weight `W` stored as (in, out), plus bias `b`."""

    def __init__(self, in_ch: int, out_ch: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(init_variance_scaling_(torch.empty(in_ch, out_ch), init_scale))
        self.b = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[None, :, None, None]


class AttnBlockpp(nn.Module):
    """DDPM self-attention over all H x W positions, one head, with a residual connection."""

    def __init__(self, channels: int, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.GroupNorm_0(x)
        q = self.NIN_0(h).reshape(batch, channels, height * width)
        k = self.NIN_1(h).reshape(batch, channels, height * width)
        v = self.NIN_2(h).reshape(batch, channels, height * width)

        # weights[b, i, j]: how much query position i attends to key position j.
        weights = torch.einsum("bci,bcj->bij", q, k) * channels**-0.5
        weights = torch.softmax(weights, dim=-1)
        h = torch.einsum("bij,bcj->bci", weights, v).reshape(batch, channels, height, width)
        h = self.NIN_3(h)

        out = x + h
        return out / SQRT2 if self.skip_rescale else out


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN residual block with time embedding, optional FIR up- or downsampling.

    The 1x1 shortcut `Conv_2` exists only when the block changes channels or resolution.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, *, temb_dim: int,
                 up: bool = False, down: bool = False, dropout: float = 0.1,
                 fir_kernel=(1, 3, 3, 1), skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.up = up
        self.down = down
        self.fir_kernel = tuple(fir_kernel)
        self.skip_rescale = skip_rescale
        self.has_shortcut_conv = in_ch != out_ch or up or down

        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if self.has_shortcut_conv:
            self.Conv_2 = conv1x1(in_ch, out_ch)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return upsample_fir(x, self.fir_kernel)
        if self.down:
            return downsample_fir(x, self.fir_kernel)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.GroupNorm_0(x))
        h = self._resample(h)
        x = self._resample(x)

        h = self.Conv_0(h)
        h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = F.silu(self.GroupNorm_1(h))
        h = self.Dropout_0(h)
        h = self.Conv_1(h)

        if self.has_shortcut_conv:
            x = self.Conv_2(x)
        out = x + h
        return out / SQRT2 if self.skip_rescale else out
