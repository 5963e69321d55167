"""Likelihood through the probability-flow ODE, against closed-form Gaussian densities.

For data N(mu, cov) the marginal at time t is N(m mu, m^2 cov + std^2 I), so both the exact
score and the exact log p_{t_min}(x) are known. The ODE's result also contains the mismatch
between p_1 and the SDE's prior (small, not zero), so the per-sample checks swap the prior
term for the exact log p_1(x_1) before comparing; the NLL checks compare the raw result.
"""

import math

import pytest
import torch

from qcsbm.errors import UsageError
from qcsbm.likelihood import (LEVELS_8BIT, LEVELS_DIGITS_8X8, LikelihoodResult, bits_per_dim,
                              dequantize, log_likelihood)
from qcsbm.sampling import NFELimitError, ode_sample
from qcsbm.scores import EnergyScore
from qcsbm.sde import VESDE, VPSDE, broadcast_to

MU = [0.8, -0.4, 0.3]
COV = [[1.0, 0.5, 0.2], [0.5, 0.7, -0.1], [0.2, -0.1, 0.5]]

SDES = {
    "ve": lambda: VESDE(sigma_min=0.01, sigma_max=50.0),
    "vp": lambda: VPSDE(beta_min=0.1, beta_max=20.0),
}


def times_matrix(rows, matrix):
    """Return rows @ matrix as a broadcast sum.

    With d = 2 or 3, BLAS matmul gains nothing, and on a loaded 2-core machine its spinning
    threads made each product about ten times slower than this.
    """
    return (rows[:, :, None] * matrix).sum(dim=1)


class GaussianData:
    """Data N(mu, cov) with the exact score and density of every perturbed marginal p_t."""

    def __init__(self, dtype):
        self.mu = torch.tensor(MU, dtype=dtype)
        self.cov = torch.tensor(COV, dtype=dtype)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.cov)

    def score_fn(self, sde):
        def score(x, t):
            m, std = sde.marginal_coefficients(t)
            lam = m[:, None] ** 2 * self.eigenvalues + std[:, None] ** 2
            coords = times_matrix(x - m[:, None] * self.mu, self.eigenvectors)
            return -times_matrix(coords / lam, self.eigenvectors.T)

        return score

    def marginal_log_prob(self, sde, x, t):
        """Return log p_t(x) per sample, in float64, for the scalar time t."""
        m, std = sde.marginal_coefficients(torch.tensor([t], dtype=torch.float64))
        mean = m * self.mu.double()
        cov = m**2 * self.cov.double() + std**2 * torch.eye(len(MU), dtype=torch.float64)
        return torch.distributions.MultivariateNormal(mean, cov).log_prob(x.double())

    def sample(self, n, seed):
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(n, len(MU), generator=generator, dtype=self.mu.dtype)
        return self.mu + z @ torch.linalg.cholesky(self.cov).T


def prior_corrected(result, data, sde):
    """Return the result's log p with the prior term replaced by the exact log p_1(x_1)."""
    return result.delta_logp.double() + data.marginal_log_prob(sde, result.latent, sde.t_max)


# --- exact divergence ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_exact_nll_matches_gaussian(sde_name, dtype):
    sde = SDES[sde_name]()
    data = GaussianData(dtype)
    x = data.sample(100, seed=0)
    expected = data.marginal_log_prob(sde, x, sde.t_min)

    result = log_likelihood(data.score_fn(sde), sde, x)

    assert isinstance(result, LikelihoodResult)
    assert result.logp.shape == (100,)
    assert result.logp.dtype == dtype
    assert result.nfe > 0
    torch.testing.assert_close(result.logp, result.prior_logp + result.delta_logp)

    # The mean NLL within 1% of the closed form, prior mismatch included.
    nll, expected_nll = -result.logp.double().mean(), -expected.mean()
    assert abs(nll - expected_nll) < 0.01 * abs(expected_nll)

    # Per sample, with the exact p_1 in place of the prior: only solver error remains.
    torch.testing.assert_close(prior_corrected(result, data, sde), expected, rtol=0, atol=2e-3)


def test_latent_decodes_back_to_data():
    sde = SDES["vp"]()
    data = GaussianData(torch.float64)
    x = data.sample(16, seed=1)
    score = data.score_fn(sde)

    encoded = log_likelihood(score, sde, x, rtol=1e-7, atol=1e-7)
    decoded = ode_sample(score, sde, x.shape, x_1=encoded.latent, rtol=1e-7, atol=1e-7,
                         denoise=False, dtype=torch.float64)

    torch.testing.assert_close(decoded.samples, x, rtol=0, atol=1e-5)


def test_start_time_t_min_argument():
    sde = SDES["vp"]()
    data = GaussianData(torch.float64)
    x = data.sample(32, seed=2)

    result = log_likelihood(data.score_fn(sde), sde, x, t_min=0.05)

    expected = data.marginal_log_prob(sde, x, 0.05)
    torch.testing.assert_close(prior_corrected(result, data, sde), expected, rtol=0, atol=2e-3)
    # The density at t = 0.05 differs clearly from the one at sde.t_min.
    assert (expected - data.marginal_log_prob(sde, x, sde.t_min)).abs().max() > 0.05


# --- Hutchinson divergence -----------------------------------------------------------------


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_hutchinson_agrees_within_standard_error(sde_name, probe):
    sde = SDES[sde_name]()
    data = GaussianData(torch.float32)
    x = data.sample(200, seed=3)
    score = data.score_fn(sde)

    exact = log_likelihood(score, sde, x)
    estimate = log_likelihood(score, sde, x, divergence="hutchinson", probe=probe,
                              generator=torch.Generator().manual_seed(4))

    difference = (estimate.logp - exact.logp).double()
    standard_error = difference.std() / math.sqrt(len(difference))
    assert difference.std() > 0.05  # the estimate is random per sample
    assert abs(difference.mean()) < 4 * standard_error


def test_hutchinson_more_probes_lower_spread():
    sde = SDES["vp"]()
    data = GaussianData(torch.float32)
    x = data.sample(100, seed=5)
    score = data.score_fn(sde)
    exact = log_likelihood(score, sde, x).logp

    spreads = []
    for num_probes in (1, 16):
        estimate = log_likelihood(score, sde, x, divergence="hutchinson", num_probes=num_probes,
                                  generator=torch.Generator().manual_seed(6))
        spreads.append((estimate.logp - exact).std().item())

    # K probes divide the variance by K, so 16 probes cut the spread by about 4.
    assert spreads[1] < spreads[0] / 2.5


def test_hutchinson_same_seed_same_result():
    sde = SDES["ve"]()
    data = GaussianData(torch.float32)
    x = data.sample(8, seed=7)
    score = data.score_fn(sde)
    options = dict(divergence="hutchinson", rtol=1e-4, atol=1e-4)

    first = log_likelihood(score, sde, x, generator=torch.Generator().manual_seed(8), **options)
    second = log_likelihood(score, sde, x, generator=torch.Generator().manual_seed(8), **options)

    assert torch.equal(first.logp, second.logp)


# --- energy scores, NFE, options -------------------------------------------------------------


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


def test_energy_score_likelihood():
    sde = VESDE(sigma_min=0.01, sigma_max=20.0)
    data_var = 0.5
    score = EnergyScore(ShrinkToEnergy(data_var), sde, form="residual")
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = x * math.sqrt(data_var)

    result = log_likelihood(score, sde, x)

    def isotropic_log_prob(y, t):
        var = data_var + sde.sigma(torch.tensor(t, dtype=torch.float64)) ** 2
        return (-0.5 * y.pow(2).sum(dim=1) / var - math.log(2 * math.pi * var)).double()

    corrected = result.delta_logp + isotropic_log_prob(result.latent, 1.0)
    torch.testing.assert_close(corrected, isotropic_log_prob(x, sde.t_min), rtol=0, atol=2e-3)


def test_likelihood_nfe_and_max_nfe():
    sde = SDES["ve"]()
    data = GaussianData(torch.float32)
    x = data.sample(8, seed=10)
    calls = []

    def score(y, t):
        calls.append(1)
        return data.score_fn(sde)(y, t)

    result = log_likelihood(score, sde, x, divergence="hutchinson")
    assert result.nfe == len(calls)
    assert result.nfe > 1

    with pytest.raises(NFELimitError, match=r"rtol=0.001, atol=1e-05\) exceeded max_nfe=4 "):
        log_likelihood(score, sde, x, rtol=1e-3, max_nfe=4)


def test_likelihood_rejects_bad_options():
    sde = SDES["vp"]()
    data = GaussianData(torch.float32)
    score = data.score_fn(sde)
    x = data.sample(4, seed=11)
    cases = [({"divergence": "exact-ish"}, "divergence"), ({"method": "euler"}, "method"),
             ({"t_min": 0.0}, "t_min"), ({"t_min": 1.0}, "t_min"), ({"rtol": 0}, "rtol"),
             ({"max_nfe": 0}, "max_nfe"),
             ({"divergence": "hutchinson", "num_probes": 0}, "num_probes"),
             ({"divergence": "hutchinson", "probe": "uniform"}, "probe")]
    for options, name in cases:
        with pytest.raises(UsageError, match=name):
            log_likelihood(score, sde, x, **options)

    with pytest.raises(UsageError, match="floating-point"):
        log_likelihood(score, sde, torch.zeros(4, 3, dtype=torch.long))


# --- bits per dimension and dequantization ------------------------------------------------


def test_bits_per_dim_hand_computation():
    # 8-bit CIFAR-sized data mapped to [-1, 1]: -logp / (d ln 2) - log2(2) + log2(256).
    logp = torch.tensor([-5000.0, -3072.0], dtype=torch.float64)
    d = 3 * 32 * 32
    expected = torch.tensor([5000 / (d * math.log(2)) + 7, 3072 / (d * math.log(2)) + 7],
                            dtype=torch.float64)

    result = bits_per_dim(logp, d, num_levels=LEVELS_8BIT, data_scale=2.0)

    torch.testing.assert_close(result, expected)


def test_bits_per_dim_digits_levels():
    logp = torch.tensor([-100.0])
    result = bits_per_dim(logp, 64, num_levels=LEVELS_DIGITS_8X8)

    assert LEVELS_DIGITS_8X8 == 17
    assert result.item() == pytest.approx(100 / (64 * math.log(2)) + math.log2(17))


@pytest.mark.parametrize("data_scale", [1.0, 2.0, 255.0])
def test_bits_per_dim_uniform_model_costs_log2_levels(data_scale):
    # A uniform density on the model's data cube [0, data_scale]^d gives every one of the
    # L^d discrete values probability L^-d: log2(L) bits per dimension, whatever the scale.
    d, levels = 12, 256
    logp = torch.tensor([-d * math.log(data_scale)], dtype=torch.float64)

    result = bits_per_dim(logp, d, num_levels=levels, data_scale=data_scale)

    assert result.item() == pytest.approx(8.0)


def test_bits_per_dim_rejects_bad_arguments():
    logp = torch.zeros(2)
    for kwargs, name in [({"num_dims": 0}, "num_dims"), ({"num_dims": 2.0}, "num_dims"),
                         ({"num_dims": 4, "num_levels": 1}, "num_levels"),
                         ({"num_dims": 4, "data_scale": 0.0}, "data_scale")]:
        with pytest.raises(UsageError, match=name):
            bits_per_dim(logp, **kwargs)


def test_dequantize_stays_in_level_bin():
    levels = torch.arange(17).repeat(50)

    y = dequantize(levels, LEVELS_DIGITS_8X8, generator=torch.Generator().manual_seed(0))

    assert y.dtype == torch.float32
    assert torch.all(y >= levels / 17)
    assert torch.all(y < (levels + 1) / 17)
    # The offsets u = 17 y - k are uniform on [0, 1): mean 1/2, std 1/sqrt(12).
    offsets = (17 * y - levels).double()
    assert abs(offsets.mean().item() - 0.5) < 4 / math.sqrt(12 * len(offsets))


def test_dequantize_rejects_out_of_range_levels():
    with pytest.raises(UsageError, match="num_levels"):
        dequantize(torch.tensor([0, 256]), 256)
    with pytest.raises(UsageError, match="integers"):
        dequantize(torch.tensor([0.5]), 256)
