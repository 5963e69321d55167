"""The training loop of `qcsbm train`: image models, checkpoints, exact resume, fine-tuning.

`train(cfg, workdir)` checks everything that can fail (configuration, data, initial weights,
run folder) before it writes anything, then trains for `cfg.training.n_steps` optimizer
steps. Each step draws one batch of `data.batch_size` images, splits it into
`training.accumulate` micro-batches, accumulates their gradients (each scaled by 1/K), clips
the global gradient norm, takes an Adam step with linear warm-up and updates the EMA.

Run folder (see `qcsbm.runs`):

    config.json             the resolved configuration
    checkpoints/ckpt_<step>.pt, latest.json
    metrics.jsonl           one JSON object per logged step (log_freq), and one per skipped step
    tensorboard/            the same scalars, when the `tensorboard` package is installed

A checkpoint (`qcsbm.checkpoints` format) holds: "step", "config", "model" (the network's
state dict), "ema" ({"state_dict", "n_averaged"}), "optimizer", "scheduler", "loader" (the
data position), "rng" (every random stream, the step generator included), "data" (metadata
of the training images, see `qcsbm.models.LoadedRun`), "two_stage_backward" and
"skipped_steps". Resuming restores all of it, so on the CPU a resumed run ends with the
same weights, bit for bit, as an uninterrupted one.

Randomness: the model is initialized after `torch.manual_seed(training.seed)`. Diffusion
times t, noise z and Hutchinson probes come from one `torch.Generator` seeded with
`training.seed`, and dropout uses torch's global stream. For one optimizer step, t and z are
drawn for the whole batch before it is split, so accumulation over K micro-batches gives the
same DSM gradient as one batch (up to float rounding). Probes are drawn per micro-batch, so
with a Hutchinson penalty the accumulated gradient equals a one-batch gradient in expectation
only, and `penalty_fraction` < 1 applies per micro-batch.

Stopping: SIGTERM or SIGINT finishes the current step, writes a checkpoint and returns a
`TrainResult` with status "stopped". A non-finite loss, penalty or gradient norm raises
`NonFiniteError` naming the step, the term and the noise levels, and the last checkpoint
stays as it is. With `training.on_nonfinite` "skip" the step is skipped instead.

Mixed precision ("bf16", CUDA only): the DSM forward pass runs under bfloat16 autocast
(`qcsbm.distributed.autocast_qc_loss`), while the asymmetry penalty gets its own float32
forward pass of the penalized samples. The penalty is a difference of Jacobian traces that
nearly cancel for a nearly conservative field, and bfloat16's 8-bit mantissa would bury it in
rounding error. The two-stage backward has no autocast path and raises UsageError with bf16.
On the CPU, "bf16" raises UsageError.

Distributed training: under torchrun (`torchrun --nproc_per_node N -m qcsbm train ...`) each
process joins the process group (see `qcsbm.distributed`) and wraps the score model in
DistributedDataParallel. Each rank loads data.batch_size / N images of every step, so
data.batch_size stays the global batch and must be divisible by N * training.accumulate.
The step generator is the same on every rank: it draws t and z for the global batch and each
rank takes its rows, so rank 0's checkpoint resumes any number of ranks. With N > 1 the probes
come from a generator seeded with (training.seed, rank, step), so that ranks draw different
probes without a saved state. Only rank 0 writes files, and a signal stops every rank after the
same step. Resuming with another N continues at the saved epoch and batch position with the
new N's shards, so the rest of that epoch visits other images than an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from qcsbm import distributed
from qcsbm.checkpoints import (CheckpointManager, capture_rng_state, check_state_dict_matches,
                               load_checkpoint, restore_rng_state)
from qcsbm.config import (TrainConfig, apply_overrides, from_dict, load_json, save_json,
                          to_dict, validate_config)
from qcsbm.data.images import ImageDataset, ImageLoader, load_images
from qcsbm.devices import check_device, default_device
from qcsbm.errors import CheckpointError, NonFiniteError, UsageError
from qcsbm.losses import LossTerms, Objective, backward_two_stage, qc_loss
from qcsbm.models import build_score_model, data_metadata, data_scale
from qcsbm.runs import CONFIG_NAME, GracefulStop, RunDir, prepare_run_dir
from qcsbm.score_sde_format import load_score_sde_checkpoint
from qcsbm.sde import SDE
from qcsbm.training import clip_and_check, make_ema

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR_NAME = "tensorboard"

#: Keys that `--set` may change when a run is resumed. Every other key fixes the model, the
#: data stream or the optimization, so changing it would not continue the same run.
RESUMABLE_KEYS = ("training.n_steps", "training.log_freq", "training.snapshot_freq",
                  "training.keep_checkpoints", "training.on_nonfinite", "data.path",
                  "data.num_workers")

#: With on_nonfinite "skip", this many skipped steps in a row stop the run anyway.
MAX_CONSECUTIVE_SKIPS = 20

# Sources of image files, which take no split (load_images points root at the split's files).
_FILE_SOURCES = ("npz", "folder")


# --- results and state ------------------------------------------------------------------

@dataclasses.dataclass
class StepResult:
    """Scalars of one optimizer step (averages over its micro-batches)."""

    loss: float
    dsm: float
    penalty: float
    grad_norm: float
    lr: float


@dataclasses.dataclass
class TrainResult:
    """Outcome of a `train` call.

    status is "finished" (n_steps reached) or "stopped" (by `stop_signal`, after writing a
    checkpoint). seconds_per_step averages the optimizer steps of this call, without data
    loading and checkpoints.
    """

    workdir: Path
    step: int
    status: str
    stop_signal: str | None
    checkpoint_path: Path | None
    seconds_per_step: float
    skipped_steps: int


@dataclasses.dataclass
class TrainingState:
    """Everything a checkpoint restores: weights, optimizer, data position and randomness."""

    score_model: nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: ImageLoader
    generator: torch.Generator
    step: int = 0
    skipped_steps: int = 0


@dataclasses.dataclass
class StepSettings:
    """The fixed ingredients of `training_step`."""

    sde: SDE
    objective: Objective
    accumulate: int = 1
    two_stage_backward: bool = False
    grad_clip: float | None = 1.0
    on_nonfinite: str = "stop"
    rank: int = 0              # this process's rank and the number of processes (DDP)
    world_size: int = 1
    seed: int = 0              # training.seed, from which ranks derive their probe streams
    mixed_precision: str = "no"  # "bf16": DSM under autocast, the penalty in float32


# --- configuration ------------------------------------------------------------------------

def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def check_resume_changes(saved: TrainConfig, requested: TrainConfig) -> None:
    """Raise UsageError if `requested` changes a key outside `RESUMABLE_KEYS` of `saved`."""
    old, new = _flatten(to_dict(saved)), _flatten(to_dict(requested))
    changed = [key for key in old if old[key] != new[key] and key not in RESUMABLE_KEYS
               and not key.startswith("eval.")]
    if changed:
        key = changed[0]
        raise UsageError(f"cannot change {key} from {old[key]!r} to {new[key]!r} when "
                         f"resuming; only {', '.join(RESUMABLE_KEYS)} and eval.* may change "
                         "(start a new run with --init-from to change the others)")


def resume_config(workdir, overrides: Iterable[str] = (),
                  requested: TrainConfig | None = None) -> TrainConfig:
    """Return the configuration to resume the run in `workdir` with.

    Reads the run's config.json and applies `overrides` ("KEY=VALUE", as `--set`). A
    `requested` configuration (from `--config`) must agree with the saved one outside
    `RESUMABLE_KEYS`. Raises UsageError for a missing config.json or a forbidden change.
    """
    path = Path(workdir) / CONFIG_NAME
    if not path.is_file():
        raise UsageError(f"cannot resume: {path} not found; drop --resume to start a new run")
    saved = load_json(TrainConfig, path)

    base = saved if requested is None else requested
    cfg = apply_overrides(base, list(overrides))
    check_resume_changes(saved, cfg)
    return cfg


def resolve_device(device, cfg: TrainConfig) -> torch.device:
    """Return the training device: `device`, else CUDA when available, else the CPU."""
    device = default_device() if device is None else check_device(device)
    if cfg.training.mixed_precision == "bf16" and device.type != "cuda":
        raise UsageError(f"invalid training.mixed_precision 'bf16' on device {device}; "
                         "bfloat16 autocast is supported on CUDA only, use 'no' on the CPU")
    return device


# --- data --------------------------------------------------------------------------------

def load_training_images(cfg: TrainConfig) -> ImageDataset:
    """Load the images of `cfg.data` and check their shape against the configuration."""
    data = cfg.data
    split = None if data.dataset in _FILE_SOURCES else data.split
    dataset = load_images(data.dataset, root=data.path, split=split, channels=data.num_channels)

    _, height, width = dataset.image_shape
    if (height, width) != (data.image_size, data.image_size):
        raise UsageError(f"data set {dataset.name} has images of {height}x{width} pixels, but "
                         f"data.image_size is {data.image_size}; set data.image_size to match")
    if data.num_workers > 0:
        logger.warning("data.num_workers %d is ignored: the images are in memory and batches "
                       "are drawn in the training process", data.num_workers)
    return dataset


def make_loader(dataset: ImageDataset, cfg: TrainConfig, device: torch.device, *,
                rank: int = 0, world_size: int = 1) -> ImageLoader:
    """Build the resumable batch iterator of the training images (seeded by training.seed)."""
    batch_size = distributed.rank_batch_size(cfg.data.batch_size, world_size,
                                             cfg.training.accumulate)
    return ImageLoader(dataset, batch_size, seed=cfg.training.seed,
                       flip=cfg.data.random_flip, dequantize=cfg.data.dequantize, rank=rank,
                       world_size=world_size, device=device)


# --- optimizer ---------------------------------------------------------------------------

def make_optimizer(model: nn.Module, cfg: TrainConfig):
    """Return (Adam, warm-up LambdaLR) from `cfg.optim`.

    The learning rate ramps linearly, lr * min(1, (step + 1) / warmup), as in
    `qcsbm.training.make_optimizer`, which this replaces because it fixes beta2 at 0.999.
    """
    optim = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                 eps=optim.eps, weight_decay=optim.weight_decay)
    warmup = optim.warmup

    def warmup_factor(step: int) -> float:
        return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor)


def make_objective(cfg: TrainConfig) -> Objective:
    """Build the loss settings of `cfg.training`."""
    training = cfg.training
    return Objective(lambda_qc=training.lambda_qc, estimator=training.estimator,
                     num_probes=training.num_probes, probe=training.probe,
                     penalty_fraction=training.penalty_fraction, weighting=training.weighting,
                     jvp=training.jvp)


# --- initial weights (fine-tuning) -------------------------------------------------------

def _ema_updates_at_full_rate(rate: float) -> int:
    """Smallest n with (1 + n) / (10 + n) >= rate: the EMA decay is `rate` from then on."""
    return max(1, math.ceil((10 * rate - 1) / (1 - rate))) if rate > 0 else 1


def load_initial_weights(path, ema_rate: float) -> dict:
    """Read the weights that start a fine-tuning run from a qcsbm or score_sde checkpoint.

    Accepts a `qcsbm train` checkpoint or a score_sde_pytorch / QCSBM-paper checkpoint.
    Returns {"model", "ema", "n_averaged", "optimizer", "step", "format"}. n_averaged
    counts the EMA updates so far. Where the file stores no count, it is the count at which
    the EMA decay reaches `ema_rate`, so the loaded EMA keeps averaging at that rate instead
    of being replaced by the first update.
    """
    try:
        state = load_checkpoint(path)
    except CheckpointError as qcsbm_error:
        try:
            loaded = load_score_sde_checkpoint(path)
        except CheckpointError as score_sde_error:
            raise CheckpointError(f"cannot read --init-from {path} as a qcsbm checkpoint "
                                  f"({qcsbm_error}) or as a score_sde_pytorch checkpoint "
                                  f"({score_sde_error})") from None
        # score_sde's EMA update number k decays by (1 + k) / (10 + k), and make_ema's
        # update after n_averaged = k does the same, so the count continues as k + 1.
        updates = loaded["ema_num_updates"] or loaded["step"]
        return {"model": loaded["model"], "ema": loaded["ema"],
                "n_averaged": int(updates) + 1 if updates else _ema_updates_at_full_rate(ema_rate),
                "optimizer": loaded["optimizer"], "step": loaded["step"],
                "format": "score_sde"}

    for key in ("model", "ema", "optimizer", "step"):
        if key not in state:
            raise CheckpointError(f"cannot use --init-from {path}: the checkpoint has no "
                                  f"{key!r} entry, so it was not written by `qcsbm train`")
    return {"model": state["model"], "ema": state["ema"]["state_dict"],
            "n_averaged": max(1, int(state["ema"]["n_averaged"])),
            "optimizer": state["optimizer"], "step": int(state["step"]), "format": "qcsbm"}


def _check_initial_weights(initial: dict, net: nn.Module, path) -> None:
    check_state_dict_matches(net, initial["model"], path)
    check_state_dict_matches(net, initial["ema"], path)


def _apply_initial_weights(state: TrainingState, initial: dict, cfg: TrainConfig,
                           init_optimizer: bool, path) -> None:
    net = state.score_model.net
    net.load_state_dict(initial["model"])
    state.ema.module.net.load_state_dict(initial["ema"])
    state.ema.n_averaged.fill_(initial["n_averaged"])

    if init_optimizer:
        if initial["optimizer"] is None:
            raise CheckpointError(f"cannot use --init-optimizer: {path} stores no optimizer")
        try:
            state.optimizer.load_state_dict(initial["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"the optimizer state in {path} does not fit the model's "
                                  f"parameters: {error}") from None
        # The run's own settings replace the stored ones; only the moment estimates remain.
        for group in state.optimizer.param_groups:
            group.update(lr=cfg.optim.lr * state.scheduler.lr_lambdas[0](0),
                         initial_lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                         eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    logger.info("initialized model and EMA weights from %s (%s checkpoint of step %s)%s", path,
                initial["format"], initial["step"],
                ", with its optimizer state" if init_optimizer else "")


# --- one optimizer step ------------------------------------------------------------------

def draw_time_and_noise(sde: SDE, x0: torch.Tensor, generator: torch.Generator):
    """Draw t ~ U(t_min, 1) of shape (B,) and z ~ N(0, I) of x0's shape, as `perturb_batch`."""
    u = torch.rand(x0.shape[0], generator=generator, device=generator.device, dtype=x0.dtype)
    t = (sde.t_min + (sde.t_max - sde.t_min) * u).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype)
    return t, noise.to(x0.device)


def _check_finite(terms: LossTerms, step: int) -> None:
    """Raise NonFiniteError naming the step, the term and the noise levels where it failed."""
    for name, values in (("DSM loss", terms.dsm), ("QC penalty", terms.penalty)):
        bad = ~torch.isfinite(values.detach())
        if bad.any():
            stds = terms.std[: values.shape[0]][bad].tolist()[:4]
            raise NonFiniteError(f"step {step}: the {name} is non-finite at noise levels "
                                 f"(std) {', '.join(f'{s:.4g}' for s in stds)}")


def _draw_rank_time_and_noise(settings: StepSettings, batch: torch.Tensor,
                              generator: torch.Generator):
    """Draw t and z for the global batch of all ranks and return this rank's rows."""
    size = batch.shape[0]
    global_batch = batch.new_empty((size * settings.world_size, *batch.shape[1:]))
    t, noise = draw_time_and_noise(settings.sde, global_batch, generator)
    rows = slice(settings.rank * size, (settings.rank + 1) * size)
    return t[rows], noise[rows]


def _micro_batch_backward(model, settings: StepSettings, x0, t, noise, generator, scale: float,
                          step: int) -> LossTerms:
    """Backpropagate the objective of one micro-batch, times `scale`, into the .grad fields."""
    if settings.two_stage_backward:
        terms = backward_two_stage(model, settings.sde, x0, settings.objective, t=t,
                                   noise=noise, generator=generator, loss_scale=scale)
        _check_finite(terms, step)
        return terms

    if settings.mixed_precision == "bf16":
        # NOTE: this path has not run on a GPU yet; CPU tests cover only its rejection.
        terms = distributed.autocast_qc_loss(model, settings.sde, x0, settings.objective, t=t,
                                             noise=noise, generator=generator,
                                             dtype=torch.bfloat16, device_type="cuda")
    else:
        terms = qc_loss(model, settings.sde, x0, settings.objective, t=t, noise=noise,
                        generator=generator)
    _check_finite(terms, step)
    (terms.total * scale).backward()
    return terms


def training_step(model: nn.Module, batch: torch.Tensor, state: TrainingState,
                  settings: StepSettings, step: int) -> StepResult:
    """Run optimizer step number `step` on `batch`: accumulate, clip, Adam, warm-up, EMA.

    `model` computes the forward pass; it is `state.score_model` or a wrapper around it
    (DistributedDataParallel). Raises NonFiniteError before the optimizer step when a loss
    term or the gradient norm is not finite, leaving the weights unchanged.
    """
    state.optimizer.zero_grad(set_to_none=True)
    t, noise = _draw_rank_time_and_noise(settings, batch, state.generator)
    probe_generator = state.generator
    if settings.world_size > 1:
        probe_generator = distributed.rank_generator(settings.seed, settings.rank, step,
                                                     device=state.generator.device)
    scale = 1.0 / settings.accumulate
    contexts = distributed.micro_batch_contexts(model, settings.accumulate,
                                                two_stage=settings.two_stage_backward)

    # Micro-batches share the step's t and z, so K of them match one batch of B images.
    totals, dsms, penalties = [], [], []
    # Under DDP the contexts all-reduce the gradients once, after the last micro-batch.
    for x0, t_part, z_part, context in zip(batch.chunk(settings.accumulate),
                                           t.chunk(settings.accumulate),
                                           noise.chunk(settings.accumulate), contexts):
        with context:
            terms = _micro_batch_backward(model, settings, x0, t_part, z_part,
                                          probe_generator, scale, step)
        totals.append(terms.total.detach())
        dsms.append(terms.dsm.detach().mean())
        if terms.penalty.numel():
            penalties.append(terms.penalty.detach().mean())

    if settings.two_stage_backward:
        distributed.average_gradients(model)

    # Clip, then update the weights, the learning rate and the EMA.
    grad_clip = settings.grad_clip if settings.grad_clip is not None else 0.0
    grad_norm = clip_and_check(state.score_model, grad_clip, step)
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    state.scheduler.step()
    state.ema.update_parameters(state.score_model)

    penalty = float(torch.stack(penalties).mean()) if penalties else 0.0
    return StepResult(loss=float(torch.stack(totals).mean()), dsm=float(torch.stack(dsms).mean()),
                      penalty=penalty, grad_norm=grad_norm, lr=lr)


# --- checkpoints -------------------------------------------------------------------------

def checkpoint_state(state: TrainingState, cfg: TrainConfig, data: dict,
                     two_stage_backward: bool) -> dict:
    """Collect the checkpoint of `state` (see the module docstring for its entries)."""
    return {
        "step": state.step,
        "config": to_dict(cfg),
        "model": state.score_model.net.state_dict(),
        "ema": {"state_dict": state.ema.module.net.state_dict(),
                "n_averaged": int(state.ema.n_averaged)},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "loader": state.loader.state_dict(),
        "rng": capture_rng_state(torch_generator=state.generator),
        "data": data,
        "two_stage_backward": two_stage_backward,
        "skipped_steps": state.skipped_steps,
    }


def restore_state(state: TrainingState, saved: dict, path) -> None:
    """Load a checkpoint written by `checkpoint_state` into `state`, in place."""
    net = state.score_model.net
    check_state_dict_matches(net, saved["model"], path)
    net.load_state_dict(saved["model"])
    state.ema.module.net.load_state_dict(saved["ema"]["state_dict"])
    state.ema.n_averaged.fill_(int(saved["ema"]["n_averaged"]))
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.loader.load_state_dict(_loader_state_for(state.loader, saved["loader"]))
    restore_rng_state(saved["rng"], torch_generator=state.generator)
    state.step = int(saved["step"])
    state.skipped_steps = int(saved.get("skipped_steps", 0))


def _loader_state_for(loader: ImageLoader, saved: dict) -> dict:
    """Return a saved loader position for `loader`, which may run on another number of ranks.

    With the same global batch, batch_index counts the same global batches for any number of
    ranks, so the position carries over. Only the shards of the rest of the epoch change.
    """
    if saved.get("world_size") == loader.world_size:
        return saved
    global_batch = saved.get("batch_size", 0) * saved.get("world_size", 0)
    if global_batch != loader.batch_size * loader.world_size:
        return saved   # load_state_dict names the mismatch

    logger.warning("resuming a run of %d processes with %d; the rest of epoch %d visits "
                   "other images than an uninterrupted run would", saved["world_size"],
                   loader.world_size, saved["epoch"])
    adapted = {**saved, "world_size": loader.world_size, "batch_size": loader.batch_size}
    if adapted["batch_index"] >= loader.batches_per_epoch:
        adapted.update(epoch=adapted["epoch"] + 1, batch_index=0)
    return adapted


# --- logs --------------------------------------------------------------------------------

class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and, if available, to TensorBoard."""

    def __init__(self, workdir: Path, *, enabled: bool, resumed_step: int | None):
        self.path = workdir / METRICS_NAME
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resumed_step is not None:
            self._drop_after(resumed_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.debug("tensorboard is not installed; writing %s only", self.path)
        else:
            self.writer = SummaryWriter(str(workdir / TENSORBOARD_DIR_NAME),
                                        purge_step=resumed_step)

    def _drop_after(self, step: int) -> None:
        """Remove lines of steps after the checkpoint a resumed run continues from.

        A line that is not valid JSON is dropped with a warning: a process killed while it
        appended a record leaves such a partial last line.
        """
        if not self.path.is_file():
            return
        kept = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                logger.warning("dropping line %d of %s, which is not valid JSON (a write "
                               "interrupted by a kill leaves such a line)", number, self.path)
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- the loop ----------------------------------------------------------------------------

def train(cfg: TrainConfig, workdir, *, resume: bool = False, overwrite: bool = False,
          init_from=None, init_optimizer: bool = False, two_stage_backward: bool = False,
          progress: bool = True, device=None, rank: int = 0, world_size: int = 1,
          wrap_model: Callable[[nn.Module], nn.Module] | None = None) -> TrainResult:
    """Train the image score model of `cfg` in the run folder `workdir`.

    Args:
        cfg: the configuration (from a preset or a file, see `qcsbm.presets`). For `resume`
            pass the run's own (see `resume_config`); it must agree with the checkpoint's
            outside `RESUMABLE_KEYS`.
        workdir: the run folder; created if missing (see `qcsbm.runs.prepare_run_dir`).
        resume: continue from the newest complete checkpoint in `workdir`.
        overwrite: delete an earlier run in `workdir` first.
        init_from: a qcsbm or score_sde_pytorch checkpoint whose model and EMA weights start
            the run (fine-tuning); defaults to `cfg.training.init_from`. The step count
            starts at 0 either way.
        init_optimizer: also load the optimizer state of `init_from` (Adam's moments);
            otherwise the optimizer starts fresh.
        two_stage_backward: backpropagate the Hutchinson penalty in two stages, as the
            code of Chao et al. (ICML 2023) does (`qcsbm.losses.backward_two_stage`), which needs estimator
            "hutchinson". The default single backward gives the same gradients.
        progress: show a tqdm bar with the loss and the penalty.
        device: "cpu", "cuda", ...; None picks CUDA when available.
        rank, world_size: this process's place in distributed training; rank 0 writes.
            Left at 0 and 1 under torchrun, they come from the environment.
        wrap_model: applied to the score model to get the module that runs the forward
            pass (for example DistributedDataParallel). Under torchrun, with rank and
            world_size left at 0 and 1, `train` joins the process group itself and wraps the
            model with `qcsbm.distributed.wrap_model`.

    Raises:
        UsageError: invalid configuration, data, initial checkpoint or run folder; nothing
            is written then.
        NonFiniteError: a non-finite loss term or gradient norm (see the module docstring).
    """
    if cfg.training.mixed_precision == "bf16" and two_stage_backward:
        raise UsageError("invalid training.mixed_precision 'bf16' with the two-stage backward; "
                         "use 'no', or a single-backward estimator")
    context = None
    if world_size == 1 and wrap_model is None and distributed.launched_by_torchrun():
        context = distributed.init_distributed(resolve_device(device, cfg))
        device, rank, world_size = context.device, context.rank, context.world_size
        wrap_model = functools.partial(distributed.wrap_model, context=context)
    try:
        return _train_process(cfg, workdir, resume=resume, overwrite=overwrite,
                              init_from=init_from, init_optimizer=init_optimizer,
                              two_stage_backward=two_stage_backward, progress=progress,
                              device=device, rank=rank, world_size=world_size,
                              wrap_model=wrap_model)
    finally:
        if context is not None:
            distributed.cleanup_distributed()


def _train_process(cfg: TrainConfig, workdir, *, resume: bool, overwrite: bool, init_from,
                   init_optimizer: bool, two_stage_backward: bool, progress: bool, device,
                   rank: int, world_size: int, wrap_model) -> TrainResult:
    """Run `train` in this process: one rank of a distributed job, or all of the training."""
    is_main_process = rank == 0
    if init_from is not None:
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training,
                                                                    init_from=str(init_from)))
    validate_config(cfg)
    _check_options(cfg, resume=resume, overwrite=overwrite, init_optimizer=init_optimizer,
                   two_stage_backward=two_stage_backward)
    device = resolve_device(device, cfg)

    # Everything that can fail on bad input happens before the run folder is touched.
    dataset = load_training_images(cfg)
    torch.manual_seed(cfg.training.seed)
    score_model, sde = build_score_model(cfg)
    initial = None
    if cfg.training.init_from is not None and not resume:
        initial = load_initial_weights(cfg.training.init_from, cfg.optim.ema_rate)
        _check_initial_weights(initial, score_model.net, cfg.training.init_from)
    state = _make_state(score_model, cfg, dataset, device, rank=rank, world_size=world_size)
    if world_size > 1 and cfg.training.on_nonfinite == "skip":
        raise UsageError("training.on_nonfinite 'skip' works in a single process only: a rank "
                         "that skips would leave the others waiting in the gradient "
                         "all-reduce; use 'stop' with torchrun")
    if is_main_process:
        run = prepare_run_dir(workdir, resume=resume, overwrite=overwrite)
    else:
        run = RunDir(path=Path(workdir), resumed=resume)
    # The other ranks read the folder only after rank 0 has prepared it.
    distributed.barrier()

    # Start: either the checkpoint of a resumed run or fresh (optionally fine-tuned) weights.
    manager = CheckpointManager(run.checkpoint_dir, keep=cfg.training.keep_checkpoints)
    if resume:
        _resume(state, manager, cfg, two_stage_backward)
    elif initial is not None:
        _apply_initial_weights(state, initial, cfg, init_optimizer, cfg.training.init_from)
    if is_main_process:
        save_json(cfg, run.config_path)

    model = wrap_model(state.score_model) if wrap_model is not None else state.score_model
    settings = StepSettings(sde=sde, objective=make_objective(cfg),
                            accumulate=cfg.training.accumulate,
                            two_stage_backward=two_stage_backward,
                            grad_clip=cfg.optim.grad_clip, on_nonfinite=cfg.training.on_nonfinite,
                            rank=rank, world_size=world_size, seed=cfg.training.seed,
                            mixed_precision=cfg.training.mixed_precision)
    metrics = MetricsLog(run.path, enabled=is_main_process,
                         resumed_step=state.step if resume else None)

    try:
        return _loop(model, state, settings, cfg, manager, metrics,
                     data=data_metadata(dataset, cfg), progress=progress and is_main_process,
                     is_main_process=is_main_process, workdir=run.path)
    finally:
        metrics.close()


def _check_options(cfg: TrainConfig, *, resume: bool, overwrite: bool, init_optimizer: bool,
                   two_stage_backward: bool) -> None:
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other; pass only one")
    if two_stage_backward and cfg.training.estimator != "hutchinson":
        raise UsageError(f"the two-stage backward needs training.estimator 'hutchinson', not "
                         f"{cfg.training.estimator!r}; set it or drop --two-stage-backward")
    if init_optimizer and cfg.training.init_from is None:
        raise UsageError("--init-optimizer needs a checkpoint to start from; pass --init-from")
    if resume and init_optimizer:
        raise UsageError("--init-optimizer applies to new runs only; a resumed run restores "
                         "its own optimizer")


def _make_state(score_model: nn.Module, cfg: TrainConfig, dataset: ImageDataset,
                device: torch.device, *, rank: int, world_size: int) -> TrainingState:
    score_model.to(device).train()
    ema = make_ema(score_model, cfg.optim.ema_rate)
    optimizer, scheduler = make_optimizer(score_model, cfg)
    loader = make_loader(dataset, cfg, device, rank=rank, world_size=world_size)
    generator = torch.Generator(device=device).manual_seed(cfg.training.seed)
    return TrainingState(score_model=score_model, ema=ema, optimizer=optimizer,
                         scheduler=scheduler, loader=loader, generator=generator)


def _resume(state: TrainingState, manager: CheckpointManager, cfg: TrainConfig,
            two_stage_backward: bool) -> None:
    loaded = manager.load_latest()
    if loaded is None:
        raise UsageError(f"cannot resume: {manager.directory} has no checkpoint")
    path, saved = loaded
    check_resume_changes(from_dict(TrainConfig, saved["config"]), cfg)
    if bool(saved.get("two_stage_backward", False)) != two_stage_backward:
        logger.warning("the run was %s the two-stage backward and now continues %s it; the "
                       "gradients agree up to rounding, so the result is not bit-identical",
                       "trained with" if saved.get("two_stage_backward") else "trained without",
                       "with" if two_stage_backward else "without")
    restore_state(state, saved, path)
    logger.info("resumed from %s at step %d", path, state.step)


def _loop(model, state: TrainingState, settings: StepSettings, cfg: TrainConfig,
          manager: CheckpointManager, metrics: MetricsLog, *, data: dict, progress: bool,
          is_main_process: bool, workdir: Path) -> TrainResult:
    training = cfg.training
    scale, shift = data_scale(cfg.model)
    last_saved = manager.latest_path() if state.step > 0 else None
    consecutive_skips = 0
    step_seconds = 0.0
    steps_run = 0

    def save() -> Path | None:
        if not is_main_process:
            return manager.path_for(state.step)   # the file that rank 0 writes
        path = manager.save(state.step, checkpoint_state(state, cfg, data,
                                                         settings.two_stage_backward))
        logger.info("saved checkpoint %s", path)
        return path

    bar = tqdm(total=training.n_steps, initial=state.step, desc="train", disable=not progress,
               dynamic_ncols=True)
    with GracefulStop() as stop, bar:
        while state.step < training.n_steps:
            step = state.step + 1
            batch = next(state.loader) * scale + shift
            start = time.perf_counter()
            try:
                result = training_step(model, batch, state, settings, step)
                consecutive_skips = 0
            except NonFiniteError as error:
                state.optimizer.zero_grad(set_to_none=True)
                consecutive_skips += 1
                _skip_or_stop(error, settings, consecutive_skips, last_saved)
                state.skipped_steps += 1
                result = None
                metrics.write({"step": step, "skipped": True, "error": str(error)})
            state.step = step
            step_seconds += time.perf_counter() - start
            steps_run += 1
            bar.update(1)

            if result is not None and is_main_process:
                _report(result, step, training, bar, metrics, step_seconds / steps_run)
            if step % training.snapshot_freq == 0 or step == training.n_steps:
                last_saved = save() or last_saved
            # Every rank stops after the same step, even if the signal reached only some.
            if distributed.any_rank(stop.stop_requested, state.generator.device):
                if last_saved is None or manager.path_for(step) != last_saved:
                    last_saved = save() or last_saved
                received = stop.received or "a signal to another rank"
                logger.warning("stopped at step %d of %d after %s; resume with --resume",
                               step, training.n_steps, received)
                return TrainResult(workdir, step, "stopped", received, last_saved,
                                   step_seconds / max(steps_run, 1), state.skipped_steps)

    if last_saved is None or manager.path_for(state.step) != last_saved:
        last_saved = save() or last_saved
    return TrainResult(workdir, state.step, "finished", None, last_saved,
                       step_seconds / max(steps_run, 1), state.skipped_steps)


def _skip_or_stop(error: NonFiniteError, settings: StepSettings, consecutive_skips: int,
                  last_saved: Path | None) -> None:
    """Log a skipped non-finite step, or raise NonFiniteError if the run must stop."""
    if settings.on_nonfinite == "skip" and consecutive_skips < MAX_CONSECUTIVE_SKIPS:
        logger.warning("%s; skipping the step (training.on_nonfinite 'skip', %d in a row, the "
                       "run stops at %d)", error, consecutive_skips, MAX_CONSECUTIVE_SKIPS)
        return

    kept = (f"the last checkpoint {last_saved} is kept" if last_saved
            else "no checkpoint was written yet")
    reason = (f" after {MAX_CONSECUTIVE_SKIPS} non-finite steps in a row"
              if settings.on_nonfinite == "skip" else "")
    raise NonFiniteError(f"{error}; training stopped{reason} and {kept}") from None


def _report(result: StepResult, step: int, training, bar, metrics: MetricsLog,
            seconds_per_step: float) -> None:
    if step % training.log_freq and step != 1 and step != training.n_steps:
        return
    bar.set_postfix(loss=f"{result.loss:.4g}", penalty=f"{result.penalty:.3g}")
    logger.info("step %d/%d: loss %.4g (DSM %.4g, penalty %.3g), grad norm %.3g, lr %.3g, "
                "%.3f s/step", step, training.n_steps, result.loss, result.dsm, result.penalty,
                result.grad_norm, result.lr, seconds_per_step)
    metrics.write({"step": step, **dataclasses.asdict(result),
                   "seconds_per_step": seconds_per_step})
