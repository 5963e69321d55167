"""Forward SDEs dx = f(x, t) dt + g(t) dw on t in [t_min, 1] and their reversals.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations"
(ICLR 2021), Section 3.4 and Appendix B.

Symbols:
    x_0     clean data;  x_t  perturbed data at time t
    mean, std   the Gaussian marginal p_t(x_t | x_0) = N(mean(t) x_0, std(t)^2 I)
    f, g    drift and diffusion coefficients of the forward SDE
    score   an estimate of grad_x log p_t(x), a function score(x, t)

Every method broadcasts a time vector t of shape (B,) over any trailing shape of x
(2-D points, images) and keeps the dtype of its inputs, so float64 works throughout.

Network conditioning (`condition(t)`), used by the loss, the samplers and the likelihood alike:
    VESDE       the marginal std sigma(t) itself (NCSN++ embeds log sigma);
    VPSDE,
    SubVPSDE    999 * t, the continuous counterpart of DDPM's integer step index 0..999
                (score_sde_pytorch's convention for its continuous VP models).
"""

from __future__ import annotations

import abc
import math

import torch

from qcsbm.errors import UsageError

#: Scale from t in [0, 1] to DDPM's step index range [0, 999] (1000 discrete steps).
VP_TIME_SCALE = 999.0


def broadcast_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector of shape (B,) to (B, 1, ..., 1) so it broadcasts over x."""
    return values.reshape(values.shape[0], *([1] * (x.dim() - 1)))


def _as_time(t, x: torch.Tensor) -> torch.Tensor:
    """Turn a scalar or a (B,) tensor into a (B,) tensor on x's device and dtype."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype if x.is_floating_point() else None)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return t


class SDE(abc.ABC):
    """An Ito SDE with a Gaussian transition kernel and a Gaussian prior at t = 1."""

    def __init__(self, t_min: float = 1e-5):
        if not 0.0 < t_min < 1.0:
            raise UsageError(f"invalid t_min {t_min!r}; expected 0 < t_min < 1")
        self.t_min = float(t_min)
        self.t_max = 1.0

    # --- the forward process -------------------------------------------------------------

    @abc.abstractmethod
    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean(t), std(t)) of p_t(x_t | x_0) = N(mean(t) x_0, std(t)^2 I), each (B,)."""

    @abc.abstractmethod
    def drift_diffusion(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the drift f(x, t) (shape of x) and the diffusion g(t) (shape (B,)).

        t is a scalar or a (B,) tensor. Implementations convert it with `_as_time`.
        """

    @abc.abstractmethod
    def prior_std(self) -> float:
        """Return the std of the isotropic Gaussian prior p_1 that sampling starts from."""

    @abc.abstractmethod
    def condition(self, t: torch.Tensor) -> torch.Tensor:
        """Return the conditioning value the network receives at time t (see the module doc)."""

    def marginal_prob(self, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mean (shape of x0) and std (shape (B,)) of p_t(x_t | x_0)."""
        t = _as_time(t, x0)
        mean_coeff, std = self.marginal_coefficients(t)
        return broadcast_to(mean_coeff, x0) * x0, std

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """Return std(t), shape (B,)."""
        return self.marginal_coefficients(t)[1]

    def perturb(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """Return x_t = mean(t) x_0 + std(t) * noise."""
        mean, std = self.marginal_prob(x0, t)
        return mean + broadcast_to(std, x0) * noise

    # --- the prior -------------------------------------------------------------------------

    def prior_sampling(self, shape, *, generator: torch.Generator | None = None,
                       device=None, dtype=torch.float32) -> torch.Tensor:
        """Draw samples of the given shape from the prior N(0, prior_std^2 I)."""
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return z * self.prior_std()

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Return log N(z; 0, prior_std^2 I) per sample, in nats, shape (B,)."""
        d = z[0].numel()
        sigma = self.prior_std()
        sq_norm = z.reshape(z.shape[0], -1).pow(2).sum(dim=1)
        return -0.5 * d * math.log(2 * math.pi * sigma**2) - sq_norm / (2 * sigma**2)

    # --- the reverse process ---------------------------------------------------------------

    def reverse_drift(self, score_fn, x: torch.Tensor, t) -> torch.Tensor:
        """Return the drift of the reverse-time SDE, f(x, t) - g(t)^2 score(x, t)."""
        t = _as_time(t, x)
        drift, diffusion = self.drift_diffusion(x, t)
        return drift - broadcast_to(diffusion**2, x) * score_fn(x, t)

    def probability_flow_drift(self, score_fn, x: torch.Tensor, t) -> torch.Tensor:
        """Return the drift of the probability-flow ODE, f(x, t) - 1/2 g(t)^2 score(x, t)."""
        t = _as_time(t, x)
        drift, diffusion = self.drift_diffusion(x, t)
        return drift - 0.5 * broadcast_to(diffusion**2, x) * score_fn(x, t)


class VESDE(SDE):
    """Variance exploding SDE: sigma(t) = sigma_min (sigma_max / sigma_min)^t, no drift.

    The marginal std is sigma(t) (not sqrt(sigma(t)^2 - sigma_min^2)), as in score_sde_pytorch's
    continuous VE models, and the prior is N(0, sigma_max^2 I).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        super().__init__(t_min)
        if not 0.0 < sigma_min < sigma_max:
            raise UsageError(f"invalid sigma_min {sigma_min!r} and sigma_max {sigma_max!r}; "
                             "expected 0 < sigma_min < sigma_max")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Return sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def time_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Return the time t at which sigma(t) equals sigma (the inverse of `sigma`)."""
        return torch.log(sigma / self.sigma_min) / self.log_ratio

    def marginal_coefficients(self, t):
        return torch.ones_like(t), self.sigma(t)

    def drift_diffusion(self, x, t):
        t = _as_time(t, x)
        diffusion = self.sigma(t) * math.sqrt(2 * self.log_ratio)
        return torch.zeros_like(x), diffusion

    def prior_std(self):
        return self.sigma_max

    def condition(self, t):
        return self.sigma(t)

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, t_min={self.t_min})"


class VPSDE(SDE):
    """Variance preserving SDE: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, linear beta(t).

    With B(t) = beta_min t + 1/2 (beta_max - beta_min) t^2, the marginal has mean exp(-B/2)
    and std sqrt(1 - exp(-B)), computed as sqrt(-expm1(-B)) so that it stays accurate in
    float32 down to t = 1e-7, where 1 - exp(-B) would cancel to zero.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
        super().__init__(t_min)
        if not 0.0 < beta_min < beta_max:
            raise UsageError(f"invalid beta_min {beta_min!r} and beta_max {beta_max!r}; "
                             "expected 0 < beta_min < beta_max")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """Return beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        """Return B(t), the integral of beta from 0 to t."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def marginal_coefficients(self, t):
        big_b = self.integrated_beta(t)
        return torch.exp(-0.5 * big_b), torch.sqrt(-torch.expm1(-big_b))

    def drift_diffusion(self, x, t):
        t = _as_time(t, x)
        beta = self.beta(t)
        return -0.5 * broadcast_to(beta, x) * x, torch.sqrt(beta)

    def prior_std(self):
        return 1.0

    def condition(self, t):
        return t * VP_TIME_SCALE

    def __repr__(self):
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, t_min={self.t_min})"


class SubVPSDE(VPSDE):
    """Sub-VP SDE: the VP drift with diffusion g(t)^2 = beta(t) (1 - exp(-2 B(t))).

    The marginal has mean exp(-B/2) and std 1 - exp(-B) = -expm1(-B), whose variance is
    bounded by the VP one.
    """

    def marginal_coefficients(self, t):
        big_b = self.integrated_beta(t)
        return torch.exp(-0.5 * big_b), -torch.expm1(-big_b)

    def drift_diffusion(self, x, t):
        t = _as_time(t, x)
        beta = self.beta(t)
        discount = -torch.expm1(-2.0 * self.integrated_beta(t))
        return -0.5 * broadcast_to(beta, x) * x, torch.sqrt(beta * discount)

    def __repr__(self):
        return f"SubVPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, t_min={self.t_min})"
