"""Build the SDE and the score model of a `TrainConfig`, and load a trained run.

`build_score_model(cfg)` turns the configuration into `(score_model, sde)`:

    training.kind   sde.kind      score model
    usbm, qcsbm     ve            UnconstrainedScore(NCSN++, output="score"); NCSN++ divides
                                  its output by sigma itself (model.scale_by_sigma true)
    usbm, qcsbm     vp, subvp     UnconstrainedScore(NCSN++, output="noise"): the network
                                  predicts z and the score is -net / std(t)
    csbm            any           EnergyScore(NCSN++ without scale_by_sigma,
                                  form=training.energy_form): the score is -grad_x E

A QCSBM is an unconstrained model trained with the QC penalty, so it builds like a USBM.

`load_run(workdir)` is what sampling and evaluation use to read a finished or running
`qcsbm train` run folder (see its docstring for what it returns).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
from torch import nn

from qcsbm.checkpoints import CheckpointManager, check_state_dict_matches, load_checkpoint
from qcsbm.config import ModelConfig, SDEConfig, TrainConfig, from_dict
from qcsbm.errors import CheckpointError, UsageError
from qcsbm.nets.ncsnpp import FIXED_SCORE_SDE_OPTIONS, NCSNpp
from qcsbm.runs import CHECKPOINT_DIR_NAME, is_run_dir
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import SDE, SubVPSDE, VESDE, VPSDE

logger = logging.getLogger(__name__)

# ModelConfig fields that this NCSN++ implements with one value only (the reference's VE
# NCSN++ settings); `network_kwargs` rejects any other value.
_FIXED_MODEL_FIELDS = ("name", "fir", "resblock_type", "progressive", "progressive_input",
                       "progressive_combine", "conditional", "embedding_type")


def build_sde(sde_cfg: SDEConfig) -> SDE:
    """Build the forward SDE named by `sde_cfg.kind` with its sigma or beta range and t_min."""
    if sde_cfg.kind == "ve":
        return VESDE(sde_cfg.sigma_min, sde_cfg.sigma_max, t_min=sde_cfg.t_min)
    if sde_cfg.kind == "vp":
        return VPSDE(sde_cfg.beta_min, sde_cfg.beta_max, t_min=sde_cfg.t_min)
    if sde_cfg.kind == "subvp":
        return SubVPSDE(sde_cfg.beta_min, sde_cfg.beta_max, t_min=sde_cfg.t_min)
    raise UsageError(f"invalid sde.kind {sde_cfg.kind!r}; expected one of 've', 'vp', 'subvp'")


def network_kwargs(cfg: TrainConfig) -> dict:
    """Translate the model, data and SDE sections into keyword arguments of `NCSNpp`.

    Raises UsageError for a model option that this NCSN++ does not implement.
    """
    model: ModelConfig = cfg.model
    for name in _FIXED_MODEL_FIELDS:
        implemented = FIXED_SCORE_SDE_OPTIONS[name]
        if getattr(model, name) != implemented:
            raise UsageError(f"unsupported model.{name} {getattr(model, name)!r}; this NCSN++ "
                             f"implements only {implemented!r}")

    # The `sigmas` buffer of NCSN++ stores the VE noise levels, which only a VE SDE defines.
    # Other SDEs keep the reference defaults so that checkpoints have the usual buffer.
    sigma_range = {}
    if cfg.sde.kind == "ve":
        sigma_range = dict(sigma_min=cfg.sde.sigma_min, sigma_max=cfg.sde.sigma_max)

    return dict(
        image_size=cfg.data.image_size,
        num_channels=cfg.data.num_channels,
        nf=model.nf,
        ch_mult=tuple(model.ch_mult),
        num_res_blocks=model.num_res_blocks,
        attn_resolutions=tuple(model.attn_resolutions),
        dropout=model.dropout,
        fourier_scale=model.fourier_scale,
        fir_kernel=tuple(model.fir_kernel),
        skip_rescale=model.skip_rescale,
        scale_by_sigma=model.scale_by_sigma,
        centered=model.centered,
        init_scale=model.init_scale,
        num_scales=model.num_scales,
        **sigma_range,
    )


def build_network(cfg: TrainConfig) -> NCSNpp:
    """Build the NCSN++ network of `cfg` (for a CPU-sized one, see the digits presets)."""
    return NCSNpp(**network_kwargs(cfg))


def build_score_model(cfg: TrainConfig) -> tuple[nn.Module, SDE]:
    """Build `(score_model, sde)` for `cfg`; the table in the module docstring gives the choice.

    The score model is called `score_model(x, t)` with x of shape (B, C, H, W) and t of
    shape (B,). Its network is `score_model.net`.
    """
    sde = build_sde(cfg.sde)
    net = build_network(cfg)
    if cfg.training.kind == "csbm":
        return EnergyScore(net, sde, form=cfg.training.energy_form), sde
    output = "score" if cfg.sde.kind == "ve" else "noise"
    if cfg.sde.kind == "ve" and not cfg.model.scale_by_sigma:
        # NOTE: without the division by sigma the raw output is read as the score, which
        # is the reference's behaviour for scale_by_sigma false but rarely what one wants.
        logger.warning("model.scale_by_sigma is false for a VE %s model; the network output "
                       "is used as the score without dividing it by sigma", cfg.training.kind)
    return UnconstrainedScore(net, sde, output=output), sde


# --- data metadata ----------------------------------------------------------------------

def data_scale(model_cfg: ModelConfig) -> tuple[float, float]:
    """Return (scale, shift) that map images in [0, 1] to the range the SDE works on.

    Uncentered models work on [0, 1] (NCSN++ maps to [-1, 1] inside), centered ones on
    [-1, 1], so samples x map back to images by (x - shift) / scale.
    """
    return (2.0, -1.0) if model_cfg.centered else (1.0, 0.0)


# --- loading a run ----------------------------------------------------------------------

@dataclasses.dataclass
class LoadedRun:
    """A trained model read back from a `qcsbm train` run folder by `load_run`.

    Attributes:
        config: the run's configuration as saved in the checkpoint.
        score_model: `score_model(x, t)`, in eval mode, on the requested device.
        sde: the forward SDE the model was trained with.
        step: the training step of the checkpoint.
        weights: "ema" or "model", whichever weights `score_model` holds.
        checkpoint_path: the file the weights came from.
        data: metadata of the training images: "name", "num_levels" (L), "image_shape"
            [C, H, W], "num_images", "dequantize", "scale" and "shift" (x = scale *
            image + shift maps images in [0, 1] to the SDE's data range) and
            "bits_per_dim_offset" (log2 L - log2 scale, valid for dequantized data).
    """

    config: TrainConfig
    score_model: nn.Module
    sde: SDE
    step: int
    weights: str
    checkpoint_path: Path
    data: dict


def load_run(workdir, *, use_ema: bool = True, step: int | None = None,
             device: torch.device | str = "cpu") -> LoadedRun:
    """Load the score model of a `qcsbm train` run folder for sampling or evaluation.

    Args:
        workdir: the run folder passed to `qcsbm train --workdir`.
        use_ema: load the EMA weights (the default); False loads the weights that the
            optimizer updates.
        step: load the checkpoint of this step (`checkpoints/ckpt_<step>.pt`); None loads
            the newest one that is complete.
        device: where the model goes.

    Returns:
        A `LoadedRun` with the config, the score model in eval mode, the SDE, the step and
        the data metadata (number of levels for bits per dimension, image shape, scaling).

    Raises:
        UsageError: `workdir` is not a run folder, or it has no checkpoint of `step`.
        CheckpointError: the checkpoint is damaged or does not fit the configured model.
    """
    workdir = Path(workdir)
    if not is_run_dir(workdir):
        raise UsageError(f"run directory {workdir} is not a qcsbm run (it has no run marker); "
                         "pass the --workdir of a `qcsbm train` run")
    manager = CheckpointManager(workdir / CHECKPOINT_DIR_NAME, keep=None)

    if step is None:
        loaded = manager.load_latest()
        if loaded is None:
            raise UsageError(f"run directory {workdir} has no checkpoint yet; wait for the "
                             "first snapshot (training.snapshot_freq) or the end of training")
        path, state = loaded
    else:
        path = manager.path_for(step)
        if not path.is_file():
            steps = [found for found, _ in manager.checkpoints()]
            raise UsageError(f"run directory {workdir} has no checkpoint of step {step}; "
                             f"available steps: {steps or 'none'}")
        state = load_checkpoint(path)

    return _run_from_state(state, path, use_ema=use_ema, device=device)


def _run_from_state(state: dict, path: Path, *, use_ema: bool, device) -> LoadedRun:
    for key in ("config", "model", "ema", "step", "data"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry, so it was not "
                                  "written by `qcsbm train`")
    cfg = from_dict(TrainConfig, state["config"])
    score_model, sde = build_score_model(cfg)

    weights = state["ema"]["state_dict"] if use_ema else state["model"]
    check_state_dict_matches(score_model.net, weights, path)
    score_model.net.load_state_dict(weights)
    score_model.to(device).eval()
    logger.debug("loaded %s weights of step %d from %s", "EMA" if use_ema else "model",
                state["step"], path)
    return LoadedRun(config=cfg, score_model=score_model, sde=sde, step=int(state["step"]),
                     weights="ema" if use_ema else "model", checkpoint_path=path,
                     data=dict(state["data"]))


def data_metadata(dataset, cfg: TrainConfig) -> dict:
    """Describe the training images for `LoadedRun.data` (stored in every checkpoint)."""
    scale, shift = data_scale(cfg.model)
    return {
        "name": dataset.name,
        "num_levels": dataset.num_levels,
        "image_shape": list(dataset.image_shape),
        "num_images": len(dataset),
        "dequantize": cfg.data.dequantize,
        "scale": scale,
        "shift": shift,
        "bits_per_dim_offset": math.log2(dataset.num_levels) - math.log2(scale),
    }
