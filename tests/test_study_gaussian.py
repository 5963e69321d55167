"""The Gaussian sampling study: the two score errors, Langevin dynamics and the CLI."""

import json
import math
import subprocess
import sys

import pytest
import torch

from qcsbm.cli import main
from qcsbm.cli import study as study_cli
from qcsbm.jacobian import jacobian, jacobian_asymmetry
from qcsbm.studies import gaussian
from qcsbm.studies.gaussian import GaussianStudyConfig

CONFIG = GaussianStudyConfig()


def grid_points(half_width=3.0, n=13):
    line = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(line, line, indexing="xy")
    return torch.stack((gx.flatten(), gy.flatten()), dim=-1)


# --- the perturbation fields ---------------------------------------------------------------


def test_rotational_error_is_perpendicular_to_x():
    x = grid_points()
    u = gaussian.perturbation(x, CONFIG, 1.5e-3, "rotational")
    radial_component = (u * x).sum(dim=-1)
    assert u.norm(dim=-1).max() > 1.0
    torch.testing.assert_close(radial_component, torch.zeros_like(radial_component))


def test_radial_error_is_parallel_to_x():
    x = grid_points()
    u = gaussian.perturbation(x, CONFIG, 1.5e-3, "radial")
    cross = u[:, 0] * x[:, 1] - u[:, 1] * x[:, 0]
    torch.testing.assert_close(cross, torch.zeros_like(cross))


def test_both_errors_have_equal_size():
    x = grid_points()
    rotational = gaussian.perturbation(x, CONFIG, 1e-3, "rotational").norm(dim=-1)
    radial = gaussian.perturbation(x, CONFIG, 1e-3, "radial").norm(dim=-1)
    torch.testing.assert_close(rotational, radial)


def test_rotational_error_has_asymmetric_jacobian():
    # Avoid the origin, where x = 0 makes the error vanish to first order.
    x = grid_points(half_width=2.5, n=6)

    def error(y):
        return gaussian.perturbation(y, CONFIG, 1.5e-3, "rotational")

    with torch.no_grad():
        asym = jacobian_asymmetry(error, x, method="exact")
        scale = jacobian(error, x).pow(2).sum(dim=(1, 2))
    assert bool((asym > 1e-3 * scale).all())
    assert float(asym.min()) > 0


def test_radial_error_has_symmetric_jacobian():
    x = grid_points(half_width=2.5, n=6)

    def error(y):
        return gaussian.perturbation(y, CONFIG, 1.5e-3, "radial")

    with torch.no_grad():
        asym = jacobian_asymmetry(error, x, method="exact")
        scale = jacobian(error, x).pow(2).sum(dim=(1, 2))
    assert float(scale.max()) > 1.0
    assert bool((asym <= 1e-12 * scale).all())


def test_zero_eps_gives_the_exact_score():
    x = grid_points()
    for case in gaussian.CASES:
        score = gaussian.perturbed_score(x, CONFIG, 0.0, case)
        torch.testing.assert_close(score, -x / CONFIG.sigma**2)
        asym = jacobian_asymmetry(lambda y: gaussian.perturbed_score(y, CONFIG, 0.0, case), x)
        assert bool(torch.isfinite(asym).all())
        assert float(asym.abs().max()) == 0.0


def test_ring_density_matches_rotated_gaussians():
    # Closed form against the average of N(m, w^2 I) over 720 rotations of m, |m| = R.
    r = torch.tensor([0.0, 1.0, 2.5, 3.0, 4.2], dtype=torch.float64)
    angles = torch.linspace(0, 2 * math.pi, 721, dtype=torch.float64)[:-1]
    radius, width = 3.0, 1.0
    centres = radius * torch.stack((angles.cos(), angles.sin()), dim=-1)
    points = torch.stack((r, torch.zeros_like(r)), dim=-1)
    sq_dist = (points[:, None, :] - centres[None, :, :]).pow(2).sum(dim=-1)
    average = (torch.exp(-sq_dist / (2 * width**2)) / (2 * math.pi * width**2)).mean(dim=1)
    torch.testing.assert_close(gaussian.ring_density(r, radius, width), average)


def test_ring_density_integrates_to_one():
    r = torch.linspace(0, 12, 24001, dtype=torch.float64)
    integrand = 2 * math.pi * r * gaussian.ring_density(r)
    assert abs(float(torch.trapezoid(integrand, r)) - 1.0) < 1e-6


def test_score_error_under_p_is_bounded():
    for eps in (0.5e-3, 2.25e-3):
        for case in gaussian.CASES:
            stats = gaussian.error_statistics(CONFIG, eps, case)
            assert 0 < stats["score_error"] <= 2 * eps


# --- Langevin dynamics and convergence -----------------------------------------------------


def test_deterministic_langevin_matches_closed_form():
    # With the exact score, each step multiplies x by (1 - h_k / sigma^2).
    config = GaussianStudyConfig(num_steps=5, step_size=0.004)
    x0 = torch.tensor([[1.0, -2.0], [0.5, 0.25]], dtype=torch.float64)
    steps = gaussian.step_sizes(config)
    trajectory = gaussian.langevin(lambda y: -y / config.sigma**2, x0, steps, stochastic=False)
    factor = torch.prod(1 - steps / config.sigma**2)
    assert trajectory.shape == (6, 2, 2)
    torch.testing.assert_close(trajectory[-1], factor * x0)


def test_step_sizes_decay_exponentially():
    config = GaussianStudyConfig(num_steps=3, step_size=0.01, step_decay=2.0)
    expected = torch.tensor([0.01, 0.01 * math.exp(-0.5), 0.01 * math.exp(-1.0)],
                            dtype=torch.float64)
    torch.testing.assert_close(gaussian.step_sizes(config), expected)


def test_stochastic_langevin_is_reproducible():
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    steps = torch.full((10,), 1e-3, dtype=torch.float64)

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return gaussian.langevin(lambda y: -y, x0, steps, stochastic=True, generator=generator)

    torch.testing.assert_close(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


def test_steps_to_converge_finds_first_crossing():
    sigma = 0.1
    # Mean -log p per step is large, large, below, then above again. The first crossing counts.
    radii = [2.0, 1.0, 0.05, 0.5]
    trajectory = torch.tensor([[[r, 0.0], [0.0, r]] for r in radii], dtype=torch.float64)
    threshold = gaussian.nll_threshold(sigma, 0.5)
    assert gaussian.steps_to_converge(trajectory, sigma, threshold) == 2
    assert gaussian.steps_to_converge(trajectory[:2], sigma, threshold) is None


def test_threshold_from_entropy_and_margin():
    sigma = 0.1
    mode_nll = -float(gaussian.log_density(torch.zeros(1, 2), sigma))
    assert mode_nll == pytest.approx(gaussian.gaussian_entropy(sigma) - 1.0)
    assert gaussian.nll_threshold(sigma, 0.5) == pytest.approx(mode_nll + 1.5)


# --- the command -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gaussian") / "run"
    command = [sys.executable, "-m", "qcsbm", "study", "gaussian", "--preset", "quick",
               "--quiet", "--out", str(out), "--eps", "0,1.5e-3,2.25e-3",
               "--plot-eps", "1.5e-3", "--steps", "40"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return out, result


def test_cli_writes_files(quick_run):
    out, result = quick_run
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "metrics.json", "trajectories.png", "steps_to_converge.png"):
        assert (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == "gaussian"
    assert config["config"]["num_steps"] == 40
    assert config["config"]["eps_values"] == [0.0, 1.5e-3, 2.25e-3]


def test_cli_saves_trajectories(quick_run):
    out, result = quick_run
    trajectories = torch.load(out / "trajectories.pt", weights_only=True)
    assert len(trajectories) == 2 * 2 * 3
    start = trajectories["deterministic/rotational/0.0"][0]
    for key, trajectory in trajectories.items():
        assert trajectory.shape == (41, 10, 2), key
        torch.testing.assert_close(trajectory[0], start)
    torch.testing.assert_close(trajectories["stochastic/rotational/0.0"],
                               trajectories["stochastic/radial/0.0"])


def test_cli_eps_zero_identical(quick_run):
    out, result = quick_run
    metrics = json.loads((out / "metrics.json").read_text())
    steps = metrics["steps_to_converge"]
    stochastic = metrics["steps_to_converge_stochastic"]
    assert steps["rotational"]["0.0"] is not None
    assert steps["rotational"]["0.0"] == steps["radial"]["0.0"]
    assert stochastic["rotational"]["0.0"] == stochastic["radial"]["0.0"]
    assert metrics["comparison"]["identical_at_eps_0"] is True


def test_cli_reports_threshold_and_cases(quick_run):
    out, result = quick_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nll_threshold"] == pytest.approx(gaussian.nll_threshold(0.1, 0.5))
    assert set(metrics["steps_to_converge"]) == {"rotational", "radial"}
    assert set(metrics["steps_to_converge"]["radial"]) == {"0.0", "0.0015", "0.00225"}
    rotational_asym = metrics["error_under_p"]["rotational"]["0.0015"]["asymmetry"]
    radial_asym = metrics["error_under_p"]["radial"]["0.0015"]["asymmetry"]
    assert rotational_asym > 1e6 * abs(radial_asym)


def test_cli_refuses_existing_output(quick_run, capsys):
    out, result = quick_run
    before = (out / "metrics.json").read_bytes()
    code = main(["study", "gaussian", "--preset", "quick", "--quiet", "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.count("\n") == 1
    assert "--overwrite" in stderr
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("options, named", [
    (["--sigma", "-1"], "--sigma"),
    (["--plot-eps", "0.5"], "--plot-eps"),
    (["--steps", "0"], "--steps"),
    (["--eps", "0,1e-3,1e-3"], "--eps"),
    (["--eps=-1e-3,0", "--plot-eps", "0"], "--eps"),
])
def test_cli_rejects_bad_input(tmp_path, capsys, options, named):
    out = tmp_path / "run"
    code = main(["study", "gaussian", "--preset", "quick", "--quiet", "--out", str(out),
                 *options])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.count("\n") == 1
    assert named in stderr
    assert not out.exists()


def test_cli_missing_study_is_one_line(monkeypatch, capsys):
    # A listed study whose module is not installed still parses, then fails in one line.
    studies = dict(study_cli.STUDIES)
    studies["absent"] = ("qcsbm.studies.absent_for_test", "a study that is not installed")
    monkeypatch.setattr(study_cli, "STUDIES", studies)
    code = main(["study", "absent"])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.count("\n") == 1
    assert "qcsbm.studies.absent_for_test" in stderr
    assert "gaussian" in stderr
