"""Tests of the 2-D noise-conditional network and its two score parameterizations."""

import copy

import pytest
import torch
from torch.nn import functional as F

from qcsbm.errors import UsageError
from qcsbm.jacobian import jacobian_asymmetry
from qcsbm.nets.toy2d import Swish, ToyScoreNet
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import VESDE


def make_batch(batch=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, generator=generator, dtype=dtype) * 3
    t = torch.rand(batch, generator=generator, dtype=dtype) * 0.98 + 0.01
    return x, t


def test_output_shape_and_dtype():
    torch.manual_seed(0)
    net = ToyScoreNet()
    x, _ = make_batch()
    sigma = torch.linspace(0.1, 3.0, len(x))

    out = net(x, sigma)

    assert out.shape == (16, 2)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_float64_forward_matches_float32():
    torch.manual_seed(0)
    net32 = ToyScoreNet()
    net64 = copy.deepcopy(net32).double()
    x, _ = make_batch(dtype=torch.float64)
    sigma = torch.full((len(x),), 0.5, dtype=torch.float64)

    out = net64(x, sigma)

    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), net32(x.float(), sigma.float()),
                               rtol=1e-5, atol=1e-5)


def test_scalar_cond_matches_vector():
    torch.manual_seed(0)
    net = ToyScoreNet()
    x, _ = make_batch()

    torch.testing.assert_close(net(x, 0.7), net(x, torch.full((len(x),), 0.7)))
    torch.testing.assert_close(net(x, torch.tensor(0.7)), net(x, torch.full((len(x),), 0.7)))


def test_noise_level_changes_output():
    torch.manual_seed(0)
    net = ToyScoreNet()
    x, _ = make_batch()

    assert not torch.allclose(net(x, 0.1), net(x, 3.0))


def test_layer_widths_follow_paper():
    net = ToyScoreNet()
    linear_shapes = [tuple(m.weight.shape) for m in net.modules()
                     if isinstance(m, torch.nn.Linear)]
    swish_widths = [m.beta.numel() for m in net.modules() if isinstance(m, Swish)]

    # (out, in) for the input branch, the noise branch and the head, in order.
    assert linear_shapes == [(64, 2), (128, 64), (256, 128), (1, 1), (1, 1), (1, 1), (2, 257)]
    assert swish_widths == [64, 128, 1, 1, 257]


def test_swish_is_x_sigmoid_beta_x():
    swish = Swish(3)
    with torch.no_grad():
        swish.beta.copy_(torch.tensor([1.0, 0.5, 2.0]))
    x = torch.tensor([[-1.0, 0.3, 2.0]])

    expected = x * torch.sigmoid(torch.tensor([1.0, 0.5, 2.0]) * x)
    torch.testing.assert_close(swish(x), expected)
    torch.testing.assert_close(Swish(3)(x), F.silu(x))


def test_energy_head_applies_elu():
    torch.manual_seed(0)
    plain = ToyScoreNet()
    energy = ToyScoreNet(energy_head=True)
    energy.load_state_dict(plain.state_dict())
    x, _ = make_batch(batch=256)
    x = x * 10

    out = energy(x, 0.5)

    torch.testing.assert_close(out, F.elu(plain(x, 0.5)))
    assert (out >= -1).all()
    assert "energy_head=True" in repr(energy)


def test_all_parameters_get_gradients():
    torch.manual_seed(0)
    net = ToyScoreNet()
    x, _ = make_batch()

    net(x, torch.linspace(0.1, 3.0, len(x))).square().sum().backward()

    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_usbm_residual_score():
    torch.manual_seed(0)
    sde = VESDE(0.1, 3.0)
    net = ToyScoreNet()
    score = UnconstrainedScore(net, sde, output="residual")
    x, t = make_batch()

    sigma = sde.sigma(t)
    expected = (x - net(x, sigma)) / sigma[:, None]
    torch.testing.assert_close(score(x, t), expected)


def test_csbm_energy_score_matches_autograd():
    torch.manual_seed(0)
    sde = VESDE(0.1, 3.0)
    net = ToyScoreNet(energy_head=True).double()
    score = EnergyScore(net, sde, form="residual")
    x, t = make_batch(dtype=torch.float64)

    x_leaf = x.clone().requires_grad_(True)
    sigma = sde.sigma(t)
    energy = (x_leaf - F.elu(net.head(net.head_activation(torch.cat(
        [net.input_branch(x_leaf), net.noise_branch(sigma[:, None])], dim=1))))).square()
    energy = energy.sum(dim=1) / (2 * sigma)
    (grad,) = torch.autograd.grad(energy.sum(), x_leaf)

    torch.testing.assert_close(score(x, t), -grad)


def test_energy_score_jacobian_symmetric():
    torch.manual_seed(0)
    sde = VESDE(0.1, 3.0)
    x, t = make_batch(batch=32, dtype=torch.float64)
    csbm = EnergyScore(ToyScoreNet(energy_head=True).double(), sde, form="residual")
    usbm = UnconstrainedScore(ToyScoreNet().double(), sde, output="residual")

    csbm_asym = jacobian_asymmetry(lambda y: csbm(y, t), x, create_graph=False)
    usbm_asym = jacobian_asymmetry(lambda y: usbm(y, t), x, create_graph=False)

    assert csbm_asym.shape == (32,)
    assert csbm_asym.abs().max() < 1e-10
    # An untrained unconstrained network is far from conservative, so the bound above can
    # fail for a score that is not a gradient.
    assert usbm_asym.min() > 1e-8
    assert usbm_asym.mean() > 1e-4


def test_invalid_shapes_rejected():
    net = ToyScoreNet()
    with pytest.raises(UsageError, match=r"x of shape \(4, 3\)"):
        net(torch.zeros(4, 3), 0.5)
    with pytest.raises(UsageError, match=r"cond of shape \(3,\)"):
        net(torch.zeros(4, 2), torch.ones(3))
