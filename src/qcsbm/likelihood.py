"""Exact log-likelihood through the probability-flow ODE, and bits per dimension.

The probability-flow ODE dx/dt = f~(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t) maps data at
t_min to the prior at t = 1, and the instantaneous change of variables gives

    log p_{t_min}(x) = log p_1(x_1) + integral from t_min to 1 of div f~(x_t, t) dt

by the instantaneous change-of-variables formula of continuous normalizing flows (Song et
al., "Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021;
the reference implementation is score_sde_pytorch's `likelihood.py`).
The state (x_t, integral) is solved jointly with torchdiffeq's adaptive `odeint`. The
divergence is exact (d vector-Jacobian products per step, for small d) or Hutchinson's
estimate v^T J v with probes v drawn once and kept fixed across the solve, which makes the
result an unbiased estimate of the same integral.

The result is the model's density at t_min, where the perturbation is small: it is the
density of the slightly noisy data, as in score_sde_pytorch's likelihood evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from tqdm.auto import tqdm

from qcsbm import jacobian
from qcsbm.errors import UsageError, check_choice, check_positive
from qcsbm.sampling import CountedDrift, check_solver_options, solve_ode
from qcsbm.sde import SDE

DIVERGENCES = ("exact", "hutchinson")

#: Intensity levels of 8-bit images (CIFAR-10, SVHN, MNIST): 2^8 = 256, so uniform
#: dequantization adds log2(256) = 8 bits per dimension.
LEVELS_8BIT = 256

#: Intensity levels of scikit-learn's 8x8 digits (`load_digits`): integers 0..16.
LEVELS_DIGITS_8X8 = 17

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LikelihoodResult:
    """Per-sample log-likelihood from the probability-flow ODE."""

    logp: torch.Tensor  # (B,) log p_{t_min}(x) in nats: prior_logp + delta_logp
    nfe: int  # number of ODE right-hand-side evaluations (one score forward pass each)
    prior_logp: torch.Tensor  # (B,) log p_1(x_1) under the SDE's prior, in nats
    delta_logp: torch.Tensor  # (B,) integral of the drift's divergence from t_min to 1
    latent: torch.Tensor  # x_1, the image of x under the ODE, shape of x


def log_likelihood(score_fn, sde: SDE, x: torch.Tensor, *, divergence: str = "exact",
                   num_probes: int = 1, probe: str = "rademacher",
                   generator: torch.Generator | None = None, rtol: float = 1e-5,
                   atol: float = 1e-5, method: str = "dopri5", max_nfe: int | None = None,
                   t_min: float | None = None, progress: bool = False) -> LikelihoodResult:
    """Compute log p(x) per sample, in nats, by solving the probability-flow ODE from t_min to 1.

    Args:
        score_fn: score(x, t) with t of shape (B,).
        sde: the forward SDE, whose prior density scores x_1.
        x: a batch of data, shape (B, ...), floating point; its dtype sets the solver's.
        divergence: "exact" (the trace of the full Jacobian) or "hutchinson".
        num_probes: Hutchinson probes per sample, drawn once and averaged.
        probe: "rademacher" or "gaussian".
        generator: the source of the Hutchinson probes.
        rtol, atol: the solver's tolerances, applied to x_t and to the integral alike.
        method: an adaptive torchdiffeq method (see `qcsbm.sampling.ADAPTIVE_METHODS`).
        max_nfe: raise `qcsbm.sampling.NFELimitError` once the solver requests more
            right-hand-side evaluations than this; None for no limit.
        t_min: the start time, sde.t_min when None.
        progress: show a progress bar that counts right-hand-side evaluations.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    check_solver_options(method, rtol, atol, max_nfe)
    if not (torch.is_tensor(x) and x.is_floating_point() and x.dim() >= 2):
        raise UsageError(f"invalid x of shape {tuple(getattr(x, 'shape', ()))}; expected a "
                         "floating-point tensor of shape (B, ...) with at least 2 dimensions")
    t_start = sde.t_min if t_min is None else float(t_min)
    if not 0.0 < t_start < sde.t_max:
        raise UsageError(f"invalid t_min {t_min!r}; expected 0 < t_min < {sde.t_max}")

    probes = None
    if divergence == "hutchinson":
        probes = jacobian.sample_probes(x, num_probes, probe, generator)
    batch = x.shape[0]

    def rhs(t, state):
        x_t = state[0]
        t_vec = t.expand(batch)

        def drift_fn(y):
            return sde.probability_flow_drift(score_fn, y, t_vec)

        drift, trace = jacobian.divergence(drift_fn, x_t, method=divergence, probes=probes,
                                           create_graph=False)
        return drift, trace

    with torch.no_grad(), tqdm(desc="likelihood", unit="nfe", disable=not progress) as bar:
        describe = (f"probability-flow ODE likelihood (method {method!r}, rtol={rtol}, "
                    f"atol={atol})")
        counted = CountedDrift(rhs, max_nfe=max_nfe, describe=describe, bar=bar)
        initial = (x.detach(), torch.zeros(batch, device=x.device, dtype=x.dtype))
        latent, delta_logp = solve_ode(counted, initial, t_start, sde.t_max, rtol=rtol,
                                       atol=atol, method=method, dtype=x.dtype, device=x.device)

    prior_logp = sde.prior_logp(latent)
    logger.debug("log_likelihood: divergence %s, method %s, nfe %d", divergence, method,
                 counted.nfe)
    return LikelihoodResult(logp=prior_logp + delta_logp, nfe=counted.nfe,
                            prior_logp=prior_logp, delta_logp=delta_logp, latent=latent)


def bits_per_dim(logp_nats: torch.Tensor, num_dims: int, *, num_levels: int = LEVELS_8BIT,
                 data_scale: float = 1.0) -> torch.Tensor:
    """Convert a continuous log-density of dequantized data to bits per dimension.

    Assumed pipeline: integer data k in {0, ..., L-1} (L = `num_levels`) is dequantized as
    y = (k + u) / L with u ~ U[0, 1)^d, and the model's input is x = data_scale * y + shift,
    with data_scale = 1 for data in [0, 1] and 2 for data mapped to [-1, 1]. The shift does
    not change the density. Then log p(y) = log p(x) + d log(data_scale), and the discrete
    log-probability of k is bounded below by E_u[log p(y)] - d log L, so

        bits/dim = -(log p(x) + d ln(data_scale)) / (d ln 2) + log2(L),

    an upper bound in expectation over u. For 8-bit data in [-1, 1] the offset is
    log2(256) - log2(2) = 7 bits, for 8-bit data in [0, 1] it is 8 bits (score_sde_pytorch's
    `7 - inverse_scaler(-1)`).

    Args:
        logp_nats: log p(x) per sample in nats, as returned by `log_likelihood`.
        num_dims: d, the number of dimensions of one sample (for example 3 * 32 * 32).
        num_levels: L, the number of intensity levels (256 for 8-bit data, 17 for the 8x8
            digits).
        data_scale: the factor from y in [0, 1] to the model's input.
    """
    _check_count("num_dims", num_dims, minimum=1)
    _check_count("num_levels", num_levels, minimum=2)
    check_positive("data_scale", data_scale)
    log_prob_y = logp_nats + num_dims * math.log(data_scale)
    return -log_prob_y / (num_dims * math.log(2)) + math.log2(num_levels)


def dequantize(levels: torch.Tensor, num_levels: int = LEVELS_8BIT, *,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Map integer levels k in {0, ..., L-1} to y = (k + u) / L in [0, 1), u ~ U[0, 1).

    This is the dequantization that `bits_per_dim` assumes. The output is float32 unless
    `levels` is already a floating-point tensor.
    """
    _check_count("num_levels", num_levels, minimum=2)
    k = levels if levels.is_floating_point() else levels.to(torch.float32)
    if torch.any(k != k.round()) or k.min() < 0 or k.max() > num_levels - 1:
        raise UsageError(f"invalid levels in [{float(k.min())}, {float(k.max())}]; expected "
                         f"integers from 0 to num_levels - 1 = {num_levels - 1}")

    source = generator.device if generator is not None else k.device
    u = torch.rand(k.shape, generator=generator, device=source, dtype=k.dtype).to(k.device)
    return (k + u) / num_levels


def _check_count(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"invalid {name} {value!r}; expected an integer >= {minimum}")
