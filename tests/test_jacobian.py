"""Tests of the Jacobian math against plain autograd and closed forms, in float64."""

import pytest
import torch
from torch import nn

from qcsbm import jacobian as jm
from qcsbm.errors import UsageError
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import VPSDE

DTYPE = torch.float64
DIMS = (2, 3, 4, 5, 6)
ROTATION = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=DTYPE)


def make_net(d, seed=0):
    """Build a random tanh MLP from R^d to R^d in float64, whose Jacobian is not symmetric."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(d, 24), nn.Tanh(), nn.Linear(24, d))
    return net.to(DTYPE)


class ConditionedMLP(nn.Module):
    """net(x, cond) on flattened x, for wrapping in a score parameterization."""

    def __init__(self, d, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            layers = nn.Sequential(nn.Linear(d + 1, 24), nn.Tanh(), nn.Linear(24, d))
        self.layers = layers.to(DTYPE)

    def forward(self, x, cond):
        flat = x.reshape(x.shape[0], -1)
        return self.layers(torch.cat([flat, cond[:, None] / 1000], dim=1)).reshape(x.shape)


class ConvNet(nn.Module):
    """A small convolutional map from (B, C, H, W) to the same shape."""

    def __init__(self, channels=2, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            layers = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.Tanh(),
                                   nn.Conv2d(4, channels, 3, padding=1))
        self.layers = layers.to(DTYPE)

    def forward(self, x):
        return self.layers(x)


def jacobian_parameters(module):
    """Every parameter except the last bias, which shifts the output but not the Jacobian."""
    return list(module.parameters())[:-1]


def random_batch(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def reference_jacobian(fn, x):
    """The per-sample Jacobian (B, d, d) from torch.autograd.functional.jacobian."""
    d = x[0].numel()
    rows = []
    for sample in x:
        jac = torch.autograd.functional.jacobian(lambda xi: fn(xi[None])[0], sample)
        rows.append(jac.reshape(d, d))
    return torch.stack(rows)


def reference_traces(jac):
    """Return (tr(J J^T) - tr(J J), tr(J J^T), tr(J)) per sample."""
    tr_jjt = torch.einsum("bij,bij->b", jac, jac)
    tr_jj = torch.einsum("bij,bji->b", jac, jac)
    return tr_jjt - tr_jj, tr_jjt, jac.diagonal(dim1=1, dim2=2).sum(dim=1)


def at_time(model, t):
    """Return x -> model(x, t) for any batch size, with the same time t for every sample."""
    return lambda x: model(x, torch.full((x.shape[0],), t, dtype=x.dtype))


def energy_model(d, seed=0):
    """Return an energy-based score model and x -> its score at t = 0.3."""
    model = EnergyScore(ConditionedMLP(d, seed), VPSDE())
    return model, at_time(model, 0.3)


def assert_mean_within_three_standard_errors(per_probe, exact):
    """Assert that the mean of per_probe (N, B), N one-probe estimates per sample, matches exact.

    A correct estimator fails one comparison in about 370, so the probes come from fixed seeds.
    """
    mean = per_probe.mean(dim=0)
    standard_error = per_probe.std(dim=0) / per_probe.shape[0] ** 0.5
    deviation = (mean - exact).abs()
    assert torch.all(deviation <= 3 * standard_error + 1e-10), (
        f"mean {mean.tolist()} vs exact {exact.tolist()}, standard error "
        f"{standard_error.tolist()}")


def single_probe_estimates(estimator, fn, x, num_repeats, **kwargs):
    """Run a one-probe estimator on x repeated num_repeats times: shape (num_repeats, B).

    Every row of the repeated batch draws its own probe, so the rows are independent.
    """
    repeated = x.repeat(num_repeats, *([1] * (x.dim() - 1)))
    estimates = estimator(fn, repeated, num_probes=1, **kwargs)
    return estimates.reshape(num_repeats, x.shape[0])


# --- exact Jacobian ----------------------------------------------------------------------------


@pytest.mark.parametrize("d", DIMS)
def test_jacobian_matches_autograd_functional(d):
    net = make_net(d, seed=d)
    x = random_batch((4, d), seed=d)
    torch.testing.assert_close(jm.jacobian(net, x), reference_jacobian(net, x))


def test_jacobian_image_batch():
    net = ConvNet()
    x = random_batch((3, 2, 3, 3))
    jac = jm.jacobian(net, x)
    assert jac.shape == (3, 18, 18)
    torch.testing.assert_close(jac, reference_jacobian(net, x))


def test_jacobian_graph_follows_grad_mode():
    net = make_net(3)
    x = random_batch((4, 3))
    assert jm.jacobian(net, x).requires_grad
    with torch.no_grad():
        jac = jm.jacobian(net, x)
    assert not jac.requires_grad
    assert not jm.jacobian(net, x, create_graph=False).requires_grad


# --- asymmetry and NAsym -----------------------------------------------------------------------


@pytest.mark.parametrize("d", DIMS)
def test_exact_asymmetry_matches_reference(d):
    net = make_net(d, seed=10 + d)
    x = random_batch((4, d), seed=d)
    asym, tr_jjt, _ = reference_traces(reference_jacobian(net, x))

    torch.testing.assert_close(jm.jacobian_asymmetry(net, x, method="exact"), asym)
    torch.testing.assert_close(jm.nasym(net, x, method="exact"), asym / (2 * tr_jjt))
    assert torch.all(asym > 1e-3)


@pytest.mark.parametrize("probe", jm.PROBES)
@pytest.mark.parametrize("method", ["hutchinson", "nonnegative"])
@pytest.mark.parametrize("d", DIMS)
def test_hutchinson_asymmetry_unbiased(d, method, probe):
    net = make_net(d, seed=20 + d)
    x = random_batch((3, d), seed=d)
    exact = jm.jacobian_asymmetry(net, x, method="exact").detach()
    generator = torch.Generator().manual_seed(100 + d)

    with torch.no_grad():
        per_probe = single_probe_estimates(jm.jacobian_asymmetry, net, x, 1000, method=method,
                                           probe=probe, generator=generator)

    assert_mean_within_three_standard_errors(per_probe, exact)
    if method == "nonnegative":
        assert torch.all(per_probe >= 0)


@pytest.mark.parametrize("method", ["hutchinson", "nonnegative"])
def test_hutchinson_averages_probes(method):
    # K probes in one call give the mean of the K one-probe estimates with the same probes.
    net = make_net(3)
    x = random_batch((4, 3))
    many = jm.jacobian_asymmetry(net, x, method=method, num_probes=5,
                                 generator=torch.Generator().manual_seed(7))
    assert many.shape == (4,)

    probes = jm.sample_probes(x, 5, generator=torch.Generator().manual_seed(7))
    jac = reference_jacobian(net, x)
    jv = torch.einsum("bij,kbj->kbi", jac, probes)
    jtv = torch.einsum("bji,kbj->kbi", jac, probes)
    if method == "hutchinson":
        expected = jtv.pow(2).sum(-1) - torch.einsum("kbi,bij,kbj->kb", jtv, jac, probes)
    else:
        expected = 0.5 * (jv - jtv).pow(2).sum(-1)
    torch.testing.assert_close(many, expected.mean(dim=0))


@pytest.mark.parametrize("method", jm.METHODS)
def test_symmetric_linear_map_zero_asymmetry(method):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=generator, dtype=DTYPE)
    symmetric = a + a.T
    x = random_batch((4, 5))

    asym = jm.jacobian_asymmetry(lambda x: x @ symmetric.T, x, method=method, num_probes=4,
                                 generator=generator)

    assert asym.abs().max().item() < 1e-10


@pytest.mark.parametrize("method", jm.METHODS)
def test_energy_model_zero_asymmetry(method):
    # A lambda hides the model's is_energy flag, so jvp="auto" has to fall back by itself.
    _, fn = energy_model(4)
    x = random_batch((4, 4))

    asym = jm.jacobian_asymmetry(fn, x, method=method, num_probes=4,
                                 generator=torch.Generator().manual_seed(1))
    nasym = jm.nasym(fn, x, method=method, num_probes=4,
                     generator=torch.Generator().manual_seed(1))

    assert asym.abs().max().item() < 1e-10
    assert nasym.abs().max().item() < 1e-10
    # The energy model's Jacobian is not zero, so a zero asymmetry is not trivial.
    assert jm.jacobian(fn, x).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", jm.METHODS)
def test_rotation_asymmetry_four(method):
    x = random_batch((3, 2))
    fn = lambda x: x @ ROTATION.T  # noqa: E731

    asym = jm.jacobian_asymmetry(fn, x, method=method, num_probes=3,
                                 generator=torch.Generator().manual_seed(2))
    nasym_value = jm.nasym(fn, x, method=method, num_probes=3,
                           generator=torch.Generator().manual_seed(2))

    torch.testing.assert_close(asym, torch.full((3,), 4.0, dtype=DTYPE))
    torch.testing.assert_close(nasym_value, torch.ones(3, dtype=DTYPE))


def test_rotation_gaussian_probes_exact():
    # With Gaussian probes the rotation's nonnegative estimate varies per probe, but NAsym stays 1
    # because both traces come from the same probes.
    x = random_batch((3, 2))
    fn = lambda x: x @ ROTATION.T  # noqa: E731
    nasym_value = jm.nasym(fn, x, method="nonnegative", probe="gaussian",
                           generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(nasym_value, torch.ones(3, dtype=DTYPE))


@pytest.mark.parametrize("method", ["exact", "nonnegative"])
@pytest.mark.parametrize("d", DIMS)
def test_nasym_in_unit_interval(method, d):
    net = make_net(d, seed=30 + d)
    x = 3 * random_batch((16, d), seed=d)
    for probe in jm.PROBES:
        value = jm.nasym(net, x, method=method, probe=probe,
                         generator=torch.Generator().manual_seed(d))
        assert torch.all(value >= 0)
        assert torch.all(value <= 1)
        assert torch.all(value > 0)


def test_nasym_zero_jacobian():
    x = random_batch((3, 4))
    for method in jm.METHODS:
        value = jm.nasym(lambda x: 0 * x, x, method=method)
        torch.testing.assert_close(value, torch.zeros(3, dtype=DTYPE))


@pytest.mark.parametrize("method", jm.METHODS)
def test_asymmetry_image_batch(method):
    net = ConvNet(seed=1)
    x = random_batch((3, 2, 2, 3))
    asym_ref, tr_jjt, _ = reference_traces(reference_jacobian(net, x))

    if method == "exact":
        torch.testing.assert_close(jm.jacobian_asymmetry(net, x), asym_ref)
        torch.testing.assert_close(jm.nasym(net, x), asym_ref / (2 * tr_jjt))
        return

    with torch.no_grad():
        per_probe = single_probe_estimates(jm.jacobian_asymmetry, net, x, 1000, method=method,
                                           generator=torch.Generator().manual_seed(4))
    assert_mean_within_three_standard_errors(per_probe, asym_ref)


@pytest.mark.parametrize("method", jm.METHODS)
def test_asymmetry_graph_follows_grad_mode(method):
    net = make_net(3)
    x = random_batch((4, 3))

    def asymmetry():
        # The same probes on every call.
        return jm.jacobian_asymmetry(net, x, method=method, num_probes=2,
                                     generator=torch.Generator().manual_seed(0))

    asym = asymmetry()
    grads = torch.autograd.grad(asym.sum(), jacobian_parameters(net))
    assert all(grad.abs().sum() > 0 for grad in grads)

    with torch.no_grad():
        detached = asymmetry()
    assert not detached.requires_grad
    torch.testing.assert_close(detached, asym.detach())


def test_exact_asymmetry_parameter_gradient():
    # The parameter gradient of the exact penalty equals that of the autograd.functional form.
    net = make_net(3)
    x = random_batch((4, 3))
    params = jacobian_parameters(net)

    grads = torch.autograd.grad(jm.jacobian_asymmetry(net, x).sum(), params)

    rows = [torch.autograd.functional.jacobian(lambda xi: net(xi[None])[0], sample,
                                               create_graph=True) for sample in x]
    asym_ref, _, _ = reference_traces(torch.stack(rows))
    expected = torch.autograd.grad(asym_ref.sum(), params)
    for grad, reference in zip(grads, expected):
        torch.testing.assert_close(grad, reference)


# --- divergence --------------------------------------------------------------------------------


@pytest.mark.parametrize("d", DIMS)
def test_divergence_exact_is_trace(d):
    net = make_net(d, seed=40 + d)
    x = random_batch((4, d), seed=d)
    _, _, trace = reference_traces(reference_jacobian(net, x))

    out, divergence = jm.divergence(net, x, method="exact")

    torch.testing.assert_close(out, net(x))
    torch.testing.assert_close(divergence, trace)


@pytest.mark.parametrize("probe", jm.PROBES)
@pytest.mark.parametrize("d", DIMS)
def test_divergence_hutchinson_unbiased(d, probe):
    net = make_net(d, seed=50 + d)
    x = random_batch((3, d), seed=d)
    _, _, trace = reference_traces(reference_jacobian(net, x))

    def estimator(fn, x, **kwargs):
        return jm.divergence(fn, x, method="hutchinson", **kwargs)[1]

    with torch.no_grad():
        per_probe = single_probe_estimates(estimator, net, x, 1000, probe=probe,
                                           generator=torch.Generator().manual_seed(d))
    assert_mean_within_three_standard_errors(per_probe, trace)


def test_divergence_fixed_probes():
    net = make_net(3)
    x = random_batch((4, 3))
    probes = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    jac = reference_jacobian(net, x)
    expected = torch.einsum("kbi,bij,kbj->kb", probes, jac, probes).mean(dim=0)

    _, first = jm.divergence(net, x, method="hutchinson", probes=probes)
    _, second = jm.divergence(net, x, method="hutchinson", probes=probes)

    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_divergence_image_batch():
    net = ConvNet(seed=2)
    x = random_batch((3, 2, 2, 3))
    jac = reference_jacobian(net, x)
    _, _, trace = reference_traces(jac)
    probes = torch.randn(4, *x.shape, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    flat_probes = probes.reshape(4, 3, -1)
    expected = torch.einsum("kbi,bij,kbj->kb", flat_probes, jac, flat_probes).mean(dim=0)

    out, exact = jm.divergence(net, x, method="exact")
    _, estimate = jm.divergence(net, x, method="hutchinson", probes=probes)

    assert out.shape == x.shape
    torch.testing.assert_close(exact, trace)
    torch.testing.assert_close(estimate, expected)


def test_divergence_graph_follows_grad_mode():
    net = make_net(3)
    x = random_batch((4, 3))
    for method in ("exact", "hutchinson"):
        out, divergence = jm.divergence(net, x, method=method)
        assert divergence.requires_grad
        with torch.no_grad():
            out, divergence = jm.divergence(net, x, method=method)
        assert not out.requires_grad
        assert not divergence.requires_grad


def test_divergence_rejects_nonnegative():
    with pytest.raises(UsageError, match="method 'nonnegative'"):
        jm.divergence(make_net(2), random_batch((2, 2)), method="nonnegative")


@pytest.mark.parametrize("create_graph", [False, True])
def test_batched_vjp_vectorized_matches_loop(create_graph):
    # The vmapped path and the default loop give the same products, and both keep the graph.
    net = make_net(4)
    x = random_batch((5, 4)).requires_grad_(True)
    s = net(x)
    generator = torch.Generator().manual_seed(2)
    cotangents = jm.sample_probes(x, 3, probe="gaussian", generator=generator)
    looped = jm.batched_vjp(s, x, cotangents, create_graph)
    vectorized = jm.batched_vjp(s, x, cotangents, create_graph, vectorize=True)
    reference = torch.einsum("kbi,bij->kbj", cotangents, reference_jacobian(net, x.detach()))

    torch.testing.assert_close(looped, reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(vectorized, reference, rtol=0, atol=1e-10)
    assert looped.requires_grad == vectorized.requires_grad == create_graph


# --- the two-stage backward --------------------------------------------------------------------


@pytest.mark.parametrize("num_probes", [1, 4])
def test_two_stage_backward_matches_double_backward(num_probes):
    sde = VPSDE()
    model = UnconstrainedScore(ConditionedMLP(3), sde, output="noise")
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(num_probes)
    x = random_batch((5, 3), seed=1)
    t = torch.rand(5, generator=generator, dtype=DTYPE) * 0.9 + 0.1
    probes = jm.sample_probes(x, num_probes, generator=generator)
    weight = torch.rand(5, generator=generator, dtype=DTYPE)

    # Plain double backward on the same estimate.
    x_leaf = x.clone().requires_grad_(True)
    s = model(x_leaf, t)
    u = jm.batched_vjp(s, x_leaf, probes, create_graph=True)
    w = jm.batched_vjp(s, x_leaf, u, create_graph=True)
    estimate = (u.pow(2).sum(-1) - (w * probes).sum(-1)).mean(dim=0)
    total = 0.5 * s.pow(2).sum() + (weight * estimate).sum()
    expected = torch.autograd.grad(total, params)

    # The two-stage helper on a fresh forward pass.
    model.zero_grad()
    x_leaf = x.clone().requires_grad_(True)
    s = model(x_leaf, t)
    returned = jm.hutchinson_two_stage_backward(s, x_leaf, probes, weight, 0.5 * s.pow(2).sum())

    torch.testing.assert_close(returned, estimate.detach(), rtol=0, atol=1e-10)
    assert not returned.requires_grad
    for param, reference in zip(params, expected):
        assert reference.abs().sum() > 0
        torch.testing.assert_close(param.grad, reference, rtol=0, atol=1e-10)


def test_two_stage_backward_differs_without_second_stage():
    # The second pass carries a nonzero share of the gradient, so the test above can fail.
    net = make_net(3)
    x = random_batch((4, 3)).requires_grad_(True)
    probes = jm.sample_probes(x, 2, generator=torch.Generator().manual_seed(0))
    s = net(x)
    u = jm.batched_vjp(s, x, probes, create_graph=True)
    u_bar = u.detach().requires_grad_(True)
    w = jm.batched_vjp(s, x, u_bar, create_graph=True)
    (w * probes).sum().backward()
    assert u_bar.grad.abs().sum() > 1e-3


# --- JVP modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 5])
def test_jvp_modes_agree(d):
    sde = VPSDE()
    model = UnconstrainedScore(ConditionedMLP(d), sde, output="residual")
    fn = at_time(model, 0.4)
    x = random_batch((4, d)).requires_grad_(True)
    tangents = torch.randn(3, 4, d, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    expected = torch.einsum("bij,kbj->kbi", reference_jacobian(fn, x.detach()), tangents)

    results = {mode: jm.jvp_products(fn, x, tangents, jvp=mode) for mode in jm.JVP_MODES}

    for mode, result in results.items():
        torch.testing.assert_close(result, expected, msg=f"jvp mode {mode}")

    # Both modes keep the graph to the parameters, with the same gradient.
    params = jacobian_parameters(model)
    forward_grads = torch.autograd.grad(results["forward"].pow(2).sum(), params)
    backward_grads = torch.autograd.grad(results["double-backward"].pow(2).sum(), params)
    for forward_grad, backward_grad in zip(forward_grads, backward_grads):
        torch.testing.assert_close(forward_grad, backward_grad)


def test_nonnegative_jvp_modes_same_parameter_gradient():
    sde = VPSDE()
    model = UnconstrainedScore(ConditionedMLP(3), sde, output="noise")
    x = random_batch((4, 3))
    params = jacobian_parameters(model)

    grads = {}
    for mode in ("forward", "double-backward"):
        asym = jm.jacobian_asymmetry(at_time(model, 0.4), x, method="nonnegative",
                                     num_probes=3, jvp=mode,
                                     generator=torch.Generator().manual_seed(0))
        grads[mode] = torch.autograd.grad(asym.sum(), params)
    for forward_grad, backward_grad in zip(grads["forward"], grads["double-backward"]):
        torch.testing.assert_close(forward_grad, backward_grad)


def test_auto_jvp_energy_score_in_lambda():
    _, fn = energy_model(3)
    x = random_batch((4, 3))
    tangents = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    expected = torch.einsum("bij,kbj->kbi", reference_jacobian(fn, x), tangents)

    for inputs in (x, x.clone().requires_grad_(True)):
        torch.testing.assert_close(jm.jvp_products(fn, inputs, tangents, jvp="auto"), expected)
        torch.testing.assert_close(
            jm.jvp_products(fn, inputs, tangents, jvp="double-backward"), expected)


def test_forward_jvp_energy_score_error():
    _, fn = energy_model(3)
    x = random_batch((4, 3))
    tangents = torch.ones(1, 4, 3, dtype=DTYPE)
    with pytest.raises(RuntimeError, match="'double-backward' or 'auto'"):
        jm.jvp_products(fn, x, tangents, jvp="forward")


# --- probes and input checks -------------------------------------------------------------------


def test_sample_probes_distribution():
    x = torch.zeros(50, 4, dtype=DTYPE)
    rademacher = jm.sample_probes(x, 200, "rademacher", torch.Generator().manual_seed(0))
    gaussian = jm.sample_probes(x, 200, "gaussian", torch.Generator().manual_seed(0))

    assert rademacher.shape == (200, 50, 4)
    assert rademacher.dtype == DTYPE
    assert set(rademacher.unique().tolist()) == {-1.0, 1.0}
    assert gaussian.dtype == DTYPE
    # E[v v^T] = I: 40000 probes of dimension 4, within about five standard errors.
    second_moment = torch.einsum("kbi,kbj->ij", gaussian, gaussian) / (200 * 50)
    torch.testing.assert_close(second_moment, torch.eye(4, dtype=DTYPE), rtol=0, atol=0.04)
    again = jm.sample_probes(x, 200, "gaussian", torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, gaussian, rtol=0, atol=0)


@pytest.mark.parametrize("call, message", [
    (lambda x: jm.sample_probes(x, 0), "num_probes 0"),
    (lambda x: jm.sample_probes(x, 1, probe="uniform"), "probe 'uniform'"),
    (lambda x: jm.jacobian_asymmetry(lambda y: y, x, method="frobenius"), "method 'frobenius'"),
    (lambda x: jm.jacobian_asymmetry(lambda y: y, x, method="nonnegative", jvp="reverse"),
     "jvp 'reverse'"),
    (lambda x: jm.nasym(lambda y: y, x, method="hutchinson", num_probes=-2), "num_probes -2"),
])
def test_invalid_arguments_raise(call, message):
    with pytest.raises(UsageError, match=message):
        call(random_batch((2, 3)))


def test_nonnegative_reuses_one_forward_pass():
    from qcsbm.jacobian import jacobian_asymmetry

    # A second forward pass would draw a new dropout mask in train mode, so J v and J^T v
    # would come from different networks.
    calls = []
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                              torch.nn.Linear(8, 3)).double().train()

    def fn(x):
        calls.append(1)
        return net(x)

    x = torch.randn(5, 3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    estimate = jacobian_asymmetry(fn, x, method="nonnegative", num_probes=4,
                                  generator=generator)
    assert len(calls) == 1
    assert bool((estimate >= 0).all())
