"""Langevin sampling of a 2-D Gaussian with a non-conservative or a conservative score error.

The target is p = N(0, sigma^2 I) in two dimensions, with exact score -x / sigma^2. Two
perturbed scores add an error u(x) of the same size |u(x)| = c(|x|) |x|:

    rotational   u(x) = c(|x|) (-x_1, x_0)    perpendicular to x, non-conservative (curl != 0)
    radial       u(x) = c(|x|) (x_0, x_1)     along x; the gradient of a radial potential

with the weight

    c(r)^2 = 2 eps mu(r) / (p(r) (r^2 + eps) + floor).

mu is the density of a ring of radius 3 and width 1 (the rotational average of ten unit
Gaussians placed evenly on that circle). Dividing by p makes the error small where p has
mass and large where it has none: E_p[|u|^2] <= 2 eps. So eps bounds the Fisher divergence
between the perturbed and the exact score, while chains started far from the mode meet a
large error. The floor keeps c finite where p underflows. Because c depends on |x| alone,
the radial error is exactly conservative.

This follows the Gaussian example of Chao et al., "On Investigating the Conservative
Property of Score-Based Generative Models" (ICML 2023), Section 3.1, with one change: the
paper's ten-component mixture is replaced by its rotational average, because an
angle-dependent weight would make the radial error non-conservative too.

Symbols: sigma (target std), eps (error level), h_k (Langevin step size at step k).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path

import torch

from qcsbm.errors import UsageError, check_choice, check_finite, check_positive
from qcsbm.jacobian import jacobian_asymmetry
from qcsbm.studies import common

logger = logging.getLogger(__name__)

CASES = ("rotational", "radial")
VARIANTS = ("deterministic", "stochastic")
# The error levels of the paper's Gaussian example.
PAPER_EPS = (0.0, 0.5e-3, 0.75e-3, 1.0e-3, 1.5e-3, 1.75e-3, 2.25e-3)


@dataclasses.dataclass(frozen=True)
class GaussianStudyConfig:
    """Settings of the Gaussian sampling study; defaults follow the paper's example."""

    sigma: float = 0.1                  # std of the target N(0, sigma^2 I)
    eps_values: tuple = PAPER_EPS       # error levels eps
    plot_eps: float = 1.75e-3           # eps of the trajectory figure; one of eps_values
    num_chains: int = 10
    start_mean: float = -2.0            # chains start at N(start_mean, start_std^2) per coordinate
    start_std: float = 0.5
    num_steps: int = 300
    step_size: float = 0.0125           # h_0; h_k = h_0 exp(-k / step_decay)
    step_decay: float = 1000.0
    threshold_margin: float = 0.5       # nats above the entropy of p; see `nll_threshold`
    ring_radius: float = 3.0            # the mixture-density weight mu
    ring_width: float = 1.0
    floor: float = 1e-8                 # added to p (r^2 + eps) in the weight's denominator
    num_error_samples: int = 4096       # samples of p for E_p|u|^2 and E_p[Asym]
    grid_size: int = 20                 # arrows per side in the trajectory figure
    grid_half_width: float = 3.0
    seed: int = 0

    def validate(self) -> None:
        """Raise UsageError for a value outside its range."""
        check_positive("--sigma", self.sigma)
        for eps in self.eps_values:
            check_positive("--eps value", eps, allow_zero=True)
        if len(set(self.eps_values)) != len(self.eps_values):
            raise UsageError(f"invalid --eps {list(self.eps_values)}; expected distinct values")
        if self.plot_eps not in self.eps_values:
            raise UsageError(f"invalid --plot-eps {self.plot_eps!r}; expected one of the "
                             f"--eps values {list(self.eps_values)}")
        for name, value in (("--chains", self.num_chains), ("--steps", self.num_steps),
                            ("num_error_samples", self.num_error_samples),
                            ("grid_size", self.grid_size)):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"invalid {name} {value!r}; expected an integer >= 1")
        check_finite("--start-mean", self.start_mean)
        check_positive("--start-std", self.start_std, allow_zero=True)
        check_positive("--step-size", self.step_size)
        check_positive("step_decay", self.step_decay)
        check_positive("--threshold-margin", self.threshold_margin, allow_zero=True)
        check_positive("ring_radius", self.ring_radius, allow_zero=True)
        check_positive("ring_width", self.ring_width)
        check_positive("floor", self.floor)


PRESETS = {
    "default": GaussianStudyConfig(),
    "quick": GaussianStudyConfig(num_steps=60, num_error_samples=256, grid_size=8),
}


# --- the target, the weight and the two perturbed scores -----------------------------------


def log_density(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Return log N(x; 0, sigma^2 I) for points x of shape (B, 2), shape (B,)."""
    r2 = x.pow(2).sum(dim=-1)
    return -r2 / (2 * sigma**2) - math.log(2 * math.pi * sigma**2)


def gaussian_entropy(sigma: float) -> float:
    """Return the differential entropy of N(0, sigma^2 I) in 2-D, in nats."""
    return 1.0 + math.log(2 * math.pi * sigma**2)


def nll_threshold(sigma: float, margin: float) -> float:
    """Return the convergence threshold on the chains' mean -log p: entropy plus `margin`.

    An exact sampler's mean -log p equals the entropy. A deterministic chain ends at the
    mode, where -log p = entropy - 1, so it always crosses the threshold once it converges.
    """
    return gaussian_entropy(sigma) + margin


def ring_density(r: torch.Tensor, radius: float = 3.0, width: float = 1.0) -> torch.Tensor:
    """Return the 2-D density at distance r from the origin of a Gaussian ring.

    mu(r) = exp(-(r^2 + R^2) / (2 w^2)) I_0(r R / w^2) / (2 pi w^2): the average over all
    rotations of N(m, w^2 I) with |m| = R. It is written with the scaled Bessel function
    i0e(z) = exp(-z) I_0(z) so that it does not overflow.
    """
    z = r * radius / width**2
    gauss = torch.exp(-(r - radius).pow(2) / (2 * width**2))
    return gauss * torch.special.i0e(z) / (2 * math.pi * width**2)


def perturbation_weight(x: torch.Tensor, config: GaussianStudyConfig,
                        eps: float) -> torch.Tensor:
    """Return c(|x|) = sqrt(2 eps mu / (p (|x|^2 + eps) + floor)) for x of shape (B, 2)."""
    r2 = x.pow(2).sum(dim=-1)
    if eps == 0:
        # Exact zeros, also for autograd: the square root has no derivative at 0.
        return torch.zeros_like(r2)
    mu = ring_density(r2.sqrt(), config.ring_radius, config.ring_width)
    p = log_density(x, config.sigma).exp()
    return torch.sqrt(2 * eps * mu / (p * (r2 + eps) + config.floor))


def perturbation(x: torch.Tensor, config: GaussianStudyConfig, eps: float,
                 case: str) -> torch.Tensor:
    """Return the score error u(x) of `case` ("rotational" or "radial"), shape (B, 2)."""
    check_choice("case", case, CASES)
    c = perturbation_weight(x, config, eps).unsqueeze(-1)
    if case == "rotational":
        direction = torch.stack((-x[:, 1], x[:, 0]), dim=-1)
    else:
        direction = x
    return c * direction


def perturbed_score(x: torch.Tensor, config: GaussianStudyConfig, eps: float,
                    case: str) -> torch.Tensor:
    """Return the exact score -x / sigma^2 plus the error of `case`."""
    return -x / config.sigma**2 + perturbation(x, config, eps, case)


# --- Langevin dynamics ---------------------------------------------------------------------


def step_sizes(config: GaussianStudyConfig) -> torch.Tensor:
    """Return h_k = h_0 exp(-k / step_decay) for k = 0 .. num_steps - 1."""
    k = torch.arange(config.num_steps, dtype=torch.float64)
    return config.step_size * torch.exp(-k / config.step_decay)


def langevin(score_fn, x: torch.Tensor, steps: torch.Tensor, *, stochastic: bool,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Run unadjusted Langevin dynamics and return the trajectory, shape (K + 1, *x.shape).

    x_{k+1} = x_k + h_k score(x_k) + sqrt(2 h_k) z_k with z_k ~ N(0, I); the deterministic
    variant drops the noise term (gradient ascent on log p when the score is exact).
    """
    trajectory = [x]
    for h in steps.tolist():
        x = x + h * score_fn(x)
        if stochastic:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = x + math.sqrt(2 * h) * noise
        trajectory.append(x)
    return torch.stack(trajectory)


def steps_to_converge(trajectory: torch.Tensor, sigma: float,
                      threshold: float) -> int | None:
    """Return the first step k whose chains' mean -log p is below `threshold`, else None."""
    mean_nll = -log_density(trajectory, sigma).mean(dim=-1)
    below = torch.nonzero(mean_nll < threshold)
    return int(below[0, 0]) if len(below) else None


def start_points(config: GaussianStudyConfig) -> torch.Tensor:
    """Draw the chains' start, shared by every case and eps, from the study's seed."""
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn((config.num_chains, 2), generator=generator, dtype=torch.float64)
    return config.start_mean + config.start_std * noise


# --- the error's size and asymmetry under p ------------------------------------------------


def error_statistics(config: GaussianStudyConfig, eps: float, case: str) -> dict:
    """Estimate E_p|u|^2 (bounded by 2 eps) and E_p[Asym] of the perturbed score.

    Monte Carlo over `num_error_samples` draws of p; Asym = tr(J J^T) - tr(J J) is the exact
    asymmetry of the perturbed score's Jacobian (zero for a conservative field).
    """
    # Seeds seed, seed + 1 and seed + 2 give the starts, these samples and the Langevin noise.
    generator = torch.Generator().manual_seed(config.seed + 1)
    x = config.sigma * torch.randn((config.num_error_samples, 2), generator=generator,
                                   dtype=torch.float64)
    error = perturbation(x, config, eps, case).pow(2).sum(dim=-1)
    with torch.no_grad():
        asym = jacobian_asymmetry(lambda y: perturbed_score(y, config, eps, case), x,
                                  method="exact")
    return {"score_error": float(error.mean()), "asymmetry": float(asym.mean())}


# --- the study -----------------------------------------------------------------------------


def simulate(config: GaussianStudyConfig, *, quiet: bool = False) -> tuple[dict, dict]:
    """Run every (variant, case, eps) and return (metrics, trajectories).

    The trajectories are keyed by (variant, case, eps), each of shape (num_steps + 1,
    num_chains, 2).
    """
    threshold = nll_threshold(config.sigma, config.threshold_margin)
    x0 = start_points(config)
    steps = step_sizes(config)
    results = {variant: {case: {} for case in CASES} for variant in VARIANTS}
    trajectories = {}
    errors = {case: {} for case in CASES}

    runs = [(v, c, e) for v in VARIANTS for c in CASES for e in config.eps_values]
    for variant, case, eps in common.progress(runs, desc="langevin", quiet=quiet):
        # The same noise for both cases, so that eps = 0 gives identical runs.
        generator = torch.Generator().manual_seed(config.seed + 2)
        trajectory = langevin(lambda y: perturbed_score(y, config, eps, case), x0, steps,
                              stochastic=variant == "stochastic", generator=generator)
        results[variant][case][repr(eps)] = steps_to_converge(trajectory, config.sigma,
                                                              threshold)
        trajectories[(variant, case, eps)] = trajectory
        if variant == "deterministic":
            errors[case][repr(eps)] = error_statistics(config, eps, case)

    metrics = {
        "nll_threshold": threshold,
        "entropy": gaussian_entropy(config.sigma),
        "max_steps": config.num_steps,
        "steps_to_converge": results["deterministic"],
        "steps_to_converge_stochastic": results["stochastic"],
        "error_under_p": errors,
        "comparison": compare_cases(results["deterministic"], config),
    }
    return metrics, trajectories


def compare_cases(steps: dict, config: GaussianStudyConfig) -> dict:
    """Compare the deterministic steps of the two cases per eps and state the outcome."""
    never = config.num_steps + 1

    def count(case, eps):
        value = steps[case][repr(eps)]
        return never if value is None else value

    nonzero = [eps for eps in config.eps_values if eps > 0]
    slower = [eps for eps in nonzero if count("rotational", eps) > count("radial", eps)]
    faster = [eps for eps in nonzero if count("rotational", eps) < count("radial", eps)]
    identical_at_zero = (0.0 not in config.eps_values
                         or steps["rotational"]["0.0"] == steps["radial"]["0.0"])
    if slower and not faster:
        summary = "the rotational error needs more steps than the radial one at every eps > 0 " \
                  "where they differ"
    elif faster and not slower:
        summary = "the rotational error needs fewer steps than the radial one at every eps > 0 " \
                  "where they differ"
    else:
        summary = "neither error needs more steps than the other at every eps > 0"
    return {"rotational_slower_at_eps": slower, "rotational_faster_at_eps": faster,
            "identical_at_eps_0": identical_at_zero, "summary": summary}


def plot_trajectories(config: GaussianStudyConfig, trajectories: dict, path: Path) -> None:
    """Draw both cases' deterministic trajectories over their score field at `plot_eps`."""
    figure, axes = common.new_figure(len(CASES))
    half = config.grid_half_width
    line = torch.linspace(-half, half, config.grid_size, dtype=torch.float64)
    gx, gy = torch.meshgrid(line, line, indexing="xy")
    grid = torch.stack((gx.flatten(), gy.flatten()), dim=-1)

    for ax, case in zip(axes, CASES):
        # Arrows show direction only: the score's size spans orders of magnitude.
        field = perturbed_score(grid, config, config.plot_eps, case)
        unit = field / field.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ax.quiver(grid[:, 0], grid[:, 1], unit[:, 0], unit[:, 1], color="0.6")
        trajectory = trajectories[("deterministic", case, config.plot_eps)]
        for chain in range(trajectory.shape[1]):
            ax.plot(trajectory[:, chain, 0], trajectory[:, chain, 1], ".-", linewidth=0.8,
                    markersize=2)
        ax.set_xlim(-half, half)
        ax.set_ylim(-half, half)
        ax.set_aspect("equal")
        ax.set_title(f"{case} error, eps = {config.plot_eps:g}")
    common.save_figure(figure, path)


def save_trajectories(trajectories: dict, path: Path) -> Path:
    """Save the trajectories as a dict "variant/case/eps" -> tensor, for weights_only loading."""
    named = {f"{variant}/{case}/{eps!r}": trajectory
             for (variant, case, eps), trajectory in trajectories.items()}
    torch.save(named, path)
    logger.info("wrote %s", path)
    return path


def plot_steps(config: GaussianStudyConfig, steps: dict, path: Path) -> None:
    """Plot deterministic steps-to-converge against eps; runs that never converge sit on top."""
    figure, (ax,) = common.new_figure(1, panel_size=4.5)
    for case, marker in zip(CASES, ("o", "s")):
        eps = list(config.eps_values)
        counts = [steps[case][repr(e)] for e in eps]
        shown = [config.num_steps if c is None else c for c in counts]
        ax.plot(eps, shown, marker=marker, label=case)
        missed = [(e, s) for e, s, c in zip(eps, shown, counts) if c is None]
        if missed:
            ax.scatter(*zip(*missed), marker="x", color="k", zorder=3)
    ax.axhline(config.num_steps, color="0.7", linestyle=":",
               label=f"{config.num_steps} steps (x: not converged)")
    ax.set_xlabel("error level eps")
    ax.set_ylabel("Langevin steps to converge")
    ax.set_yscale("log")
    ax.legend()
    common.save_figure(figure, path)


# --- command line --------------------------------------------------------------------------


OPTIONS = {"sigma": "sigma", "eps": "eps_values", "plot_eps": "plot_eps",
           "chains": "num_chains", "steps": "num_steps", "step_size": "step_size",
           "start_mean": "start_mean", "start_std": "start_std",
           "threshold_margin": "threshold_margin", "seed": "seed"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the study's options."""
    common.add_common_arguments(parser, default_out="runs/study-gaussian")
    parser.add_argument("--sigma", type=float, help="std of the target Gaussian (default: 0.1)")
    parser.add_argument("--eps", type=common.parse_float_list,
                        help="comma-separated error levels (default: the paper's seven, "
                        "0 to 2.25e-3)")
    parser.add_argument("--plot-eps", type=float,
                        help="error level of the trajectory figure (default: 1.75e-3)")
    parser.add_argument("--chains", type=int, help="number of chains (default: 10)")
    parser.add_argument("--steps", type=int,
                        help="Langevin steps per run (default: 300; quick: 60)")
    parser.add_argument("--step-size", type=float,
                        help="initial step size h_0; h_k = h_0 exp(-k / 1000) (default: 0.0125)")
    parser.add_argument("--start-mean", type=float,
                        help="mean of each start coordinate (default: -2)")
    parser.add_argument("--start-std", type=float,
                        help="std of each start coordinate (default: 0.5)")
    parser.add_argument("--threshold-margin", type=float,
                        help="convergence threshold on the mean -log p, in nats above the "
                        "target's entropy (default: 0.5)")
    parser.add_argument("--seed", type=int, help="seed of the starts and the noise (default: 0)")


def run(args: argparse.Namespace) -> int:
    """Run the study and write config.json, metrics.json, trajectories.pt and two figures."""
    config = common.config_from_args(PRESETS, args, OPTIONS)
    out = common.prepare_output_dir(args.out, overwrite=args.overwrite)
    common.write_config(out, "gaussian", config)

    metrics, trajectories = simulate(config, quiet=args.quiet)
    common.write_metrics(out, metrics)
    save_trajectories(trajectories, out / "trajectories.pt")
    plot_trajectories(config, trajectories, out / "trajectories.png")
    plot_steps(config, metrics["steps_to_converge"], out / "steps_to_converge.png")

    for case in CASES:
        logger.info("%s steps to converge per eps: %s", case, metrics["steps_to_converge"][case])
    logger.info("%s", metrics["comparison"]["summary"])
    return 0
