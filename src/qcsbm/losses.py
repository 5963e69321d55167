"""Denoising score matching plus the quasi-conservative penalty.

The objective of Chao et al. (ICML 2023), Section 4, for t ~ U(t_min, 1), z ~ N(0, I) and
x_t = mean(t) x_0 + std(t) z:

    L(theta) = E[ w(t) * 1/2 || std(t) s(x_t, t) + z ||^2 ]                 (DSM)
             + lambda_qc E[ std(t)^2 (tr(J J^T) - tr(J J)) ]               (penalty, L_QC)

with w(t) = 1 ("sigma2" weighting: the DSM term is the std^2-weighted score error) or
w(t) = g(t)^2 / std(t)^2 ("likelihood" weighting, Song et al. 2021, "Maximum Likelihood Training
of Score-Based Diffusion Models"). lambda_qc = 0 gives a USBM.

Losses here are pure: they return per-sample terms and never call `backward()`. The one
exception is `backward_two_stage`, which runs the paper's two-stage backward for the
"hutchinson" estimator through `qcsbm.jacobian.hutchinson_two_stage_backward`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from qcsbm import jacobian as jac
from qcsbm.errors import UsageError, check_choice
from qcsbm.sde import SDE, broadcast_to

WEIGHTINGS = ("sigma2", "likelihood")


@dataclasses.dataclass
class Objective:
    """Settings of the training objective.

    lambda_qc: weight of the asymmetry penalty (0 = plain DSM, a USBM).
    estimator: "exact", "hutchinson" (the paper's form) or "nonnegative".
    num_probes: Hutchinson probes K per sample.
    probe: "rademacher" or "gaussian".
    penalty_fraction: fraction of the batch (its leading samples) that carries the penalty.
    weighting: "sigma2" or "likelihood" for the DSM term.
    jvp: how the nonnegative estimator computes J v ("auto", "forward", "double-backward").
    """

    lambda_qc: float = 0.0
    estimator: str = "nonnegative"
    num_probes: int = 1
    probe: str = "rademacher"
    penalty_fraction: float = 1.0
    weighting: str = "sigma2"
    jvp: str = "auto"

    def __post_init__(self):
        if not (self.lambda_qc >= 0 and math.isfinite(self.lambda_qc)):
            raise UsageError(f"invalid lambda_qc {self.lambda_qc!r}; expected a number >= 0")
        check_choice("estimator", self.estimator, jac.METHODS)
        check_choice("probe", self.probe, jac.PROBES)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("jvp", self.jvp, jac.JVP_MODES)
        if not (isinstance(self.num_probes, int) and self.num_probes >= 1):
            raise UsageError(f"invalid num_probes {self.num_probes!r}; expected an integer >= 1")
        if not 0.0 < self.penalty_fraction <= 1.0:
            raise UsageError(f"invalid penalty_fraction {self.penalty_fraction!r}; "
                             "expected 0 < penalty_fraction <= 1")


@dataclasses.dataclass
class LossTerms:
    """Per-sample terms of one batch; `total` is the scalar that training minimizes."""

    total: torch.Tensor
    dsm: torch.Tensor            # (B,) weighted DSM term
    penalty: torch.Tensor        # (P,) std^2 * asymmetry estimate of the P penalized samples
    t: torch.Tensor              # (B,) diffusion times
    std: torch.Tensor            # (B,) marginal std at t


@dataclasses.dataclass
class PerturbedBatch:
    """x_t and what produced it."""

    x_t: torch.Tensor
    t: torch.Tensor
    std: torch.Tensor
    noise: torch.Tensor


def perturb_batch(sde: SDE, x0: torch.Tensor, *, t: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> PerturbedBatch:
    """Draw t ~ U(t_min, 1) and z ~ N(0, I) (unless given) and return x_t."""
    gen_device = generator.device if generator is not None else x0.device
    if t is None:
        u = torch.rand(x0.shape[0], generator=generator, device=gen_device, dtype=x0.dtype)
        t = (sde.t_min + (sde.t_max - sde.t_min) * u).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype)
        noise = noise.to(x0.device)

    x_t = sde.perturb(x0, t, noise)
    return PerturbedBatch(x_t=x_t, t=t, std=sde.marginal_std(t), noise=noise)


def dsm_from_score(score: torch.Tensor, batch: PerturbedBatch, sde: SDE,
                   weighting: str = "sigma2") -> torch.Tensor:
    """Return the per-sample DSM term 1/2 w(t) ||std s + z||^2, shape (B,)."""
    residual = broadcast_to(batch.std, score) * score + batch.noise
    loss = 0.5 * residual.reshape(residual.shape[0], -1).pow(2).sum(dim=1)
    if weighting == "likelihood":
        _, diffusion = sde.drift_diffusion(batch.x_t, batch.t)
        loss = loss * diffusion**2 / batch.std**2
    return loss


def _num_penalized(batch_size: int, fraction: float) -> int:
    return max(1, int(math.ceil(fraction * batch_size)))


def qc_loss(score_model, sde: SDE, x0: torch.Tensor, objective: Objective, *,
            t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> LossTerms:
    """Compute DSM plus lambda_qc times the std^2-weighted asymmetry penalty, without backward.

    One forward pass serves both terms: the penalty differentiates the same score output.
    """
    batch = perturb_batch(sde, x0, t=t, noise=noise, generator=generator)
    penalized = objective.lambda_qc > 0
    x_t = batch.x_t.detach().requires_grad_(penalized)

    # The score for the whole batch; the penalized samples are its leading P rows.
    score = score_model(x_t, batch.t)
    dsm = dsm_from_score(score, batch, sde, objective.weighting)
    total = dsm.mean()
    penalty = dsm.new_zeros(0)
    if not penalized:
        return LossTerms(total=total, dsm=dsm, penalty=penalty, t=batch.t, std=batch.std)

    # The penalty on the leading P samples, with their own slice of the score graph.
    num = _num_penalized(x0.shape[0], objective.penalty_fraction)
    penalty = _penalty(score_model, score, x_t, batch, num, objective, generator)
    total = total + objective.lambda_qc * penalty.mean()
    return LossTerms(total=total, dsm=dsm, penalty=penalty, t=batch.t, std=batch.std)


def _penalty(score_model, score, x_t, batch, num, objective, generator):
    """std^2 * asymmetry for the first `num` samples of the batch, shape (num,)."""
    t_sub = batch.t[:num]

    def score_fn(x):
        return score_model(x, t_sub)

    if num == x_t.shape[0]:
        s_sub, x_sub = score, x_t
    else:
        # A separate leaf for the penalized rows keeps their Jacobian free of the other rows.
        x_sub = x_t[:num].detach().requires_grad_(True)
        s_sub = score_fn(x_sub)

    asym, _ = jac.traces_from_output(
        score_fn, s_sub, x_sub, method=objective.estimator, num_probes=objective.num_probes,
        probe=objective.probe, generator=generator, jvp=objective.jvp, create_graph=True)
    return batch.std[:num] ** 2 * asym


def backward_two_stage(score_model, sde: SDE, x0: torch.Tensor, objective: Objective, *,
                       t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None,
                       loss_scale: float = 1.0) -> LossTerms:
    """Backpropagate `qc_loss` with the paper's two-stage backward ("hutchinson" estimator).

    Gives the same parameter gradients as `qc_loss(...).total.backward()` with the same
    probes, and calls `backward()` twice. `loss_scale` multiplies the whole objective before
    backward (gradient accumulation divides by the number of micro-batches).
    """
    if objective.estimator != "hutchinson":
        raise UsageError(f"invalid estimator {objective.estimator!r} for the two-stage backward; "
                         "expected 'hutchinson'")
    if objective.lambda_qc == 0:
        terms = qc_loss(score_model, sde, x0, objective, t=t, noise=noise, generator=generator)
        (terms.total * loss_scale).backward()
        return terms

    batch = perturb_batch(sde, x0, t=t, noise=noise, generator=generator)
    num = _num_penalized(x0.shape[0], objective.penalty_fraction)
    x_t = batch.x_t.detach().requires_grad_(True)
    score = score_model(x_t, batch.t)
    dsm = dsm_from_score(score, batch, sde, objective.weighting)

    if num == x_t.shape[0]:
        s_sub, x_sub = score, x_t
    else:
        x_sub = x_t[:num].detach().requires_grad_(True)
        s_sub = score_model(x_sub, batch.t[:num])

    probes = jac.sample_probes(x_sub, objective.num_probes, objective.probe, generator)
    weight = loss_scale * objective.lambda_qc * batch.std[:num] ** 2 / num
    estimate = jac.hutchinson_two_stage_backward(s_sub, x_sub, probes, weight,
                                                 loss_scale * dsm.mean())
    penalty = batch.std[:num].detach() ** 2 * estimate
    total = dsm.mean().detach() + objective.lambda_qc * penalty.mean()
    return LossTerms(total=total, dsm=dsm.detach(), penalty=penalty, t=batch.t, std=batch.std)
