"""Samplers: predictor-corrector on a time grid and the probability-flow ODE.

Both draw x_1 from the SDE's prior and run the reverse process from t = 1 down to t_min.
They work for any trailing sample shape (2-D points, images) and return a `SampleResult`
with the samples and the number of score evaluations (NFE) actually used.

Symbols (as in `qcsbm.sde`):
    mean(t), std(t)   coefficients of p_t(x_t | x_0) = N(mean(t) x_0, std(t)^2 I)
    a, q              the forward transition x_t = a x_s + sqrt(q) z between grid times s < t:
                      a = mean(t) / mean(s),  q = std(t)^2 - a^2 std(s)^2
                      (exact for the linear SDEs of `qcsbm.sde`)
    snr               the Langevin corrector's signal-to-noise ratio

The algorithms follow Song et al., "Score-Based Generative Modeling through Stochastic
Differential Equations" (ICLR 2021), as implemented in score_sde_pytorch's `sampling.py`.

Score functions are called as `score_fn(x, t)` with t a (B,) tensor. Sampling runs under
`torch.no_grad()`, and an energy score (`qcsbm.scores.EnergyScore`) takes its own gradient.
The samplers never switch a module between train and eval mode, so the caller does that.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torchdiffeq import odeint
from tqdm.auto import tqdm

from qcsbm.errors import NonFiniteError, UsageError, check_choice, check_positive
from qcsbm.sde import SDE, broadcast_to

PREDICTORS = ("reverse_diffusion", "euler_maruyama")
CORRECTORS = (None, "langevin")

#: Adaptive solvers of torchdiffeq 0.2.5 that control the error with rtol / atol.
#: "dopri5" is the Dormand-Prince 5(4) pair, the method behind scipy's "RK45", which
#: score_sde_pytorch's ODE sampler uses by default.
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")

logger = logging.getLogger(__name__)


class NFELimitError(RuntimeError):
    """An adaptive ODE solve needed more score evaluations than its `max_nfe` allows."""


@dataclasses.dataclass
class SampleResult:
    """The output of a sampler."""

    samples: torch.Tensor  # shape `shape`, dtype `dtype`
    nfe: int  # number of score evaluations used


# --- shared helpers ------------------------------------------------------------------------


def time_grid(sde: SDE, num_steps: int, *, device=None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return num_steps + 1 equally spaced times from t = 1 down to sde.t_min (both included).

    A sampler takes one step from each time to the next, so the last step lands on t_min.
    """
    _check_int("num_steps", num_steps, minimum=1)
    return torch.linspace(sde.t_max, sde.t_min, num_steps + 1, device=device, dtype=dtype)


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"invalid {name} {value!r}; expected an integer >= {minimum}")


def _randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Draw standard normal noise on the generator's device, then move it to `device`."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def _prior_sample(sde: SDE, shape, generator, device, dtype) -> torch.Tensor:
    return _randn(shape, generator, device, dtype) * sde.prior_std()


def _transition(sde: SDE, t: torch.Tensor, t_next: torch.Tensor):
    """Return (a, q), each (B,), of the forward transition from t_next up to t > t_next."""
    mean_t, std_t = sde.marginal_coefficients(t)
    mean_next, std_next = sde.marginal_coefficients(t_next)
    a = mean_t / mean_next
    q = std_t**2 - a**2 * std_next**2
    return a, q


def _tweedie_denoise(score_fn, sde: SDE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Return E[x_0 | x_t] = (x_t + std(t)^2 score(x_t, t)) / mean(t) (Tweedie's formula)."""
    mean, std = sde.marginal_coefficients(t)
    return (x + broadcast_to(std**2, x) * score_fn(x, t)) / broadcast_to(mean, x)


# --- predictor-corrector -------------------------------------------------------------------


def _reverse_diffusion_step(score_fn, sde, x, t, t_next):
    """Return (mean, noise std) of one reverse-diffusion step from t to t_next.

    Reverses the exact forward transition x_t = a x_s + sqrt(q) z to first order:
    x_s = (2 - a) x_t + q score + sqrt(q) z. For the VE SDE this is score_sde_pytorch's
    reverse-diffusion predictor (a = 1, q = sigma(t)^2 - sigma(t_next)^2). For the VP SDE
    1 - a^2 plays the role of its discrete beta.
    """
    a, q = _transition(sde, t, t_next)
    x_mean = broadcast_to(2 - a, x) * x + broadcast_to(q, x) * score_fn(x, t)
    return x_mean, torch.sqrt(q.clamp_min(0))


def _euler_maruyama_step(score_fn, sde, x, t, t_next):
    """Return (mean, noise std) of one Euler-Maruyama step of the reverse SDE from t to t_next."""
    dt = t - t_next
    _, diffusion = sde.drift_diffusion(x, t)
    x_mean = x - sde.reverse_drift(score_fn, x, t) * broadcast_to(dt, x)
    return x_mean, diffusion * torch.sqrt(dt)


_PREDICTOR_STEPS = {
    "reverse_diffusion": _reverse_diffusion_step,
    "euler_maruyama": _euler_maruyama_step,
}


def _langevin_step(score_fn, x, t, alpha, snr, generator):
    """Take one Langevin corrector step whose size targets the signal-to-noise ratio `snr`.

    step = 2 alpha (snr ||z|| / ||score||)^2, with both norms averaged over the batch as in
    score_sde_pytorch, so one step size is shared by the whole batch.
    """
    score = score_fn(x, t)
    noise = _randn(x.shape, generator, x.device, x.dtype)
    score_norm = score.reshape(x.shape[0], -1).norm(dim=1).mean()
    noise_norm = noise.reshape(x.shape[0], -1).norm(dim=1).mean()
    step = 2 * alpha * (snr * noise_norm / score_norm) ** 2
    return x + broadcast_to(step, x) * score + broadcast_to(torch.sqrt(2 * step), x) * noise


def pc_sample(score_fn, sde: SDE, shape, *, num_steps: int = 1000,
              predictor: str = "reverse_diffusion", corrector: str | None = None,
              snr: float = 0.16, corrector_steps: int = 1, denoise: bool = True,
              generator: torch.Generator | None = None, device=None,
              dtype: torch.dtype = torch.float32, progress: bool = False) -> SampleResult:
    """Sample with the predictor-corrector sampler of Song et al. (2021).

    At each time of `time_grid(sde, num_steps)` except the last, `corrector_steps` Langevin
    steps (if `corrector` is "langevin") are followed by one predictor step to the next time.

    Args:
        score_fn: score(x, t) with t of shape (B,).
        sde: the forward SDE, whose prior gives x_1.
        shape: the batch shape (B, ...) of the samples.
        num_steps: the number of predictor steps.
        predictor: "reverse_diffusion" (the reverse of the exact forward transition between
            grid times) or "euler_maruyama" (an Euler-Maruyama step of the reverse SDE).
        corrector: None or "langevin".
        snr: the Langevin corrector's signal-to-noise ratio, used only with a corrector. The
            default 0.16 is score_sde_pytorch's setting for CIFAR-10 under the VE SDE.
        corrector_steps: Langevin steps per grid time.
        denoise: return the mean of the last predictor step, without its noise.
        generator: the source of all randomness, for reproducible samples.
        device, dtype: of the samples and of the times given to score_fn.
        progress: show a progress bar over the steps.

    Returns:
        A `SampleResult`; nfe = num_steps * (1 + corrector_steps) with a corrector, else
        num_steps.
    """
    check_choice("predictor", predictor, PREDICTORS)
    check_choice("corrector", corrector, CORRECTORS)
    check_positive("snr", snr)
    _check_int("corrector_steps", corrector_steps, minimum=1)
    times = time_grid(sde, num_steps, device=device, dtype=dtype)
    predictor_step = _PREDICTOR_STEPS[predictor]
    nfe = 0

    with torch.no_grad():
        x = _prior_sample(sde, shape, generator, device, dtype)
        batch = x.shape[0]
        for i in tqdm(range(num_steps), desc="pc sampling", disable=not progress):
            t = times[i].expand(batch)
            t_next = times[i + 1].expand(batch)

            # Corrector: Langevin MCMC at the current time. Its step is scaled by the squared
            # mean ratio a^2: 1 for VE, 1 - beta in DDPM's notation for VP (as in
            # score_sde_pytorch), and the same ratio for sub-VP.
            if corrector == "langevin":
                alpha = _transition(sde, t, t_next)[0] ** 2
                for _ in range(corrector_steps):
                    x = _langevin_step(score_fn, x, t, alpha, snr, generator)
                nfe += corrector_steps

            # Predictor: one step of the reverse SDE to the next time.
            x_mean, noise_std = predictor_step(score_fn, sde, x, t, t_next)
            nfe += 1
            last = i == num_steps - 1
            if last and denoise:
                x = x_mean
            else:
                noise = _randn(x.shape, generator, x.device, x.dtype)
                x = x_mean + broadcast_to(noise_std, x) * noise

    logger.debug("pc_sample: %d steps, predictor %s, corrector %s, nfe %d",
                 num_steps, predictor, corrector, nfe)
    return SampleResult(samples=x, nfe=nfe)


# --- probability-flow ODE ------------------------------------------------------------------


class CountedDrift:
    """An ODE right-hand side for torchdiffeq that counts its calls and enforces `max_nfe`.

    `drift(t, state)` receives torchdiffeq's scalar time tensor; `describe` names the solve
    and its tolerances for the error message.
    """

    def __init__(self, drift, *, max_nfe: int | None, describe: str, bar=None):
        self.drift = drift
        self.max_nfe = max_nfe
        self.describe = describe
        self.bar = bar
        self.nfe = 0

    def __call__(self, t: torch.Tensor, state):
        if self.max_nfe is not None and self.nfe >= self.max_nfe:
            raise NFELimitError(
                f"{self.describe} exceeded max_nfe={self.max_nfe} function evaluations "
                f"(stopped at t={float(t):.6g}); raise max_nfe, loosen rtol/atol, or check "
                "the score for a stiff or non-finite region")
        self.nfe += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"t={float(t):.5f}", refresh=False)
        return self.drift(t, state)


def check_solver_options(method: str, rtol: float, atol: float, max_nfe: int | None) -> None:
    """Raise UsageError for an unknown adaptive method, tolerances <= 0 or max_nfe < 1."""
    check_choice("method", method, ADAPTIVE_METHODS)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    if max_nfe is not None:
        _check_int("max_nfe", max_nfe, minimum=1)


def solve_ode(rhs: CountedDrift, initial, t_start: float, t_end: float, *, rtol: float,
              atol: float, method: str, dtype: torch.dtype, device=None):
    """Return the state at t_end of the ODE d state / dt = rhs(t, state), started at t_start.

    The solver's last step is shortened to land on t_end, so that `rhs` is never evaluated
    beyond it: by default torchdiffeq steps past the end and interpolates back, which would
    ask for the score at t < t_min (at t < 0 the VP marginal std is NaN).
    """
    span = torch.tensor([t_start, t_end], device=device, dtype=dtype)
    options = {"step_t": span[1:]}
    try:
        path = odeint(rhs, initial, span, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError as error:
        # torchdiffeq asserts when its step size underflows, which a NaN or inf drift causes.
        if "underflow in dt" not in str(error):
            raise
        raise NonFiniteError(f"the ODE solver's step size underflowed after {rhs.nfe} "
                             "evaluations: the drift is NaN, inf or extremely stiff; check the "
                             "model's weights") from None
    if isinstance(path, tuple):
        return tuple(p[-1] for p in path)
    return path[-1]


def ode_sample(score_fn, sde: SDE, shape, *, rtol: float = 1e-5, atol: float = 1e-5,
               method: str = "dopri5", max_nfe: int | None = None, denoise: bool = True,
               x_1: torch.Tensor | None = None, generator: torch.Generator | None = None,
               device=None, dtype: torch.dtype = torch.float32,
               progress: bool = False) -> SampleResult:
    """Sample by integrating the probability-flow ODE from t = 1 to sde.t_min.

    The ODE dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t) has the same marginals p_t as the SDE;
    torchdiffeq's adaptive `odeint` solves it.

    Args:
        score_fn: score(x, t) with t of shape (B,).
        sde: the forward SDE, whose prior gives x_1.
        shape: the batch shape (B, ...) of the samples.
        rtol, atol: the solver's relative and absolute tolerances.
        method: an adaptive torchdiffeq method, see `ADAPTIVE_METHODS`.
        max_nfe: raise `NFELimitError` once the solver requests more drift evaluations than
            this; None for no limit.
        denoise: finish with one denoising step at t_min, Tweedie's posterior mean
            (x + std^2 score) / mean; it costs one more score evaluation.
        x_1: a prior sample to start from (for example `LikelihoodResult.latent`, which
            decodes it), of shape `shape`; None draws one from the prior.
        generator: the source of the prior sample when x_1 is None.
        device, dtype: of the samples and of the solver's time.
        progress: show a progress bar that counts drift evaluations.

    Returns:
        A `SampleResult` whose nfe counts every score evaluation, the denoising step included.
    """
    check_solver_options(method, rtol, atol, max_nfe)
    if x_1 is not None and tuple(x_1.shape) != tuple(shape):
        raise UsageError(f"invalid x_1 of shape {tuple(x_1.shape)}; expected shape "
                         f"{tuple(shape)}")

    def drift(t, x):
        return sde.probability_flow_drift(score_fn, x, t.expand(x.shape[0]))

    with torch.no_grad(), tqdm(desc="ode sampling", unit="nfe", disable=not progress) as bar:
        describe = f"probability-flow ODE sampling (method {method!r}, rtol={rtol}, atol={atol})"
        counted = CountedDrift(drift, max_nfe=max_nfe, describe=describe, bar=bar)
        if x_1 is None:
            x_1 = _prior_sample(sde, shape, generator, device, dtype)
        else:
            x_1 = x_1.to(device=device, dtype=dtype)
        x = solve_ode(counted, x_1, sde.t_max, sde.t_min, rtol=rtol, atol=atol, method=method,
                      dtype=dtype, device=x_1.device)
        nfe = counted.nfe

        if denoise:
            t_min = torch.full((x.shape[0],), sde.t_min, device=x.device, dtype=dtype)
            x = _tweedie_denoise(score_fn, sde, x, t_min)
            nfe += 1

    logger.debug("ode_sample: method %s, rtol %g, atol %g, nfe %d", method, rtol, atol, nfe)
    return SampleResult(samples=x, nfe=nfe)
