"""Samplers against Gaussian data, whose perturbed marginals and scores are known exactly.

Data x_0 ~ N(mu, cov). Under an SDE with p_t(x_t | x_0) = N(m x_0, std^2 I) the marginal
is p_t = N(m mu, m^2 cov + std^2 I) (m = 1 for VE), so the exact score is
-(m^2 cov + std^2 I)^{-1} (x - m mu). Moment checks use tolerances of four standard errors
of the sample mean and covariance, plus an allowance for the sampler's discretization bias
where one applies.
"""

import math

import pytest
import torch

from qcsbm.errors import UsageError
from qcsbm.sampling import (NFELimitError, SampleResult, ode_sample, pc_sample, time_grid)
from qcsbm.scores import EnergyScore
from qcsbm.sde import VESDE, VPSDE, SubVPSDE, broadcast_to

NUM_SAMPLES = 2000


def times_matrix(rows, matrix):
    """Return rows @ matrix as a broadcast sum.

    With d = 2 or 3, BLAS matmul gains nothing, and on a loaded 2-core machine its spinning
    threads made each product about ten times slower than this.
    """
    return (rows[:, :, None] * matrix).sum(dim=1)


class GaussianData:
    """Data N(mu, cov) with the exact score of every perturbed marginal p_t."""

    def __init__(self, mu, cov, dtype=torch.float64):
        self.mu = torch.tensor(mu, dtype=dtype)
        self.cov = torch.tensor(cov, dtype=dtype)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.cov)

    def marginal_eigenvalues(self, sde, t):
        """Return (m(t), std(t), eigenvalues of the marginal covariance, shape (B, d))."""
        m, std = sde.marginal_coefficients(t)
        return m, std, m[:, None] ** 2 * self.eigenvalues + std[:, None] ** 2

    def score_fn(self, sde):
        def score(x, t):
            m, _, lam = self.marginal_eigenvalues(sde, t)
            coords = times_matrix(x - m[:, None] * self.mu, self.eigenvectors)
            return -times_matrix(coords / lam, self.eigenvectors.T)

        return score


def gaussian_2d(dtype=torch.float32):
    return GaussianData([1.0, -0.5], [[1.0, 0.6], [0.6, 0.8]], dtype)


def assert_moments(samples, mu, cov, *, bias_allowance=0.0):
    """Assert the sample mean and covariance lie within 4 standard errors of mu and cov."""
    n = samples.shape[0]
    samples = samples.double()
    mu, cov = mu.double(), cov.double()

    mean_se = torch.sqrt(cov.diagonal() / n)
    mean_error = (samples.mean(dim=0) - mu).abs()
    assert torch.all(mean_error < 4 * mean_se + bias_allowance), (samples.mean(dim=0), mu)

    # Var of the sample covariance entry (i, j) of a Gaussian: (S_ii S_jj + S_ij^2) / n.
    cov_se = torch.sqrt((torch.outer(cov.diagonal(), cov.diagonal()) + cov**2) / n)
    cov_error = (torch.cov(samples.T) - cov).abs()
    assert torch.all(cov_error < 4 * cov_se + bias_allowance), (torch.cov(samples.T), cov)


def counting(score_fn):
    """Wrap score_fn so that wrapper.calls counts its evaluations."""
    def wrapper(x, t):
        wrapper.calls += 1
        return score_fn(x, t)

    wrapper.calls = 0
    return wrapper


SDES = {
    "ve": lambda: VESDE(sigma_min=0.01, sigma_max=50.0),
    "vp": lambda: VPSDE(beta_min=0.1, beta_max=20.0),
    "subvp": lambda: SubVPSDE(beta_min=0.1, beta_max=20.0),
}


# --- time grid -------------------------------------------------------------------------------


def test_time_grid_endpoints_and_spacing():
    sde = VPSDE(t_min=1e-3)
    times = time_grid(sde, 10, dtype=torch.float64)

    assert times.shape == (11,)
    assert times[0].item() == 1.0
    assert times[-1].item() == pytest.approx(1e-3)
    steps = times[:-1] - times[1:]
    assert torch.allclose(steps, torch.full_like(steps, (1 - 1e-3) / 10))


def test_time_grid_rejects_zero_steps():
    with pytest.raises(UsageError, match="num_steps"):
        time_grid(VPSDE(), 0)


# --- probability-flow ODE ------------------------------------------------------------------


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_ode_sample_matches_gaussian(sde_name):
    sde = SDES[sde_name]()
    data = gaussian_2d()
    generator = torch.Generator().manual_seed(0)

    result = ode_sample(data.score_fn(sde), sde, (NUM_SAMPLES, 2), generator=generator)

    assert isinstance(result, SampleResult)
    assert result.samples.shape == (NUM_SAMPLES, 2)
    assert result.samples.dtype == torch.float32
    assert result.nfe > 0
    assert_moments(result.samples, data.mu, data.cov)


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
def test_ode_sample_follows_exact_flow_float64(sde_name):
    # For Gaussian data the flow scales each eigen-coordinate of x - m mu by
    # sqrt(lambda_t / lambda_1), so the solve can be checked sample by sample.
    sde = SDES[sde_name]()
    data = gaussian_2d(torch.float64)
    x_1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64) * sde.prior_std()

    result = ode_sample(data.score_fn(sde), sde, (64, 2), x_1=x_1, rtol=1e-7, atol=1e-7,
                        denoise=False, dtype=torch.float64)

    ones = torch.ones(64, dtype=torch.float64)
    m_1, _, lam_1 = data.marginal_eigenvalues(sde, ones)
    m_0, _, lam_0 = data.marginal_eigenvalues(sde, ones * sde.t_min)
    coords = (x_1 - m_1[:, None] * data.mu) @ data.eigenvectors
    expected = (coords * torch.sqrt(lam_0 / lam_1)) @ data.eigenvectors.T + m_0[:, None] * data.mu
    assert result.samples.dtype == torch.float64
    torch.testing.assert_close(result.samples, expected, rtol=1e-5, atol=2e-6)


def test_ode_denoise_applies_tweedie():
    sde = SDES["ve"]()
    data = gaussian_2d(torch.float64)
    score = data.score_fn(sde)
    x_1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(2),
                      dtype=torch.float64) * sde.prior_std()
    options = dict(x_1=x_1, dtype=torch.float64)

    raw = ode_sample(score, sde, (8, 2), denoise=False, **options)
    denoised = ode_sample(score, sde, (8, 2), denoise=True, **options)

    t = torch.full((8,), sde.t_min, dtype=torch.float64)
    std = sde.marginal_std(t)[:, None]
    torch.testing.assert_close(denoised.samples, raw.samples + std**2 * score(raw.samples, t))
    assert denoised.nfe == raw.nfe + 1


def test_ode_nfe_counts_score_calls():
    sde = SDES["vp"]()
    score = counting(gaussian_2d().score_fn(sde))

    result = ode_sample(score, sde, (16, 2), generator=torch.Generator().manual_seed(0))

    assert result.nfe == score.calls
    assert result.nfe > 1


def test_ode_max_nfe_raises():
    sde = SDES["ve"]()
    score = counting(gaussian_2d().score_fn(sde))

    with pytest.raises(NFELimitError, match=r"rtol=1e-05, atol=1e-05\) exceeded max_nfe=5 "):
        ode_sample(score, sde, (16, 2), max_nfe=5)
    assert score.calls == 5


def test_ode_sample_rejects_bad_options():
    sde = SDES["vp"]()
    score = gaussian_2d().score_fn(sde)
    for options, name in [({"method": "rk4"}, "method"), ({"rtol": 0.0}, "rtol"),
                          ({"atol": -1.0}, "atol"), ({"max_nfe": 0}, "max_nfe"),
                          ({"x_1": torch.zeros(3, 2)}, "x_1")]:
        with pytest.raises(UsageError, match=name):
            ode_sample(score, sde, (4, 2), **options)


# --- predictor-corrector ---------------------------------------------------------------------


# Euler-Maruyama's bias on a uniform time grid is larger than reverse diffusion's (for VE
# the noise scale changes by a factor 50 / 0.01 over [0, 1]); the step counts keep it within
# about one standard error of the covariance here.
@pytest.mark.parametrize("sde_name,predictor,num_steps", [
    ("ve", "reverse_diffusion", 200),
    ("vp", "reverse_diffusion", 200),
    ("ve", "euler_maruyama", 1000),
    ("vp", "euler_maruyama", 500),
])
def test_pc_predictor_matches_gaussian(sde_name, predictor, num_steps):
    sde = SDES[sde_name]()
    data = gaussian_2d()
    score = counting(data.score_fn(sde))

    result = pc_sample(score, sde, (NUM_SAMPLES, 2), num_steps=num_steps, predictor=predictor,
                       generator=torch.Generator().manual_seed(0))

    assert result.nfe == num_steps == score.calls
    assert_moments(result.samples, data.mu, data.cov, bias_allowance=0.02)


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_pc_langevin_corrector_matches_gaussian(sde_name):
    sde = SDES[sde_name]()
    data = gaussian_2d()
    score = counting(data.score_fn(sde))

    result = pc_sample(score, sde, (NUM_SAMPLES, 2), num_steps=100, corrector="langevin",
                       snr=0.16, corrector_steps=2, generator=torch.Generator().manual_seed(3))

    assert result.nfe == 100 * 3 == score.calls
    assert_moments(result.samples, data.mu, data.cov, bias_allowance=0.02)


def test_pc_last_step_is_noise_free():
    # With one step and denoise the result is the reverse-diffusion mean from x_1 (the first
    # draw of the generator): (2 - a) x_1 + q score(x_1, 1).
    sde = SDES["vp"]()
    data = gaussian_2d(torch.float64)
    options = dict(num_steps=1, dtype=torch.float64)

    first = pc_sample(data.score_fn(sde), sde, (8, 2), denoise=True,
                      generator=torch.Generator().manual_seed(5), **options)
    x_1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.ones(8, dtype=torch.float64)
    t_min = torch.full((8,), sde.t_min, dtype=torch.float64)
    m_t, std_t = sde.marginal_coefficients(t)
    m_s, std_s = sde.marginal_coefficients(t_min)
    a = (m_t / m_s)[:, None]
    q = (std_t**2)[:, None] - a**2 * (std_s**2)[:, None]
    expected = (2 - a) * x_1 + q * data.score_fn(sde)(x_1, t)
    torch.testing.assert_close(first.samples, expected)

    noisy = pc_sample(data.score_fn(sde), sde, (8, 2), denoise=False,
                      generator=torch.Generator().manual_seed(5), **options)
    assert not torch.allclose(noisy.samples, expected)


def test_pc_same_seed_same_samples():
    sde = SDES["ve"]()
    score = gaussian_2d().score_fn(sde)
    options = dict(num_steps=20, corrector="langevin", corrector_steps=1)

    first = pc_sample(score, sde, (32, 2), generator=torch.Generator().manual_seed(7), **options)
    second = pc_sample(score, sde, (32, 2), generator=torch.Generator().manual_seed(7),
                       **options)
    other = pc_sample(score, sde, (32, 2), generator=torch.Generator().manual_seed(8), **options)

    assert torch.equal(first.samples, second.samples)
    assert not torch.equal(first.samples, other.samples)


def test_pc_sample_float64():
    sde = SDES["vp"]()
    data = gaussian_2d(torch.float64)

    result = pc_sample(data.score_fn(sde), sde, (NUM_SAMPLES, 2), num_steps=200,
                       dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    assert result.samples.dtype == torch.float64
    assert_moments(result.samples, data.mu, data.cov, bias_allowance=0.02)


def test_pc_sample_rejects_bad_options():
    sde = SDES["vp"]()
    score = gaussian_2d().score_fn(sde)
    for options, name in [({"predictor": "ancestral"}, "predictor"),
                          ({"corrector": "ald"}, "corrector"), ({"snr": 0.0}, "snr"),
                          ({"corrector_steps": 0}, "corrector_steps"),
                          ({"num_steps": 0}, "num_steps"), ({"num_steps": 2.5}, "num_steps")]:
        with pytest.raises(UsageError, match=name):
            pc_sample(score, sde, (4, 2), **options)


# --- image-shaped samples and energy scores --------------------------------------------------


def isotropic_score(sde, mu, var):
    """Exact score of p_t for data with i.i.d. N(mu, var) entries, any trailing shape."""
    def score(x, t):
        m, std = sde.marginal_coefficients(t)
        return -(x - broadcast_to(m, x) * mu) / broadcast_to(m**2 * var + std**2, x)

    return score


@pytest.mark.parametrize("sampler", ["pc", "ode"])
def test_samplers_handle_image_shape(sampler):
    sde = SDES["vp"]()
    mu, var = 0.3, 0.25
    shape = (200, 1, 4, 4)
    generator = torch.Generator().manual_seed(0)
    score = isotropic_score(sde, mu, var)

    if sampler == "pc":
        result = pc_sample(score, sde, shape, num_steps=200, generator=generator)
    else:
        result = ode_sample(score, sde, shape, generator=generator)

    pixels = result.samples.double().flatten()
    n = pixels.numel()
    assert result.samples.shape == shape
    assert abs(pixels.mean().item() - mu) < 4 * math.sqrt(var / n)
    assert abs(pixels.var().item() - var) < 4 * var * math.sqrt(2 / n) + 0.01


class ShrinkToEnergy(torch.nn.Module):
    """net(x, sigma) = (1 - c) x with c = sqrt(sigma / (s^2 + sigma^2)).

    EnergyScore's "residual" energy ||x - net||^2 / (2 sigma) then has the score
    -c^2 x / sigma = -x / (s^2 + sigma^2): the exact VE score of data N(0, s^2 I).
    """

    def __init__(self, data_var):
        super().__init__()
        self.data_var = data_var

    def forward(self, x, sigma):
        c = torch.sqrt(sigma / (self.data_var + sigma**2))
        return broadcast_to(1 - c, x) * x


def test_ode_sample_with_energy_score():
    sde = VESDE(sigma_min=0.01, sigma_max=20.0)
    score = EnergyScore(ShrinkToEnergy(data_var=0.5), sde, form="residual")

    result = ode_sample(score, sde, (NUM_SAMPLES, 2), generator=torch.Generator().manual_seed(4))

    assert not result.samples.requires_grad
    assert_moments(result.samples, torch.zeros(2), 0.5 * torch.eye(2))
