"""The minimal training step and loop shared by the studies and the image trainer.

Adam with linear learning-rate warm-up, gradient-norm clipping, and an exponential moving
average (EMA) of the weights with the warm-up decay min(rate, (1 + n) / (10 + n)) after n
updates (the schedule of score_sde_pytorch's ExponentialMovingAverage).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from qcsbm.errors import NonFiniteError, UsageError
from qcsbm.losses import LossTerms, Objective, backward_two_stage, qc_loss
from qcsbm.sde import SDE

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class OptimSettings:
    """Optimizer settings: Adam, warm-up steps, gradient clipping and EMA rate."""

    lr: float = 2e-4
    beta1: float = 0.9
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 0              # linear warm-up of the learning rate over this many steps
    grad_clip: float = 1.0       # max global gradient norm; <= 0 disables clipping
    ema_rate: float = 0.999      # 0 disables the EMA (the EMA model then equals the model)

    def __post_init__(self):
        if not self.lr > 0:
            raise UsageError(f"invalid lr {self.lr!r}; expected a number > 0")
        if not 0.0 <= self.ema_rate < 1.0:
            raise UsageError(f"invalid ema_rate {self.ema_rate!r}; expected 0 <= ema_rate < 1")
        if self.warmup < 0:
            raise UsageError(f"invalid warmup {self.warmup!r}; expected an integer >= 0")


def make_optimizer(model: nn.Module, settings: OptimSettings):
    """Return (Adam optimizer, LambdaLR warm-up scheduler) for the model's parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.lr, betas=(settings.beta1, 0.999),
                                 eps=settings.eps, weight_decay=settings.weight_decay)
    warmup = settings.warmup

    def warmup_factor(step: int) -> float:
        return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor)


def make_ema(model: nn.Module, rate: float) -> AveragedModel:
    """Return an EMA copy of the model with the warm-up decay min(rate, (1 + n) / (10 + n))."""

    def ema_update(averaged: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
        n = int(num_averaged)
        decay = min(rate, (1.0 + n) / (10.0 + n))
        return averaged + (1.0 - decay) * (current - averaged)

    return AveragedModel(model, avg_fn=ema_update)


@dataclasses.dataclass
class StepResult:
    """Scalars of one optimisation step."""

    loss: float
    dsm: float
    penalty: float
    grad_norm: float
    skipped: bool = False


def _check_finite(terms: LossTerms, step: int) -> None:
    """Raise NonFiniteError naming the term and the noise levels where it went non-finite."""
    for name, values in (("DSM loss", terms.dsm), ("penalty", terms.penalty)):
        bad = ~torch.isfinite(values.detach())
        if bad.any():
            stds = terms.std[: values.shape[0]][bad].tolist()[:4]
            raise NonFiniteError(f"step {step}: the {name} is non-finite at noise levels "
                                 f"(std) {', '.join(f'{s:.4g}' for s in stds)}")


def compute_gradients(score_model, sde: SDE, x0: torch.Tensor, objective: Objective, *,
                      two_stage: bool = False, generator: torch.Generator | None = None,
                      loss_scale: float = 1.0, step: int = 0) -> LossTerms:
    """Accumulate the objective's gradients into the parameters' .grad (no optimizer step)."""
    if two_stage:
        terms = backward_two_stage(score_model, sde, x0, objective, generator=generator,
                                   loss_scale=loss_scale)
        _check_finite(terms, step)
        return terms

    terms = qc_loss(score_model, sde, x0, objective, generator=generator)
    _check_finite(terms, step)
    (terms.total * loss_scale).backward()
    return terms


def clip_and_check(model: nn.Module, grad_clip: float, step: int) -> float:
    """Clip the global gradient norm (if grad_clip > 0) and return the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(norm):
        raise NonFiniteError(f"step {step}: the gradient norm is non-finite ({norm})")
    return norm


def train_step(score_model, sde: SDE, x0: torch.Tensor, optimizer, scheduler,
               objective: Objective, settings: OptimSettings, *, ema: AveragedModel | None = None,
               two_stage: bool = False, generator: torch.Generator | None = None,
               step: int = 0) -> StepResult:
    """Run one optimisation step: zero grads, loss and backward, clip, Adam, warm-up, EMA."""
    optimizer.zero_grad(set_to_none=True)
    terms = compute_gradients(score_model, sde, x0, objective, two_stage=two_stage,
                              generator=generator, step=step)
    grad_norm = clip_and_check(score_model, settings.grad_clip, step)

    optimizer.step()
    scheduler.step()
    if ema is not None:
        ema.update_parameters(score_model)

    penalty = float(terms.penalty.detach().mean()) if terms.penalty.numel() else 0.0
    return StepResult(loss=float(terms.total.detach()), dsm=float(terms.dsm.detach().mean()),
                      penalty=penalty, grad_norm=grad_norm)


@dataclasses.dataclass
class FitResult:
    """What `fit` returns: the EMA model, the loss history and the training time."""

    ema: AveragedModel
    history: list
    train_seconds: float


def fit(score_model, sde: SDE, sample_batch, objective: Objective, settings: OptimSettings, *,
        num_steps: int, two_stage: bool = False, generator: torch.Generator | None = None,
        progress: bool = True, description: str = "train") -> FitResult:
    """Train `score_model` for `num_steps` steps on batches from `sample_batch(step)`.

    The loop of the studies: no checkpoints, everything in memory. Returns the EMA model.
    """
    if num_steps < 1:
        raise UsageError(f"invalid num_steps {num_steps!r}; expected an integer >= 1")

    optimizer, scheduler = make_optimizer(score_model, settings)
    ema = make_ema(score_model, settings.ema_rate)
    score_model.train()
    history = []
    start = time.perf_counter()

    bar = tqdm(range(num_steps), desc=description, disable=not progress, leave=False)
    for step in bar:
        result = train_step(score_model, sde, sample_batch(step), optimizer, scheduler,
                            objective, settings, ema=ema, two_stage=two_stage,
                            generator=generator, step=step)
        history.append(dataclasses.asdict(result))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{result.dsm:.4g}", penalty=f"{result.penalty:.3g}")

    score_model.eval()
    ema.eval()
    return FitResult(ema=ema, history=history, train_seconds=time.perf_counter() - start)
