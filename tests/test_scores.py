"""Tests of the score parameterizations: unconstrained outputs and energy gradients."""

import math

import pytest
import torch
from torch import nn

from qcsbm.errors import UsageError
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import SubVPSDE, VESDE, VPSDE

BETA_MIN, BETA_MAX = 0.1, 20.0


def make_sde(kind):
    if kind == "ve":
        return VESDE(sigma_min=0.01, sigma_max=50.0)
    if kind == "vp":
        return VPSDE(beta_min=BETA_MIN, beta_max=BETA_MAX)
    return SubVPSDE(beta_min=BETA_MIN, beta_max=BETA_MAX)


def vp_std(t):
    """The VP marginal std sqrt(1 - exp(-B(t))) in float64."""
    big_b = BETA_MIN * t + (BETA_MAX - BETA_MIN) * t**2 / 2
    return torch.sqrt(1 - torch.exp(-big_b))


class AffineNet(nn.Module):
    """net(x, c) = W x + c b on flattened x: a network whose energy gradient has a closed form."""

    def __init__(self, d, generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d, generator=generator, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(d, generator=generator, dtype=torch.float64))

    def forward(self, x, cond):
        flat = x.reshape(x.shape[0], -1)
        out = flat @ self.weight.T + cond[:, None] * self.bias
        return out.reshape(x.shape)


class MLP(nn.Module):
    """A small nonlinear network on flattened x and log(1 + c), any input shape."""

    def __init__(self, d, dtype=torch.float64, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            layers = nn.Sequential(nn.Linear(d + 1, 16), nn.Tanh(), nn.Linear(16, d))
        self.layers = layers.to(dtype)

    def forward(self, x, cond):
        flat = x.reshape(x.shape[0], -1)
        inputs = torch.cat([flat, torch.log1p(cond)[:, None].to(flat.dtype)], dim=1)
        return self.layers(inputs).reshape(x.shape)


def make_models(sde, d, dtype=torch.float64):
    """Return every parameterization of a fresh MLP, keyed by a readable id."""
    return {
        "score": UnconstrainedScore(MLP(d, dtype), sde, output="score"),
        "noise": UnconstrainedScore(MLP(d, dtype), sde, output="noise"),
        "residual": UnconstrainedScore(MLP(d, dtype), sde, output="residual"),
        "energy-residual": EnergyScore(MLP(d, dtype), sde, form="residual"),
        "energy-norm": EnergyScore(MLP(d, dtype), sde, form="norm"),
    }


MODEL_IDS = ("score", "noise", "residual", "energy-residual", "energy-norm")


def batch(shape=(5, 3), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    t = torch.rand(shape[0], generator=generator, dtype=torch.float64) * 0.9 + 0.05
    return x, t


@pytest.mark.parametrize("output", ["score", "noise", "residual"])
def test_unconstrained_output_by_hand(output):
    sde = make_sde("vp")
    x, t = batch()
    net = AffineNet(3, torch.Generator().manual_seed(1))
    model = UnconstrainedScore(net, sde, output=output)

    out = x @ net.weight.T + (999 * t)[:, None] * net.bias
    std = vp_std(t)[:, None]
    expected = {"score": out, "noise": -out / std, "residual": (x - out) / std}[output]

    torch.testing.assert_close(model(x, t), expected)


@pytest.mark.parametrize("form", ["residual", "norm"])
def test_energy_score_closed_form(form):
    sde = make_sde("vp")
    x, t = batch(seed=2)
    net = AffineNet(3, torch.Generator().manual_seed(3))
    model = EnergyScore(net, sde, form=form)
    weight, bias = net.weight.detach(), net.bias.detach()
    out = x @ weight.T + (999 * t)[:, None] * bias
    std = vp_std(t)

    if form == "residual":
        # E = ||x - out||^2 / (2 std), so grad E = (I - W)^T (x - out) / std.
        residual = x - out
        expected_energy = residual.pow(2).sum(1) / (2 * std)
        expected_score = -(residual @ (torch.eye(3, dtype=x.dtype) - weight)) / std[:, None]
    else:
        # E = ||out||^2 / (2 std), so grad E = W^T out / std.
        expected_energy = out.pow(2).sum(1) / (2 * std)
        expected_score = -(out @ weight) / std[:, None]

    torch.testing.assert_close(model.energy(x, t), expected_energy)
    torch.testing.assert_close(model(x, t), expected_score)


@pytest.mark.parametrize("form", ["residual", "norm"])
@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3, 3)])
def test_energy_score_is_minus_gradient(form, shape):
    sde = make_sde("ve")
    x, t = batch(shape, seed=4)
    model = EnergyScore(MLP(math.prod(shape[1:])), sde, form=form)

    x_leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.energy(x_leaf, t).sum(), x_leaf)

    score = model(x, t)
    assert score.shape == shape
    torch.testing.assert_close(score, -grad)


@pytest.mark.parametrize("form", ["residual", "norm"])
def test_energy_score_parameter_gradient_matches_double_backward(form):
    sde = make_sde("vp")
    x, t = batch(seed=5)
    model = EnergyScore(MLP(3), sde, form=form)
    params = list(model.parameters())

    loss = model(x, t).pow(2).sum()
    grads = torch.autograd.grad(loss, params)

    x_leaf = x.clone().requires_grad_(True)
    (energy_grad,) = torch.autograd.grad(model.energy(x_leaf, t).sum(), x_leaf, create_graph=True)
    expected = torch.autograd.grad(energy_grad.pow(2).sum(), params)

    for grad, reference in zip(grads, expected):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, reference)


def test_energy_score_differentiable_in_x():
    # With x in a graph, the score's Jacobian is minus the Hessian of the energy: symmetric.
    sde = make_sde("vp")
    x, t = batch(seed=6)
    model = EnergyScore(MLP(3), sde)
    x_leaf = x.clone().requires_grad_(True)

    score = model(x_leaf, t)
    rows = [torch.autograd.grad(score[:, i].sum(), x_leaf, retain_graph=True)[0] for i in range(3)]
    jac = torch.stack(rows, dim=1)

    hessian = torch.stack([torch.autograd.functional.hessian(
        lambda xi: model.energy(xi[None], t[b:b + 1]).sum(), x[b]) for b in range(x.shape[0])])
    torch.testing.assert_close(jac, -hessian)
    torch.testing.assert_close(jac, jac.transpose(1, 2))


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_no_graph_under_no_grad(model_id):
    sde = make_sde("vp")
    x, t = batch(seed=7)
    model = make_models(sde, 3)[model_id]

    with_grad = model(x, t)
    with torch.no_grad():
        without_grad = model(x, t)

    assert with_grad.requires_grad
    assert not without_grad.requires_grad
    assert without_grad.grad_fn is None
    torch.testing.assert_close(without_grad, with_grad.detach())


def test_inference_mode():
    sde = make_sde("vp")
    x, t = batch(seed=11)
    models = make_models(sde, 3)

    with torch.inference_mode():
        score = models["noise"](x, t)
    torch.testing.assert_close(score, models["noise"](x, t).detach())

    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.no_grad"):
        models["energy-residual"](x, t)


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("x_requires_grad", [True, False])
@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_caller_input_unchanged(model_id, x_requires_grad, grad_enabled):
    sde = make_sde("vp")
    x, t = batch(seed=8)
    x.requires_grad_(x_requires_grad)
    x_before = x.detach().clone()
    model = make_models(sde, 3)[model_id]

    with torch.set_grad_enabled(grad_enabled):
        model(x, t)

    assert torch.equal(x.detach(), x_before)
    assert x.requires_grad == x_requires_grad
    assert x.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("model_id", ["noise", "energy-residual", "energy-norm"])
def test_score_finite_near_zero(model_id, kind, dtype):
    sde = make_sde(kind)
    model = make_models(sde, 2, dtype)[model_id]
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(9), dtype=dtype)
    t = torch.tensor([1e-7, 1e-6, 1e-5, sde.t_min], dtype=dtype)

    for grad_enabled in (True, False):
        with torch.set_grad_enabled(grad_enabled):
            score = model(x, t)
        assert score.dtype == dtype
        assert torch.isfinite(score).all()


@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_network_receives_sde_condition(kind):
    sde = make_sde(kind)
    received = []

    class RecordingNet(nn.Module):
        def forward(self, x, cond):
            received.append(cond)
            return x

    x, t = batch(seed=10)
    UnconstrainedScore(RecordingNet(), sde)(x, t)
    EnergyScore(RecordingNet(), sde, form="norm")(x, t)

    expected = sde.sigma(t) if kind == "ve" else 999 * t
    assert len(received) == 2
    for cond in received:
        torch.testing.assert_close(cond, expected)


def test_energy_score_flag():
    sde = make_sde("vp")
    assert EnergyScore(MLP(2), sde).is_energy
    assert not UnconstrainedScore(MLP(2), sde).is_energy


def test_invalid_output_raises():
    with pytest.raises(UsageError, match="output 'eps'"):
        UnconstrainedScore(MLP(2), make_sde("vp"), output="eps")


def test_invalid_form_raises():
    with pytest.raises(UsageError, match="form 'quadratic'"):
        EnergyScore(MLP(2), make_sde("vp"), form="quadratic")
