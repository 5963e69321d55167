"""Tests of the forward SDEs against their closed forms (Song et al., ICLR 2021, Appendix B)."""

import math

import numpy as np
import pytest
import torch

from qcsbm.errors import UsageError
from qcsbm.sde import VP_TIME_SCALE, SubVPSDE, VESDE, VPSDE

# Non-default parameters, so that a hard-coded default would fail the closed forms.
SIGMA_MIN, SIGMA_MAX = 0.02, 30.0
BETA_MIN, BETA_MAX = 0.3, 15.0

KINDS = ("ve", "vp", "subvp")
DTYPES = (torch.float32, torch.float64)
SHAPES = ((6, 2), (6, 3, 4, 4))  # 2-D points and images (B, C, H, W)


def make_sde(kind):
    if kind == "ve":
        return VESDE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    if kind == "vp":
        return VPSDE(beta_min=BETA_MIN, beta_max=BETA_MAX)
    return SubVPSDE(beta_min=BETA_MIN, beta_max=BETA_MAX)


def closed_form(kind, t):
    """Return (mean coefficient, std, drift coefficient f(t) with f(x, t) = f(t) x, g) in float64."""
    t = np.asarray(t, dtype=np.float64)
    if kind == "ve":
        sigma = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t
        g = sigma * np.sqrt(2 * np.log(SIGMA_MAX / SIGMA_MIN))
        return np.ones_like(t), sigma, np.zeros_like(t), g

    big_b = BETA_MIN * t + (BETA_MAX - BETA_MIN) * t**2 / 2
    beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    mean_coeff = np.exp(-big_b / 2)
    if kind == "vp":
        return mean_coeff, np.sqrt(1 - np.exp(-big_b)), -beta / 2, np.sqrt(beta)
    return mean_coeff, 1 - np.exp(-big_b), -beta / 2, np.sqrt(beta * (1 - np.exp(-2 * big_b)))


def tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}


def as_tensor(values, dtype):
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def per_sample(values, shape, dtype):
    """Broadcast a (B,) float64 array over a batch of the given shape."""
    return as_tensor(values, dtype).reshape(shape[0], *([1] * (len(shape) - 1)))


def time_grid(batch, dtype):
    return torch.linspace(0.01, 1.0, batch, dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_marginal_prob_closed_form(kind, dtype, shape):
    sde = make_sde(kind)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    t = time_grid(shape[0], dtype)
    mean_coeff, std, _, _ = closed_form(kind, t.double().numpy())

    mean, std_out = sde.marginal_prob(x0, t)

    assert mean.dtype == dtype
    assert std_out.dtype == dtype
    assert mean.shape == x0.shape
    assert std_out.shape == (shape[0],)
    torch.testing.assert_close(mean, per_sample(mean_coeff, shape, dtype) * x0, **tolerance(dtype))
    torch.testing.assert_close(std_out, as_tensor(std, dtype), **tolerance(dtype))
    torch.testing.assert_close(sde.marginal_std(t), as_tensor(std, dtype), **tolerance(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_drift_diffusion_closed_form(kind, dtype, shape):
    sde = make_sde(kind)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    t = time_grid(shape[0], dtype)
    _, _, f_coeff, g = closed_form(kind, t.double().numpy())

    drift, diffusion = sde.drift_diffusion(x, t)

    assert drift.dtype == dtype
    assert diffusion.dtype == dtype
    assert drift.shape == x.shape
    assert diffusion.shape == (shape[0],)
    torch.testing.assert_close(drift, per_sample(f_coeff, shape, dtype) * x, **tolerance(dtype))
    torch.testing.assert_close(diffusion, as_tensor(g, dtype), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_scalar_time_equals_vector(kind, dtype):
    sde = make_sde(kind)
    x = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(2), dtype=dtype)
    t_vector = torch.full((5,), 0.37, dtype=dtype)
    score_fn = lambda x, t: -x  # noqa: E731

    for t_scalar in (0.37, torch.tensor(0.37, dtype=dtype)):
        mean, std = sde.marginal_prob(x, t_scalar)
        mean_ref, std_ref = sde.marginal_prob(x, t_vector)
        torch.testing.assert_close(mean, mean_ref)
        torch.testing.assert_close(std, std_ref)

        drift, diffusion = sde.drift_diffusion(x, t_scalar)
        drift_ref, diffusion_ref = sde.drift_diffusion(x, t_vector)
        torch.testing.assert_close(drift, drift_ref)
        torch.testing.assert_close(diffusion, diffusion_ref)

        noise = torch.ones_like(x)
        torch.testing.assert_close(sde.perturb(x, t_scalar, noise), sde.perturb(x, t_vector, noise))
        torch.testing.assert_close(sde.reverse_drift(score_fn, x, t_scalar),
                                   sde.reverse_drift(score_fn, x, t_vector))
        torch.testing.assert_close(sde.probability_flow_drift(score_fn, x, t_scalar),
                                   sde.probability_flow_drift(score_fn, x, t_vector))


@pytest.mark.parametrize("kind", KINDS)
def test_time_dtype_follows_x(kind):
    # A float64 time must not promote float32 data, and the score receives the converted time.
    sde = make_sde(kind)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(9))
    t = torch.full((4,), 0.5, dtype=torch.float64)
    received = []

    def score_fn(x, t):
        received.append(t)
        return -x

    drift, diffusion = sde.drift_diffusion(x, t)
    mean, std = sde.marginal_prob(x, t)
    assert drift.dtype == torch.float32
    assert diffusion.dtype == torch.float32
    assert mean.dtype == torch.float32
    assert std.dtype == torch.float32
    assert sde.reverse_drift(score_fn, x, 0.5).dtype == torch.float32
    assert sde.probability_flow_drift(score_fn, x, t).dtype == torch.float32
    assert [tuple(t.shape) for t in received] == [(4,), (4,)]
    assert all(t.dtype == torch.float32 for t in received)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_perturb_closed_form(kind, dtype):
    sde = make_sde(kind)
    shape = (6, 2, 3, 3)
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(shape, generator=generator, dtype=dtype)
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    t = time_grid(shape[0], dtype)
    mean_coeff, std, _, _ = closed_form(kind, t.double().numpy())

    x_t = sde.perturb(x0, t, noise)

    expected = per_sample(mean_coeff, shape, dtype) * x0 + per_sample(std, shape, dtype) * noise
    assert x_t.dtype == dtype
    torch.testing.assert_close(x_t, expected, **tolerance(dtype))


@pytest.mark.parametrize("kind", KINDS)
def test_diffusion_solves_variance_ode(kind):
    # Moments of a linear SDE: d mean/dt = f(t) mean and d var/dt = 2 f(t) var + g(t)^2,
    # checked with central finite differences of the implemented marginals in float64.
    sde = make_sde(kind)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-5
    x = torch.ones(t.shape[0], 2, dtype=torch.float64)

    mean_plus, std_plus = sde.marginal_coefficients(t + h)
    mean_minus, std_minus = sde.marginal_coefficients(t - h)
    mean_coeff, std = sde.marginal_coefficients(t)
    drift, diffusion = sde.drift_diffusion(x, t)
    f_coeff = drift[:, 0]

    dvar_dt = (std_plus**2 - std_minus**2) / (2 * h)
    dmean_dt = (mean_plus - mean_minus) / (2 * h)
    torch.testing.assert_close(dvar_dt, 2 * f_coeff * std**2 + diffusion**2, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(dmean_dt, f_coeff * mean_coeff, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_std_accurate_near_zero(kind):
    sde = make_sde(kind)
    t64 = torch.logspace(-7, 0, 400, dtype=torch.float64)

    std32 = sde.marginal_std(t64.float())
    std64 = sde.marginal_std(t64)

    assert std32.dtype == torch.float32
    assert torch.all(std32 > 0)
    relative_error = (std32.double() - std64).abs() / std64
    assert relative_error.max().item() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_prior_sampling_statistics(kind, dtype):
    sde = make_sde(kind)
    expected_std = SIGMA_MAX if kind == "ve" else 1.0
    shape = (4000, 1, 5, 5)
    num_values = math.prod(shape)

    z = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(4), dtype=dtype)

    assert z.shape == shape
    assert z.dtype == dtype
    assert sde.prior_std() == expected_std
    # Five standard errors of the sample mean and of the sample std of a Gaussian.
    assert abs(z.mean().item()) < 5 * expected_std / math.sqrt(num_values)
    assert abs(z.std().item() - expected_std) < 5 * expected_std / math.sqrt(2 * num_values)


@pytest.mark.parametrize("kind", KINDS)
def test_prior_sampling_reproducible(kind):
    sde = make_sde(kind)
    first = sde.prior_sampling((3, 2), generator=torch.Generator().manual_seed(5))
    second = sde.prior_sampling((3, 2), generator=torch.Generator().manual_seed(5))
    third = sde.prior_sampling((3, 2), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(first, third)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_prior_logp_closed_form(kind, dtype, shape):
    sde = make_sde(kind)
    sigma = SIGMA_MAX if kind == "ve" else 1.0
    z = sigma * torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    d = math.prod(shape[1:])
    sq_norm = z.reshape(shape[0], -1).pow(2).sum(dim=1)
    expected = -d / 2 * math.log(2 * math.pi) - d * math.log(sigma) - sq_norm / (2 * sigma**2)

    logp = sde.prior_logp(z.to(dtype))

    assert logp.shape == (shape[0],)
    assert logp.dtype == dtype
    torch.testing.assert_close(logp, expected.to(dtype), **tolerance(dtype))

    # The same value from torch.distributions, summed over all non-batch dimensions.
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64),
                                        torch.full((), sigma, dtype=torch.float64))
    torch.testing.assert_close(logp.double(), normal.log_prob(z).reshape(shape[0], -1).sum(1),
                               **tolerance(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_reverse_and_probability_flow_drift(kind, shape):
    sde = make_sde(kind)
    dtype = torch.float64
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
    t = time_grid(shape[0], dtype)
    _, _, f_coeff, g = closed_form(kind, t.numpy())

    # A known score with a time dependence, so that a wrong t would show.
    def score_fn(x, t):
        return -x * t.reshape(-1, *([1] * (x.dim() - 1))) + 0.5

    score = score_fn(x, t)
    f = per_sample(f_coeff, shape, dtype) * x
    g_squared = per_sample(g**2, shape, dtype)
    torch.testing.assert_close(sde.reverse_drift(score_fn, x, t), f - g_squared * score)
    torch.testing.assert_close(sde.probability_flow_drift(score_fn, x, t),
                               f - 0.5 * g_squared * score)


@pytest.mark.parametrize("dtype", DTYPES)
def test_condition_values(dtype):
    t = torch.tensor([1e-5, 0.25, 1.0], dtype=dtype)
    ve = make_sde("ve")
    _, sigma, _, _ = closed_form("ve", t.double().numpy())
    torch.testing.assert_close(ve.condition(t), as_tensor(sigma, dtype), **tolerance(dtype))
    for kind in ("vp", "subvp"):
        condition = make_sde(kind).condition(t)
        assert condition.dtype == dtype
        torch.testing.assert_close(condition, t * VP_TIME_SCALE)
    assert VP_TIME_SCALE == 999.0


def test_ve_time_of_sigma_inverts_sigma():
    sde = make_sde("ve")
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    torch.testing.assert_close(sde.time_of_sigma(sde.sigma(t)), t)


@pytest.mark.parametrize("make, message", [
    (lambda: VESDE(sigma_min=0.0, sigma_max=1.0), "sigma_min"),
    (lambda: VESDE(sigma_min=2.0, sigma_max=1.0), "sigma_max"),
    (lambda: VPSDE(beta_min=-0.1, beta_max=20.0), "beta_min"),
    (lambda: SubVPSDE(beta_min=5.0, beta_max=1.0), "beta_max"),
    (lambda: VPSDE(t_min=0.0), "t_min"),
    (lambda: VESDE(t_min=1.5), "t_min"),
])
def test_invalid_parameters_raise(make, message):
    with pytest.raises(UsageError, match=message):
        make()
