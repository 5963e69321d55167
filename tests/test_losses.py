"""Denoising score matching and the quasi-conservative objective."""

import math

import pytest
import torch
from torch import nn

from qcsbm.errors import UsageError
from qcsbm.losses import Objective, backward_two_stage, dsm_from_score, perturb_batch, qc_loss
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import VESDE, VPSDE


class GaussianScore(nn.Module):
    """The exact score of data N(0, s^2 I) perturbed by an SDE."""

    def __init__(self, sde, data_std):
        super().__init__()
        self.sde = sde
        self.data_std = data_std

    def forward(self, x, t):
        mean_coeff, std = self.sde.marginal_coefficients(t)
        variance = mean_coeff**2 * self.data_std**2 + std**2
        return -x / variance.reshape(-1, *([1] * (x.dim() - 1)))


class SmallNet(nn.Module):
    def __init__(self, d, hidden=16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d + 1, hidden), nn.Tanh(), nn.Linear(hidden, d))

    def forward(self, x, cond):
        return self.body(torch.cat([x, cond.log()[:, None]], dim=1))


@pytest.mark.parametrize("sde", [VESDE(0.1, 3.0), VPSDE(0.1, 20.0)])
def test_dsm_of_exact_score_is_irreducible(sde):
    # For data N(0, s^2 I) the minimum of 1/2 E||std s + z||^2 at fixed t is
    # d/2 * m^2 s^2 / (m^2 s^2 + std^2), with m the mean coefficient.
    torch.manual_seed(0)
    d, data_std, n = 3, 0.7, 200_000
    t = torch.full((n,), 0.4, dtype=torch.float64)
    x0 = data_std * torch.randn(n, d, dtype=torch.float64)
    batch = perturb_batch(sde, x0, t=t)
    score = GaussianScore(sde, data_std)(batch.x_t, t)
    loss = dsm_from_score(score, batch, sde).mean()

    mean_coeff, std = sde.marginal_coefficients(t[:1])
    signal = float(mean_coeff**2) * data_std**2
    expected = 0.5 * d * signal / (signal + float(std) ** 2)
    stderr = dsm_from_score(score, batch, sde).std() / math.sqrt(n)
    assert abs(float(loss) - expected) < 4 * float(stderr)


def test_likelihood_weighting_scales_by_g2_over_std2():
    sde = VESDE(0.1, 3.0)
    x0 = torch.randn(8, 2, dtype=torch.float64)
    batch = perturb_batch(sde, x0, generator=torch.Generator().manual_seed(0))
    score = torch.randn_like(x0)
    plain = dsm_from_score(score, batch, sde, "sigma2")
    weighted = dsm_from_score(score, batch, sde, "likelihood")
    _, g = sde.drift_diffusion(batch.x_t, batch.t)
    torch.testing.assert_close(weighted, plain * g**2 / batch.std**2)


def test_lambda_zero_gives_plain_dsm():
    sde = VESDE(0.1, 3.0)
    model = UnconstrainedScore(SmallNet(2).double(), sde, output="residual")
    x0 = torch.randn(16, 2, dtype=torch.float64)
    terms = qc_loss(model, sde, x0, Objective(lambda_qc=0.0),
                    generator=torch.Generator().manual_seed(1))
    assert terms.penalty.numel() == 0
    torch.testing.assert_close(terms.total, terms.dsm.mean())


@pytest.mark.parametrize("estimator", ["exact", "hutchinson", "nonnegative"])
def test_penalty_is_std2_weighted_asymmetry(estimator):
    from qcsbm.jacobian import jacobian_asymmetry

    sde = VESDE(0.1, 3.0)
    model = UnconstrainedScore(SmallNet(2).double(), sde, output="residual")
    x0 = torch.randn(32, 2, dtype=torch.float64)
    objective = Objective(lambda_qc=0.5, estimator=estimator, num_probes=4000)
    terms = qc_loss(model, sde, x0, objective, generator=torch.Generator().manual_seed(2))

    x_t = sde.perturb(x0, terms.t, _noise_of(sde, x0, terms))
    exact = terms.std**2 * jacobian_asymmetry(lambda x: model(x, terms.t), x_t)
    tolerance = 1e-10 if estimator == "exact" else 0.1 * float(exact.abs().max()) + 1e-8
    assert float((terms.penalty - exact).detach().abs().max()) < tolerance
    torch.testing.assert_close(terms.total, terms.dsm.mean() + 0.5 * terms.penalty.mean())


def _noise_of(sde, x0, terms):
    """Recover z from the generator stream the loss used (same seed, same draw order)."""
    batch = perturb_batch(sde, x0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(batch.t, terms.t)
    return batch.noise


def test_penalty_fraction_penalizes_leading_rows():
    sde = VESDE(0.1, 3.0)
    model = UnconstrainedScore(SmallNet(2).double(), sde, output="residual")
    x0 = torch.randn(10, 2, dtype=torch.float64)
    objective = Objective(lambda_qc=1.0, estimator="exact", penalty_fraction=0.25)
    terms = qc_loss(model, sde, x0, objective, generator=torch.Generator().manual_seed(3))
    assert terms.penalty.shape == (3,)
    assert terms.dsm.shape == (10,)


def test_energy_model_penalty_is_zero():
    sde = VESDE(0.1, 3.0)
    model = EnergyScore(SmallNet(3).double(), sde, form="residual")
    x0 = torch.randn(12, 3, dtype=torch.float64)
    terms = qc_loss(model, sde, x0, Objective(lambda_qc=1.0, estimator="exact"),
                    generator=torch.Generator().manual_seed(4))
    assert float(terms.penalty.abs().max()) < 1e-10


@pytest.mark.parametrize("num_probes,fraction", [(1, 1.0), (3, 1.0), (2, 0.5)])
def test_two_stage_backward_matches_plain_autograd(num_probes, fraction):
    sde = VESDE(0.1, 3.0)
    torch.manual_seed(5)
    model = UnconstrainedScore(SmallNet(3).double(), sde, output="residual")
    x0 = torch.randn(12, 3, dtype=torch.float64)
    objective = Objective(lambda_qc=0.7, estimator="hutchinson", num_probes=num_probes,
                          penalty_fraction=fraction)

    plain = qc_loss(model, sde, x0, objective, generator=torch.Generator().manual_seed(6))
    plain.total.backward()
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    staged = backward_two_stage(model, sde, x0, objective,
                                generator=torch.Generator().manual_seed(6))
    for expected, param in zip(plain_grads, model.parameters()):
        assert float((param.grad - expected).abs().max()) < 1e-10
    torch.testing.assert_close(staged.penalty, plain.penalty.detach())


def test_two_stage_rejects_other_estimators():
    sde = VESDE(0.1, 3.0)
    model = UnconstrainedScore(SmallNet(2).double(), sde, output="residual")
    with pytest.raises(UsageError, match="estimator"):
        backward_two_stage(model, sde, torch.zeros(2, 2, dtype=torch.float64),
                           Objective(lambda_qc=1.0, estimator="exact"))


@pytest.mark.parametrize("field,value", [
    ("lambda_qc", -0.1), ("lambda_qc", float("nan")), ("num_probes", 0),
    ("estimator", "hutch"), ("probe", "uniform"), ("penalty_fraction", 0.0),
    ("penalty_fraction", 1.5), ("weighting", "none"),
])
def test_objective_rejects_bad_values(field, value):
    with pytest.raises(UsageError, match=field):
        Objective(**{field: value})
