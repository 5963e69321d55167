"""Tests of the 2-D toy data sets and their exact perturbed scores."""

import math

import pytest
import torch

from qcsbm.data.toy2d import (TOY_DATASETS, Checkerboard, EightGaussians, TwoSpirals,
                              gaussian_smoothed_empirical, get_toy_dataset)
from qcsbm.errors import UsageError

SIGMAS = (0.05, 0.3, 1.0, 3.0)

# A small oracle sample keeps the spirals tests fast; the formulas do not depend on its size.
SMALL_SPIRALS = dict(num_oracle_points=1500, oracle_seed=3)


def make_dataset(name):
    options = SMALL_SPIRALS if name == "2spirals" else {}
    return get_toy_dataset(name, **options)


def query_points(dataset):
    """Points on and between the data, on the boundary of the support, and far away."""
    near = dataset.sample(40, torch.Generator().manual_seed(0), dtype=torch.float64)
    between = torch.tensor([[0.0, 0.0], [1.5, -4.5], [-3.0, 2.9], [4.2, 4.2], [6.0, 1.0]],
                           dtype=torch.float64)
    far = torch.tensor([[25.0, -3.0], [-60.0, 80.0], [0.5, 200.0]], dtype=torch.float64)
    return torch.cat([near, between, far])


def central_difference(log_prob, x, sigma, step):
    columns = []
    for axis in range(2):
        shift = torch.zeros_like(x)
        shift[:, axis] = step
        columns.append((log_prob(x + shift, sigma) - log_prob(x - shift, sigma)) / (2 * step))
    return torch.stack(columns, dim=1)


# --- oracle scores -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TOY_DATASETS))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_score_matches_finite_differences(name, sigma):
    dataset = make_dataset(name)
    x = query_points(dataset)

    score = dataset.score(x, sigma)
    # The step balances truncation error near the data against rounding error far away,
    # where log p_sigma reaches -1e6.
    numeric = central_difference(dataset.log_prob, x, sigma, step=1e-4 * sigma)

    assert score.dtype == torch.float64
    assert score.shape == x.shape
    torch.testing.assert_close(score, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(TOY_DATASETS))
def test_oracle_finite_at_small_sigma_far_away(name):
    dataset = make_dataset(name)
    x = torch.tensor([[300.0, -300.0], [0.0, 1e3], [2.0, 2.0]], dtype=torch.float64)

    for sigma in (0.01, 0.05):
        log_prob = dataset.log_prob(x, sigma)
        score = dataset.score(x, sigma)
        assert torch.isfinite(log_prob).all()
        assert torch.isfinite(score).all()

        # Far away the score points back towards the data, which lie near the origin.
        assert (score[:2] * x[:2]).sum(dim=1).lt(0).all()
        assert (log_prob[:2] < log_prob[2] - 1e3).all()


@pytest.mark.parametrize("name", list(TOY_DATASETS))
def test_float32_input_matches_float64(name):
    dataset = make_dataset(name)
    x = torch.tensor([[100.0, 100.0], [30.0, -40.0], [6.5, 0.25], [-1.0, 2.0]])

    score32 = dataset.score(x, 0.01)
    score64 = dataset.score(x.double(), 0.01)
    assert score32.dtype == torch.float32
    torch.testing.assert_close(score32.double(), score64, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(dataset.log_prob(x, 0.01).double(),
                               dataset.log_prob(x.double(), 0.01), rtol=1e-6, atol=1e-3)


def test_checkerboard_far_score_matches_mills_ratio():
    # At x = (d + 6, 4.5) the nearest dark square is [3, 6]^2. Its y-axis factor is flat in
    # the middle of [3, 6], and its x-axis factor is Phi(-d / sigma) up to a vanishing term,
    # so by the Mills ratio the score is about -(d / sigma^2) (1 + sigma^2 / d^2).
    # Log-space differences of numbers near -4e7 limit the accuracy to about 1e-8.
    dataset = Checkerboard()
    distance, sigma = 94.0, 0.01
    x = torch.tensor([[6.0 + distance, 4.5]], dtype=torch.float64)

    score = dataset.score(x, sigma)

    expected = -(distance / sigma**2) * (1 + sigma**2 / distance**2)
    assert score[0, 0].item() == pytest.approx(expected, rel=1e-7)
    assert abs(score[0, 1].item()) < 1e-6


def test_eight_gaussians_far_score_is_nearest_component():
    dataset = EightGaussians()
    x = torch.tensor([[1000.0, 0.0], [0.0, -500.0]], dtype=torch.float64)
    sigma = 0.5

    score = dataset.score(x, sigma)

    radius = 8 / math.sqrt(2)
    nearest = torch.tensor([[radius, 0.0], [0.0, -radius]], dtype=torch.float64)
    torch.testing.assert_close(score, (nearest - x) / (0.5 + sigma**2), rtol=1e-12, atol=1e-9)


def test_eight_gaussians_log_prob_closed_form():
    dataset = EightGaussians()
    x = torch.tensor([[0.3, -1.2], [5.0, 5.0]], dtype=torch.float64)
    sigma = 0.7
    variance = 0.5 + sigma**2

    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 8 / math.sqrt(2) * torch.stack([angles.cos(), angles.sin()], dim=1)
    sq_dist = ((x[:, None, :] - centres) ** 2).sum(dim=2)
    density = (torch.exp(-sq_dist / (2 * variance)) / (2 * math.pi * variance)).mean(dim=1)

    torch.testing.assert_close(dataset.log_prob(x, sigma), density.log(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(TOY_DATASETS))
def test_sigma_tensor_matches_floats(name):
    dataset = make_dataset(name)
    x = query_points(dataset)[:6]
    sigma = torch.tensor([0.05, 0.3, 1.0, 3.0, 0.01, 0.7], dtype=torch.float64)

    batched_score = dataset.score(x, sigma)
    batched_log_prob = dataset.log_prob(x, sigma)
    for row in range(len(x)):
        one = x[row:row + 1]
        torch.testing.assert_close(batched_score[row:row + 1],
                                   dataset.score(one, sigma[row].item()))
        torch.testing.assert_close(batched_log_prob[row:row + 1],
                                   dataset.log_prob(one, sigma[row].item()))


@pytest.mark.parametrize("name", list(TOY_DATASETS))
def test_log_prob_integrates_to_one(name):
    options = dict(num_oracle_points=200, oracle_seed=1) if name == "2spirals" else {}
    dataset = get_toy_dataset(name, **options)

    # A Riemann sum on a grid 5 times finer than sigma is exact to far below the
    # tolerance for these smooth densities. The grid misses less than 1e-6 of the mass.
    step = 0.1
    axis = torch.arange(-14.0, 14.0, step, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)

    mass = dataset.log_prob(grid, 0.5).exp().sum() * step**2

    assert mass.item() == pytest.approx(1.0, abs=2e-3)


# --- samples -------------------------------------------------------------------------------


def test_checkerboard_samples_in_dark_squares():
    x = Checkerboard().sample(20_000, torch.Generator().manual_seed(1), dtype=torch.float64)

    cells = torch.floor(x / 3).long()
    assert x.abs().max() <= 6.0
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()

    # All 8 dark squares get about 1/8 of the samples.
    _, counts = torch.unique(cells, dim=0, return_counts=True)
    assert len(counts) == 8
    assert (counts.double() / len(x) - 1 / 8).abs().max() < 0.01


def test_eight_gaussians_sample_statistics():
    dataset = EightGaussians()
    x = dataset.sample(40_000, torch.Generator().manual_seed(2), dtype=torch.float64)

    nearest = torch.cdist(x, dataset.centres).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=8).double()
    assert (counts / len(x) - 1 / 8).abs().max() < 0.01

    for k in range(8):
        members = x[nearest == k]
        torch.testing.assert_close(members.mean(dim=0), dataset.centres[k], rtol=0, atol=0.05)
        torch.testing.assert_close(members.std(dim=0), torch.full((2,), 0.5**0.5,
                                   dtype=torch.float64), rtol=0, atol=0.03)


def test_two_spirals_samples_near_arms():
    dataset = TwoSpirals()
    x = dataset.sample(2000, torch.Generator().manual_seed(3), dtype=torch.float64)
    unscaled = x / (2.3 / 3)

    # The jitter is U(0, 0.5) per coordinate, so it moves a point by at most 0.5 sqrt(2) from
    # its arm's centre curve. The curve's grid spacing in arc length is below 3 pi * 3 pi / 8000
    # < 0.012, which adds at most 0.006 to the measured distance.
    theta = torch.linspace(0, 3 * math.pi, 8000, dtype=torch.float64)
    curve = torch.stack([-theta.cos() * theta, theta.sin() * theta], dim=1)
    to_first = torch.cdist(unscaled, curve).min(dim=1).values
    to_second = torch.cdist(unscaled, -curve).min(dim=1).values
    assert torch.minimum(to_first, to_second).max() <= 0.5 * math.sqrt(2) + 0.006

    on_first = (to_first < to_second).double().mean()
    assert on_first.item() == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("name", list(TOY_DATASETS))
def test_sample_seeded_and_typed(name):
    dataset = make_dataset(name)

    first = dataset.sample(257, torch.Generator().manual_seed(9))
    again = dataset.sample(257, torch.Generator().manual_seed(9))
    other = dataset.sample(257, torch.Generator().manual_seed(10))
    double = dataset.sample(5, torch.Generator().manual_seed(9), dtype=torch.float64)

    assert first.shape == (257, 2)
    assert first.dtype == torch.float32
    assert double.dtype == torch.float64
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert dataset.sample(0).shape == (0, 2)


def test_spirals_oracle_sample_fixed_by_seed():
    first = TwoSpirals(num_oracle_points=100, oracle_seed=5).oracle_points
    again = TwoSpirals(num_oracle_points=100, oracle_seed=5).oracle_points
    other = TwoSpirals(num_oracle_points=100, oracle_seed=6).oracle_points

    assert first.shape == (100, 2)
    assert first.dtype == torch.float64
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert TwoSpirals().num_oracle_points == 50_000


# --- the empirical oracle ------------------------------------------------------------------


def test_smoothed_empirical_chunked_matches_direct():
    generator = torch.Generator().manual_seed(4)
    points = torch.randn(300, 2, generator=generator, dtype=torch.float64) * 3
    x = torch.randn(50, 2, generator=generator, dtype=torch.float64) * 4
    sigma = torch.rand(50, generator=generator, dtype=torch.float64) * 2 + 0.02

    # The direct form: a full (B, N) matrix of Gaussian log-densities.
    sq_dist = ((x[:, None, :] - points[None]) ** 2).sum(dim=2)
    log_kernel = -sq_dist / (2 * sigma[:, None] ** 2) - torch.log(2 * math.pi * sigma[:, None] ** 2)
    direct_log_prob = torch.logsumexp(log_kernel, dim=1) - math.log(len(points))
    weights = torch.softmax(log_kernel, dim=1)
    direct_score = (weights @ points - x) / sigma[:, None] ** 2

    for pair_budget in (1, 7 * 300, 10**9):
        log_prob, score = gaussian_smoothed_empirical(x, sigma, points, pair_budget=pair_budget)
        torch.testing.assert_close(log_prob, direct_log_prob, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(score, direct_score, rtol=1e-10, atol=1e-8)


def test_spirals_oracle_independent_of_chunk_size():
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 5
    small_chunks = TwoSpirals(**SMALL_SPIRALS, pair_budget=1500 * 5)
    one_chunk = TwoSpirals(**SMALL_SPIRALS, pair_budget=10**9)

    torch.testing.assert_close(small_chunks.score(x, 0.2), one_chunk.score(x, 0.2),
                               rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(small_chunks.log_prob(x, 0.2), one_chunk.log_prob(x, 0.2),
                               rtol=1e-12, atol=1e-12)


# --- registry and input checks -------------------------------------------------------------


def test_registry_names():
    assert set(TOY_DATASETS) == {"checkerboard", "8gaussians", "2spirals"}
    for name in TOY_DATASETS:
        assert make_dataset(name).name == name


def test_unknown_dataset_lists_names():
    with pytest.raises(UsageError, match="'moons'.*'checkerboard', '8gaussians', '2spirals'"):
        get_toy_dataset("moons")


def test_unknown_option_rejected():
    with pytest.raises(UsageError, match="num_oracle_points.*checkerboard"):
        get_toy_dataset("checkerboard", num_oracle_points=10)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_sigma_rejected(sigma):
    x = torch.zeros(3, 2)
    for name in TOY_DATASETS:
        with pytest.raises(UsageError, match="sigma"):
            make_dataset(name).score(x, sigma)


def test_invalid_inputs_rejected():
    dataset = EightGaussians()
    with pytest.raises(UsageError, match=r"shape \(3, 3\)"):
        dataset.log_prob(torch.zeros(3, 3), 0.5)
    with pytest.raises(UsageError, match=r"sigma of shape \(2,\)"):
        dataset.score(torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(UsageError, match="n -1"):
        dataset.sample(-1)
    with pytest.raises(UsageError, match="dtype"):
        dataset.sample(3, dtype=torch.int64)
    with pytest.raises(UsageError, match="num_oracle_points 0"):
        TwoSpirals(num_oracle_points=0)


def test_smoothed_empirical_rejects_bad_shapes():
    points = torch.zeros(10, 2, dtype=torch.float64)
    with pytest.raises(UsageError, match=r"points of shape \(10, 2\)"):
        gaussian_smoothed_empirical(torch.zeros(4, 3), torch.ones(4), points)
    with pytest.raises(UsageError, match=r"sigma of shape \(3,\)"):
        gaussian_smoothed_empirical(torch.zeros(4, 2), torch.ones(3), points)
    with pytest.raises(UsageError, match="pair_budget 0"):
        gaussian_smoothed_empirical(torch.zeros(4, 2), torch.ones(4), points, pair_budget=0)
