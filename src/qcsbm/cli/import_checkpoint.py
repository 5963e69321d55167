"""`qcsbm import-checkpoint`: turn a score_sde_pytorch or QCSBM-paper checkpoint into a run.

    qcsbm import-checkpoint PATH --out DIR [--config PRESET_OR_FILE] [--set KEY=VALUE]

The checkpoint is read with `torch.load(..., weights_only=True)` only
(`qcsbm.score_sde_format`), so a file that would run code, or any other file that
weights_only loading rejects, is refused. The `module.` prefix of nn.DataParallel is
removed, the name-less EMA list gets its parameter names, and the training step comes from
"step", else from the EMA's update count (QCSBM-paper checkpoints store no step), else 0.

The configuration is a preset, a qcsbm JSON file, or the JSON form of a score_sde_pytorch
config (sections "model", "data", "training", "optim" with score_sde's key names, as the
NCSN++ fixtures ship it), translated by `config_from_score_sde`. Without --config, a
config.json next to the checkpoint is used. The model that the configuration builds must have
the keys and shapes of the checkpoint's model and EMA state dicts, and the same VE noise
levels in the `sigmas` buffer. Otherwise one error lists the differences.

The run folder gets the qcsbm run marker, config.json and checkpoints/ckpt_<step>.pt with the
model and EMA weights, the step, the optimizer state (Adam moments re-indexed to the
trainable parameters; a fresh optimizer when the file has none) and the data metadata, so
`qcsbm sample`, `qcsbm eval` and `qcsbm train --init-from` can use it. When the configured
training images can be loaded, the checkpoint also contains the data loader position (the
start of epoch 0), the learning-rate schedule at the imported step and random streams
seeded with training.seed, so `qcsbm train --resume` continues from the imported step.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# score_sde_pytorch names of the SDE and of the data sets, and their qcsbm names.
SCORE_SDE_SDE_KINDS = {"vesde": "ve", "vpsde": "vp", "subvpsde": "subvp"}
SCORE_SDE_DATASETS = {"CIFAR10": "cifar10", "CIFAR100": "cifar100", "SVHN": "svhn",
                      "MNIST": "mnist"}

# ModelConfig fields that score_sde_pytorch's `model` section has under the same name.
_SHARED_MODEL_FIELDS = ("name", "nf", "ch_mult", "num_res_blocks", "attn_resolutions",
                        "dropout", "fourier_scale", "fir", "fir_kernel", "skip_rescale",
                        "resblock_type", "progressive", "progressive_input",
                        "progressive_combine", "init_scale", "scale_by_sigma", "conditional",
                        "embedding_type", "num_scales")
_SHARED_OPTIM_FIELDS = ("lr", "beta1", "eps", "weight_decay", "warmup", "grad_clip")

# Relative tolerance when the `sigmas` buffer of the checkpoint is compared with the one the
# configuration builds (both are float64 geometric sequences).
_SIGMAS_RTOL = 1e-6


def add_parser(subparsers) -> None:
    """Register the subcommand."""
    parser = subparsers.add_parser(
        "import-checkpoint", help="turn a score_sde_pytorch / QCSBM-paper checkpoint into a run",
        description="Import a score_sde_pytorch or QCSBM-paper NCSN++ checkpoint (loaded with "
        "weights_only=True) into a qcsbm run folder that `qcsbm sample`, `qcsbm eval` and "
        "`qcsbm train --resume` / `--init-from` can use.",
        epilog="example: qcsbm import-checkpoint checkpoint_60.pth --out runs/cifar10-usbm "
        "--config cifar10-usbm --set data.path=data/cifar10")
    parser.add_argument("path", metavar="PATH", help="the checkpoint file (.pth)")
    parser.add_argument("--out", metavar="DIR", required=True, help="the new run folder")
    parser.add_argument("--config", metavar="PRESET_OR_FILE",
                        help="preset name, qcsbm config JSON or score_sde config JSON "
                        "(default: config.json next to the checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="change one configuration value; repeatable")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier qcsbm run in --out")
    parser.set_defaults(run=run)


def run(args) -> int:
    """Run the subcommand."""
    from qcsbm.config import apply_overrides

    # An occupied --out is reported before the configuration and the data are read, which
    # log their own messages.
    _check_out(Path(args.out), args.overwrite)
    checkpoint = Path(args.path)
    cfg = apply_overrides(load_import_config(args.config, checkpoint), args.overrides)
    result = import_checkpoint(checkpoint, args.out, cfg, overwrite=args.overwrite)
    resume_note = ("; `qcsbm train --resume` continues it" if result["resumable"] else
                   "; --resume needs the training images (set data.dataset / data.path)")
    print(f"qcsbm import-checkpoint: wrote {result['checkpoint']} (step {result['step']})"
          f"{resume_note}", file=sys.stderr)
    return 0


def _check_out(out: Path, overwrite: bool) -> None:
    """Raise UsageError when `out` holds files that `prepare_run_dir` would refuse to replace."""
    from qcsbm.errors import UsageError
    from qcsbm.runs import MARKER_NAME, is_run_dir

    if out.exists() and not out.is_dir():
        raise UsageError(f"run directory {out} exists and is not a directory")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise UsageError(f"run directory {out} exists and is not empty; pass --overwrite to "
                         "replace it or choose another --out")
    if not is_run_dir(out):
        raise UsageError(f"cannot overwrite {out}: it is not empty and has no {MARKER_NAME} "
                         "marker, so it does not look like a qcsbm run; choose another "
                         "directory or empty it yourself")


# --- configuration --------------------------------------------------------------------------

def is_score_sde_config(data) -> bool:
    """Return whether JSON data looks like a score_sde_pytorch config, not a qcsbm one."""
    if not isinstance(data, dict):
        return False
    training, model, section = (data.get(key) for key in ("training", "model", "data"))
    return ((isinstance(training, dict) and "sde" in training)
            or (isinstance(model, dict) and "ema_rate" in model)
            or (isinstance(section, dict) and "centered" in section))


def config_from_score_sde(data: dict) -> dict:
    """Translate a score_sde_pytorch config (as JSON data) to qcsbm `TrainConfig` data.

    The result describes an unconstrained model (training.kind "usbm"); change the kind and
    lambda_qc with --set. Keys that do not shape the model, the SDE or the optimizer are
    ignored. Options that this NCSN++ fixes must have its value.
    """
    from qcsbm.errors import UsageError
    from qcsbm.nets.ncsnpp import FIXED_SCORE_SDE_OPTIONS

    model, source_data = data.get("model", {}), data.get("data", {})
    training, optim = data.get("training", {}), data.get("optim", {})
    for name, implemented in FIXED_SCORE_SDE_OPTIONS.items():
        if name in model and model[name] != implemented:
            raise UsageError(f"unsupported model.{name} {model[name]!r} in the score_sde "
                             f"config; this NCSN++ implements only {implemented!r}")

    result = {"model": {name: model[name] for name in _SHARED_MODEL_FIELDS if name in model},
              "data": {}, "sde": {}, "training": {"kind": "usbm", "lambda_qc": 0.0},
              "optim": {name: optim[name] for name in _SHARED_OPTIM_FIELDS if name in optim}}
    if "centered" in source_data:
        result["model"]["centered"] = source_data["centered"]
    for name in ("image_size", "num_channels", "random_flip"):
        if name in source_data:
            result["data"][name] = source_data[name]
    if "dataset" in source_data:
        if source_data["dataset"] not in SCORE_SDE_DATASETS:
            raise UsageError(f"unknown score_sde data.dataset {source_data['dataset']!r}; "
                             f"expected one of {', '.join(SCORE_SDE_DATASETS)}, or set "
                             "data.dataset in a qcsbm config")
        result["data"]["dataset"] = SCORE_SDE_DATASETS[source_data["dataset"]]

    if "sde" in training:
        if training["sde"] not in SCORE_SDE_SDE_KINDS:
            raise UsageError(f"unknown score_sde training.sde {training['sde']!r}; expected "
                             f"one of {', '.join(SCORE_SDE_SDE_KINDS)}")
        result["sde"]["kind"] = SCORE_SDE_SDE_KINDS[training["sde"]]
    for name in ("sigma_min", "sigma_max", "beta_min", "beta_max"):
        if name in model:
            result["sde"][name] = model[name]
    if "n_iters" in training:
        result["training"]["n_steps"] = training["n_iters"]
    if "snapshot_freq" in training:
        result["training"]["snapshot_freq"] = training["snapshot_freq"]
    if "batch_size" in training:
        result["data"]["batch_size"] = training["batch_size"]
    if "ema_rate" in model:
        result["optim"]["ema_rate"] = model["ema_rate"]
    if result["optim"].get("grad_clip", 1.0) <= 0:
        result["optim"]["grad_clip"] = None  # score_sde clips only for grad_clip >= 0
    return result


def load_import_config(source: str | None, checkpoint: Path):
    """Return the `TrainConfig` of a preset, a qcsbm JSON file or a score_sde JSON config."""
    from qcsbm.config import TrainConfig, from_dict
    from qcsbm.errors import UsageError
    from qcsbm.presets import load_config

    if source is None:
        sibling = checkpoint.parent / "config.json"
        if not sibling.is_file():
            raise UsageError(f"missing --config PRESET_OR_FILE: there is no config.json next "
                             f"to {checkpoint}; pass the preset or config file of the "
                             "checkpoint's architecture")
        logger.info("using the configuration %s next to the checkpoint", sibling)
        source = str(sibling)

    path = Path(source)
    if not path.is_file():
        return load_config(source)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"cannot read config file {path}: {error}") from None
    if not is_score_sde_config(data):
        return load_config(source)
    try:
        return from_dict(TrainConfig, config_from_score_sde(data))
    except UsageError as error:
        raise UsageError(f"in score_sde config file {path}: {error}") from None


# --- the import -----------------------------------------------------------------------------

def import_checkpoint(path, out, cfg, *, overwrite: bool = False) -> dict:
    """Write a run folder at `out` with the weights of the score_sde checkpoint `path`.

    Everything is loaded and checked before the folder is created, so a failure leaves no
    trace. Returns {"workdir", "checkpoint", "step", "resumable"}.

    Raises:
        CheckpointError: the file is missing, unsafe or damaged, or its weights do not fit
            the model of `cfg`.
        UsageError: the run folder exists and is not empty (without `overwrite`).
    """
    from qcsbm.checkpoints import CheckpointManager
    from qcsbm.config import save_json, to_dict
    from qcsbm.models import build_score_model, data_metadata
    from qcsbm.runs import prepare_run_dir
    from qcsbm.score_sde_format import load_score_sde_checkpoint

    loaded = load_score_sde_checkpoint(path)
    score_model, _ = build_score_model(cfg)
    _check_weights(score_model.net, loaded, path)
    step, step_source = _imported_step(loaded)

    dataset = _training_images(cfg)
    state = {
        "step": step,
        "config": to_dict(cfg),
        "model": loaded["model"],
        "ema": {"state_dict": loaded["ema"], "n_averaged": _ema_updates(loaded, cfg)},
        "data": (data_metadata(dataset, cfg) if dataset is not None
                 else _metadata_without_images(cfg)),
        "two_stage_backward": False,
        "skipped_steps": 0,
        "imported_from": {"path": str(Path(path).resolve()), "format": "score_sde",
                          "step_source": step_source},
    }
    state.update(_optimizer_state(score_model, loaded, cfg, step, path))
    state["rng"] = _seeded_rng_state(cfg.training.seed)
    if dataset is not None:
        import torch

        from qcsbm.trainer import make_loader

        state["loader"] = make_loader(dataset, cfg, torch.device("cpu")).state_dict()

    run_dir = prepare_run_dir(out, overwrite=overwrite)
    save_json(cfg, run_dir.config_path)
    manager = CheckpointManager(run_dir.checkpoint_dir, keep=cfg.training.keep_checkpoints)
    checkpoint = manager.save(step, state)
    logger.info("imported %s (step %d from %s) into %s", path, step, step_source, checkpoint)
    return {"workdir": run_dir.path, "checkpoint": checkpoint, "step": step,
            "resumable": dataset is not None}


def _check_weights(net, loaded: dict, path) -> None:
    """Raise CheckpointError unless the model and EMA weights fit `net` (keys, shapes, sigmas)."""
    from qcsbm.checkpoints import check_state_dict_matches
    from qcsbm.errors import CheckpointError

    check_state_dict_matches(net, loaded["model"], path)
    check_state_dict_matches(net, loaded["ema"], path)

    expected = net.state_dict().get("sigmas")
    found = loaded["model"].get("sigmas")
    if expected is not None and found is not None:
        found = found.to(expected.dtype)
        scale = expected.abs().max()
        if float((found - expected).abs().max()) > _SIGMAS_RTOL * float(scale):
            raise CheckpointError(
                f"checkpoint {path} does not match the configuration: its sigmas buffer runs "
                f"from {float(found[0]):g} to {float(found[-1]):g}, the configured model's "
                f"from {float(expected[0]):g} to {float(expected[-1]):g}; set sde.sigma_max "
                "and sde.sigma_min to the checkpoint's values")


def _imported_step(loaded: dict) -> tuple[int, str]:
    if loaded["step"] is not None:
        return int(loaded["step"]), "step"
    if loaded["ema_num_updates"]:
        return int(loaded["ema_num_updates"]), "ema.num_updates"
    logger.warning("the checkpoint stores neither a step nor an EMA update count; importing "
                   "it as step 0")
    return 0, "none"


def _ema_updates(loaded: dict, cfg) -> int:
    """Return the EMA's update count, or the count at which its decay reaches ema_rate.

    score_sde's EMA decay is min(rate, (1 + n) / (10 + n)) after n updates. Without a stored
    count, a count where that equals the rate keeps averaging at the configured rate.
    """
    updates = loaded["ema_num_updates"] or loaded["step"]
    if updates:
        return int(updates)
    rate = cfg.optim.ema_rate
    return max(1, math.ceil((10 * rate - 1) / (1 - rate))) if rate > 0 else 1


def _training_images(cfg):
    """Return the configured training images, or None (with a warning) if they cannot load."""
    from qcsbm.errors import UsageError
    from qcsbm.trainer import load_training_images

    try:
        return load_training_images(cfg)
    except UsageError as error:
        logger.warning("the training images of data.dataset %r cannot be loaded (%s); the run "
                       "can sample, evaluate and start `qcsbm train --init-from`, but "
                       "`--resume` needs them", cfg.data.dataset, error)
        return None


def _metadata_without_images(cfg) -> dict:
    """Describe the training images from the configuration alone (num_images unknown)."""
    from qcsbm.data.images_named import DIGITS_LEVELS
    from qcsbm.models import data_scale

    num_levels = DIGITS_LEVELS if cfg.data.dataset == "digits" else 256
    scale, shift = data_scale(cfg.model)
    return {
        "name": cfg.data.dataset,
        "num_levels": num_levels,
        "image_shape": [cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size],
        "num_images": None,
        "dequantize": cfg.data.dequantize,
        "scale": scale,
        "shift": shift,
        "bits_per_dim_offset": math.log2(num_levels) - math.log2(scale),
    }


def _optimizer_state(score_model, loaded: dict, cfg, step: int, path) -> dict:
    """Return {"optimizer", "scheduler"} in the form `qcsbm train` saves them.

    score_sde's Adam covers every parameter, the frozen Fourier weights included, while
    qcsbm's covers the trainable ones only, so the moments are re-indexed. A state that does
    not fit is replaced by a fresh optimizer, with a warning.
    """
    import torch

    from qcsbm.trainer import make_optimizer

    optimizer, _ = make_optimizer(score_model, cfg)
    converted = _reindex_adam_state(loaded["optimizer"], score_model)
    if converted is not None:
        try:
            optimizer.load_state_dict(converted)
        except (ValueError, KeyError, RuntimeError) as error:
            logger.warning("the optimizer state of %s does not fit the model (%s); the run "
                           "gets a fresh optimizer", path, error)
            optimizer, _ = make_optimizer(score_model, cfg)
    elif loaded["optimizer"] is not None:
        logger.warning("the optimizer state of %s does not cover the model's parameters; the "
                       "run gets a fresh optimizer", path)

    # The run's own settings replace the stored ones, then the warm-up schedule moves to
    # `step` as if it had been stepped that often.
    optim = cfg.optim
    for group in optimizer.param_groups:
        group.update(lr=optim.lr, initial_lr=optim.lr, betas=(optim.beta1, optim.beta2),
                     eps=optim.eps, weight_decay=optim.weight_decay)
    warmup = optim.warmup

    def warmup_factor(index: int) -> float:
        return 1.0 if warmup == 0 else min(1.0, (index + 1) / warmup)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor,
                                                  last_epoch=step - 1 if step > 0 else -1)
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def _reindex_adam_state(state, score_model):
    """Map a score_sde Adam state over all parameters to qcsbm's trainable-only indexing."""
    if not isinstance(state, dict) or len(state.get("param_groups", ())) != 1:
        return None
    parameters = list(score_model.parameters())
    group = dict(state["param_groups"][0])
    if list(group.get("params", ())) != list(range(len(parameters))):
        return None
    trainable = [index for index, p in enumerate(parameters) if p.requires_grad]
    new_index = {old: new for new, old in enumerate(trainable)}
    moments = {new_index[old]: value for old, value in state.get("state", {}).items()
               if old in new_index}
    group["params"] = list(range(len(trainable)))
    return {"state": moments, "param_groups": [group]}


def _seeded_rng_state(seed: int) -> dict:
    """Capture random streams seeded with `seed`, without changing this process's streams."""
    import random

    import numpy as np
    import torch

    from qcsbm.checkpoints import capture_rng_state

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            return capture_rng_state(torch_generator=torch.Generator().manual_seed(seed))
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
