"""NCSN++: the U-Net score network of Song et al., "Score-Based Generative Modeling through
Stochastic Differential Equations" (ICLR 2021), in the continuous VE configuration that the
QCSBM paper trains as U-NCSN++ and QC-NCSN++ (Chao et al., ICML 2023).

The network maps images x in [0, 1] (or [-1, 1] with `centered=True`) and noise levels sigma
to a tensor of the same shape as x:

* the time embedding is a Gaussian Fourier projection of log(sigma) followed by two dense
  layers;
* BigGAN residual blocks with FIR up- and downsampling form the U-Net; DDPM self-attention
  runs at the resolutions in `attn_resolutions` and in the middle;
* a residual input pyramid feeds FIR-downsampled copies of the input into each lower
  resolution (progressive_input "residual", combine "sum");
* with `scale_by_sigma`, the output is divided by sigma, so it is read directly as the score.
  Without it, the output is the vector field of the energy 1/2 ||net(x, sigma)||^2 / sigma
  used by the conservative C-NCSN++ (`qcsbm.scores.EnergyScore(..., form="norm")`).

Every submodule sits in one flat `all_modules` list whose order equals the reference's in
yang-song/score_sde_pytorch, so its checkpoints load strictly once the `module.` prefix that
`nn.DataParallel` adds is removed (see `qcsbm.score_sde_format`). Parameter registration
order is the same as well, which the name-less EMA shadow list of those checkpoints needs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from qcsbm.errors import UsageError, check_positive
from qcsbm.nets.ncsnpp_layers import (
    AttnBlockpp,
    FIRDownsampleConv,
    GaussianFourierProjection,
    ResnetBlockBigGANpp,
    conv3x3,
    dense,
    group_norm,
)

# Options of a score_sde_pytorch config that this implementation fixes, with the value it
# implements. `from_score_sde_config` rejects any other value.
FIXED_SCORE_SDE_OPTIONS = {
    "name": "ncsnpp",
    "embedding_type": "fourier",
    "conditional": True,
    "fir": True,
    "resblock_type": "biggan",
    "progressive": "none",
    "progressive_input": "residual",
    "progressive_combine": "sum",
    "attention_type": "ddpm",
    "nonlinearity": "swish",
    "normalization": "GroupNorm",
}

# Defaults for optional `model` entries: the values of score_sde_pytorch's
# configs/ve/cifar10_ncsnpp_continuous.py and its default CIFAR-10 config.
SCORE_SDE_MODEL_DEFAULTS = {
    "dropout": 0.1,
    "fourier_scale": 16,
    "fir_kernel": [1, 3, 3, 1],
    "skip_rescale": True,
    "scale_by_sigma": True,
    "init_scale": 0.0,
    "sigma_min": 0.01,
    "sigma_max": 50.0,
    "num_scales": 1000,
}


@dataclasses.dataclass(frozen=True)
class NCSNppConfig:
    """Architecture of an NCSN++ network. The defaults are the QCSBM paper's deep CIFAR-10 model.

    Attributes:
        image_size: height and width of the input images, in pixels.
        num_channels: image channels (3 for RGB, 1 for grey).
        nf: base number of feature channels; level i has nf * ch_mult[i].
        ch_mult: channel multiplier per resolution level; level i works at image_size / 2^i.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions (in pixels) whose levels get self-attention.
        dropout: dropout probability inside every residual block, active in train mode only.
        fourier_scale: std of the frozen Fourier frequencies W of the log-sigma embedding.
        fir_kernel: 1-D FIR kernel for resampling; its normalised outer product is used.
        skip_rescale: divide every residual sum by sqrt(2).
        scale_by_sigma: divide the output by sigma (off for the energy variant).
        centered: inputs are already in [-1, 1]; if False, x in [0, 1] is mapped to 2x - 1.
        init_scale: variance scale of the last layer of each block; 0 means 1e-10.
        sigma_min, sigma_max, num_scales: the VE noise levels stored in the `sigmas` buffer,
            a geometric sequence from sigma_max down to sigma_min. The forward pass does not
            read it, but checkpoints contain it.
    """

    image_size: int
    num_channels: int = 3
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 8
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    fourier_scale: float = 16.0
    fir_kernel: tuple[float, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    scale_by_sigma: bool = True
    centered: bool = False
    init_scale: float = 0.0
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000

    def __post_init__(self):
        for name in ("ch_mult", "attn_resolutions", "fir_kernel"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()

    def _validate(self):
        for name in ("image_size", "num_channels", "num_res_blocks", "num_scales"):
            _check_int(name, getattr(self, name), minimum=1)

        # GroupNorm uses nf // 4 groups at the finest level, so nf needs at least 4 channels.
        _check_int("nf", self.nf, minimum=4)
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise UsageError(f"invalid ch_mult {self.ch_mult!r}; expected a non-empty tuple of "
                             "integers >= 1")

        # Every level except the last halves the resolution.
        divisor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % divisor:
            raise UsageError(f"invalid image_size {self.image_size}; with {len(self.ch_mult)} "
                             f"levels (ch_mult {self.ch_mult}) it must be divisible by {divisor}")
        if any(r not in self.resolutions() for r in self.attn_resolutions):
            raise UsageError(f"invalid attn_resolutions {self.attn_resolutions!r}; expected "
                             f"values among the level resolutions {self.resolutions()}")

        if not 0 <= self.dropout < 1:
            raise UsageError(f"invalid dropout {self.dropout!r}; expected a number in [0, 1)")
        check_positive("fourier_scale", self.fourier_scale)
        check_positive("init_scale", self.init_scale, allow_zero=True)
        if not self.fir_kernel or sum(self.fir_kernel) == 0:
            raise UsageError(f"invalid fir_kernel {self.fir_kernel!r}; expected a non-empty "
                             "sequence with a non-zero sum")
        check_positive("sigma_min", self.sigma_min)
        if not self.sigma_max > self.sigma_min:
            raise UsageError(f"invalid sigma_max {self.sigma_max!r}; expected a number greater "
                             f"than sigma_min {self.sigma_min!r}")

    def resolutions(self) -> tuple[int, ...]:
        """Return the image resolution of each level, finest first."""
        return tuple(self.image_size // 2**level for level in range(len(self.ch_mult)))

    def to_dict(self) -> dict:
        """Return the configuration as a JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"invalid {name} {value!r}; expected an integer >= {minimum}")


def geometric_sigmas(sigma_max: float, sigma_min: float, num_scales: int) -> torch.Tensor:
    """Return the float64 noise levels exp(linspace(log sigma_max, log sigma_min, num_scales))."""
    values = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))
    return torch.tensor(values, dtype=torch.float64)


class NCSNpp(nn.Module):
    """NCSN++ score network: `net(x, sigma)` with x of shape (B, C, H, W) and sigma of shape (B,).

    Keyword arguments are the fields of `NCSNppConfig`. Use `from_score_sde_config` for a
    score_sde_pytorch config dict and `compact` for a small network to train on a CPU.
    """

    def __init__(self, *, image_size: int, **options):
        super().__init__()
        fields = [f.name for f in dataclasses.fields(NCSNppConfig)]
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise UsageError(f"invalid NCSNpp arguments {unknown}; expected only "
                             f"{', '.join(fields)}")
        config = NCSNppConfig(image_size=image_size, **options)
        self.config = config

        # Registered before `all_modules` so that it comes first in the state dict.
        self.register_buffer("sigmas", geometric_sigmas(config.sigma_max, config.sigma_min,
                                                        config.num_scales))
        self.all_modules, self._attention_levels = _build_modules(config)

    # ------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def from_config(cls, config: NCSNppConfig) -> "NCSNpp":
        return cls(**dataclasses.asdict(config))

    @classmethod
    def from_score_sde_config(cls, cfg: Mapping) -> "NCSNpp":
        """Build from a score_sde_pytorch config as a dict with `model` and `data` sections.

        Options this implementation fixes (FIXED_SCORE_SDE_OPTIONS) must be absent or equal to
        the implemented value. Missing optional values take the reference's CIFAR-10 NCSN++
        defaults; entries that do not shape the network (ema_rate, conv_size, ...) are ignored.
        """
        return cls.from_config(config_from_score_sde(cfg))

    @classmethod
    def compact(cls, image_size: int, num_channels: int, **overrides) -> "NCSNpp":
        """Build a small NCSN++ for training on a CPU, e.g. on 8x8 grey digits.

        nf 32, one residual block per level, channel multipliers (1, 2, 2, 2) cut to the levels
        that keep the coarsest resolution at >= 4 pixels, attention at the coarsest level.
        For 8x8x1 that is 2 levels and 753,185 parameters (7.2 GFLOP for forward plus backward
        at batch 64). For 32x32x3 it is 4 levels and 1,831,651 parameters (119 GFLOP).
        `overrides` replace any of these settings.

        NOTE: on 8x8 scikit-learn digits (VE, sigma 0.01 to 10, Adam lr 2e-3, batch 64) the
        DSM loss fell from 32.2 to 7.9 in 400 steps, 1.2 to 2.3 s per step on one thread of a
        heavily loaded 2-core machine. Sample quality after such a run was not checked.
        """
        num_levels = 1
        size = image_size
        while num_levels < 4 and size % 2 == 0 and size // 2 >= 4:
            size //= 2
            num_levels += 1

        options = dict(num_channels=num_channels, nf=32, ch_mult=(1, 2, 2, 2)[:num_levels],
                       num_res_blocks=1, attn_resolutions=(size,))
        options.update(overrides)
        return cls(image_size=image_size, **options)

    # ------------------------------------------------------------------------------------------
    # Forward

    @property
    def scale_by_sigma(self) -> bool:
        return self.config.scale_by_sigma

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Return the network output, shape of x.

        Args:
            x: images (B, C, H, W), in [0, 1] unless `centered`. H and W must be divisible by
                2^(levels - 1).
            sigma: noise levels (B,) or a scalar, > 0 (its log enters the embedding).
        """
        cfg = self.config
        self._check_input(x)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise UsageError(f"invalid sigma of shape {tuple(sigma.shape)}; expected a scalar "
                             f"or shape ({x.shape[0]},), one noise level per image")
        modules = iter(self.all_modules)

        # Time embedding from log(sigma).
        temb = next(modules)(torch.log(sigma))
        temb = next(modules)(temb)
        temb = next(modules)(torch.nn.functional.silu(temb))

        if not cfg.centered:
            x = 2 * x - 1

        # Down path. Each level's features are kept for the skip connections.
        input_pyramid = x
        hs = [next(modules)(x)]
        for level in range(len(cfg.ch_mult)):
            for _ in range(cfg.num_res_blocks):
                h = next(modules)(hs[-1], temb)
                if self._attention_levels[level]:
                    h = next(modules)(h)
                hs.append(h)

            if level != len(cfg.ch_mult) - 1:
                h = next(modules)(hs[-1], temb)
                input_pyramid = next(modules)(input_pyramid)
                input_pyramid = _residual_sum(input_pyramid, h, cfg.skip_rescale)
                h = input_pyramid
                hs.append(h)

        # Middle: residual block, attention, residual block.
        h = next(modules)(hs[-1], temb)
        h = next(modules)(h)
        h = next(modules)(h, temb)

        # Up path, consuming the skip connections in reverse order.
        for level in reversed(range(len(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
            if self._attention_levels[level]:
                h = next(modules)(h)
            if level != 0:
                h = next(modules)(h, temb)

        # Output head.
        h = torch.nn.functional.silu(next(modules)(h))
        h = next(modules)(h)
        assert not hs, "the up path must consume every skip connection"
        assert next(modules, None) is None, "forward must use every module"

        if cfg.scale_by_sigma:
            h = h / sigma.reshape(-1, *([1] * (h.dim() - 1)))
        return h

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        divisor = 2 ** (len(cfg.ch_mult) - 1)
        if x.dim() != 4 or x.shape[1] != cfg.num_channels:
            raise UsageError(f"invalid x of shape {tuple(x.shape)}; expected (B, "
                             f"{cfg.num_channels}, H, W)")
        if x.shape[2] % divisor or x.shape[3] % divisor:
            raise UsageError(f"invalid x of shape {tuple(x.shape)}; H and W must be divisible "
                             f"by {divisor}")


def _residual_sum(a: torch.Tensor, b: torch.Tensor, skip_rescale: bool) -> torch.Tensor:
    return (a + b) / math.sqrt(2.0) if skip_rescale else a + b


def _build_modules(cfg: NCSNppConfig) -> tuple[nn.ModuleList, tuple[bool, ...]]:
    """Create every submodule in the reference's order and flag the levels with attention."""
    resolutions = cfg.resolutions()
    attention_levels = tuple(r in cfg.attn_resolutions for r in resolutions)
    temb_dim = 4 * cfg.nf

    def resnet_block(in_ch, out_ch=None, **kwargs):
        return ResnetBlockBigGANpp(in_ch, out_ch, temb_dim=temb_dim, dropout=cfg.dropout,
                                   fir_kernel=cfg.fir_kernel, skip_rescale=cfg.skip_rescale,
                                   init_scale=cfg.init_scale, **kwargs)

    def attention(channels):
        return AttnBlockpp(channels, skip_rescale=cfg.skip_rescale, init_scale=cfg.init_scale)

    # Time embedding: Fourier features of size 2 nf, then two dense layers of width 4 nf.
    modules = [GaussianFourierProjection(cfg.nf, scale=cfg.fourier_scale),
               dense(2 * cfg.nf, temb_dim),
               dense(temb_dim, temb_dim),
               conv3x3(cfg.num_channels, cfg.nf)]

    # Down path. `skip_channels` mirrors the features the forward pass keeps for the skips.
    skip_channels = [cfg.nf]
    in_ch = cfg.nf
    pyramid_ch = cfg.num_channels
    for level, mult in enumerate(cfg.ch_mult):
        for _ in range(cfg.num_res_blocks):
            modules.append(resnet_block(in_ch, cfg.nf * mult))
            in_ch = cfg.nf * mult
            if attention_levels[level]:
                modules.append(attention(in_ch))
            skip_channels.append(in_ch)

        if level != len(cfg.ch_mult) - 1:
            modules.append(resnet_block(in_ch, down=True))
            modules.append(FIRDownsampleConv(pyramid_ch, in_ch, fir_kernel=cfg.fir_kernel))
            pyramid_ch = in_ch
            skip_channels.append(in_ch)

    # Middle.
    modules += [resnet_block(in_ch), attention(in_ch), resnet_block(in_ch)]

    # Up path.
    for level in reversed(range(len(cfg.ch_mult))):
        for _ in range(cfg.num_res_blocks + 1):
            out_ch = cfg.nf * cfg.ch_mult[level]
            modules.append(resnet_block(in_ch + skip_channels.pop(), out_ch))
            in_ch = out_ch
        if attention_levels[level]:
            modules.append(attention(in_ch))
        if level != 0:
            modules.append(resnet_block(in_ch, up=True))
    assert not skip_channels, "the up path must consume every skip connection"

    # Output head.
    modules += [group_norm(in_ch), conv3x3(in_ch, cfg.num_channels, init_scale=cfg.init_scale)]
    return nn.ModuleList(modules), attention_levels


def config_from_score_sde(cfg: Mapping) -> NCSNppConfig:
    """Translate a score_sde_pytorch config dict (`model` and `data` sections) to NCSNppConfig."""
    if not isinstance(cfg, Mapping) or "model" not in cfg or "data" not in cfg:
        raise UsageError("invalid score_sde config; expected a dict with 'model' and 'data' "
                         f"sections, got {type(cfg).__name__} with keys "
                         f"{sorted(cfg) if isinstance(cfg, Mapping) else None}")
    model, data = cfg["model"], cfg["data"]

    for name, implemented in FIXED_SCORE_SDE_OPTIONS.items():
        if name in model and model[name] != implemented:
            raise UsageError(f"unsupported model.{name} {model[name]!r}; this NCSN++ "
                             f"implements only {implemented!r}")

    required = {"model": ("nf", "ch_mult", "num_res_blocks", "attn_resolutions"),
                "data": ("image_size", "num_channels")}
    for section, names in required.items():
        missing = [n for n in names if n not in cfg[section]]
        if missing:
            raise UsageError(f"invalid score_sde config; {section} is missing {missing}")

    options = {name: model.get(name, default) for name, default in SCORE_SDE_MODEL_DEFAULTS.items()}
    return NCSNppConfig(
        image_size=data["image_size"],
        num_channels=data["num_channels"],
        centered=data.get("centered", False),
        nf=model["nf"],
        ch_mult=tuple(model["ch_mult"]),
        num_res_blocks=model["num_res_blocks"],
        attn_resolutions=tuple(model["attn_resolutions"]),
        **options,
    )
