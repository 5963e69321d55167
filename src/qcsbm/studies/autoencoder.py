"""Train a one-layer autoencoder score field with the quasi-conservative penalty alone.

The field s(x) = R phi(W^T x + b) + c (`qcsbm.nets.autoencoder`) has the Jacobian
J(x) = R diag(phi'(W^T x + b)) W^T. Minimising the exact penalty tr(J J^T) - tr(J J) on a
grid drives J towards symmetry everywhere, which for generic weights requires each decoder
column r_k to be parallel to its encoder column w_k: R = W diag(alpha), tied up to one
scale per hidden unit. This follows the autoencoder example of Chao et al., "On Investigating
the Conservative Property of Score-Based Generative Models" (ICML 2023).

Tracked per step (docs/studies.md explains why the first two measures differ):
    penalty            mean over the grid of tr(J J^T) - tr(J J) = 1/2 ||J - J^T||_F^2
    asymmetric_part    `summed_asymmetry`: ||R W^T - W R^T||_F / sqrt(2), which is
                       |r_0 . w_1 - r_1 . w_0| in 2-D (r_i, w_i: rows of R and W)
    unit_asymmetry     `unit_asymmetry`: zero exactly when every r_k is parallel to w_k
    weight_distance    ||R - W||_F; need not reach zero, because the scales alpha_k are free
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from qcsbm.errors import NonFiniteError, UsageError, check_positive
from qcsbm.jacobian import jacobian_asymmetry
from qcsbm.nets.autoencoder import OneLayerAutoencoder, summed_asymmetry, unit_asymmetry
from qcsbm.studies import common

logger = logging.getLogger(__name__)

CURVES = ("penalty", "asymmetric_part", "unit_asymmetry", "weight_distance")


@dataclasses.dataclass(frozen=True)
class AutoencoderStudyConfig:
    """Settings of the autoencoder study; defaults follow the paper's example."""

    hidden: int = 2                     # hidden units h (the input is 2-D)
    grid_size: int = 40                 # training points per side of the grid
    grid_half_width: float = 10.0       # the grid covers [-w, w]^2
    num_steps: int = 10_000
    learning_rate: float = 1e-4         # Adam
    max_grad_norm: float = 1.0          # gradient clipping by total norm
    init_range: float = 1.0             # weights and biases start uniform in [-1, 1]
    seeds: tuple = (0, 1, 2, 3, 4)
    curve_every: int = 10               # steps between curve points stored in metrics.json
    field_grid_size: int = 15           # arrows per side in the score-field figure

    def validate(self) -> None:
        """Raise UsageError for a value outside its range."""
        for name, value in (("--hidden", self.hidden), ("--grid-size", self.grid_size),
                            ("--steps", self.num_steps), ("curve_every", self.curve_every),
                            ("field_grid_size", self.field_grid_size)):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"invalid {name} {value!r}; expected an integer >= 1")
        if self.grid_size < 2:
            raise UsageError(f"invalid --grid-size {self.grid_size!r}; expected an integer >= 2")
        check_positive("grid_half_width", self.grid_half_width)
        check_positive("--lr", self.learning_rate)
        check_positive("max_grad_norm", self.max_grad_norm)
        check_positive("init_range", self.init_range)
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"invalid --seeds {list(self.seeds)}; expected distinct seeds")


PRESETS = {
    "default": AutoencoderStudyConfig(),
    # A larger learning rate so that the short run still shows the penalty falling.
    "quick": AutoencoderStudyConfig(grid_size=8, num_steps=150, learning_rate=1e-2,
                                    seeds=(0, 1), curve_every=5, field_grid_size=8),
}


def training_grid(config: AutoencoderStudyConfig) -> torch.Tensor:
    """Return the grid_size^2 training points over [-w, w]^2, shape (grid_size^2, 2)."""
    line = torch.linspace(-config.grid_half_width, config.grid_half_width, config.grid_size,
                          dtype=torch.float64)
    gx, gy = torch.meshgrid(line, line, indexing="xy")
    return torch.stack((gx.flatten(), gy.flatten()), dim=-1)


def penalty(model: OneLayerAutoencoder, points: torch.Tensor) -> torch.Tensor:
    """Return the exact quasi-conservative penalty tr(J J^T) - tr(J J), averaged over points."""
    return jacobian_asymmetry(model, points, method="exact").mean()


def weight_measures(model: OneLayerAutoencoder) -> dict[str, float]:
    """Return the structural measures of the module docstring, without the penalty."""
    with torch.no_grad():
        R, W = model.R, model.W
        return {"asymmetric_part": float(summed_asymmetry(R, W)),
                "unit_asymmetry": float(unit_asymmetry(R, W)),
                "weight_distance": float((R - W).norm())}


def unit_scales(model: OneLayerAutoencoder) -> list[float]:
    """Return alpha_k = (r_k . w_k) / |w_k|^2, the scale tying r_k to w_k (NaN if w_k = 0)."""
    with torch.no_grad():
        R, W = model.R, model.W
        return ((R * W).sum(dim=0) / W.pow(2).sum(dim=0)).tolist()


def train_one_seed(config: AutoencoderStudyConfig, seed: int, points: torch.Tensor, *,
                   quiet: bool = False) -> tuple[OneLayerAutoencoder, dict, dict]:
    """Train one model with Adam on the penalty alone; return (model, curves, initial state).

    Runs on one intra-op thread: the model and grid hold a few thousand numbers, so more
    threads cost more in synchronisation than they save (20x slower with 2 threads, measured
    on a loaded 2-core host).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config, seed, points, quiet)
    finally:
        torch.set_num_threads(threads)


def _train(config, seed, points, quiet):
    generator = torch.Generator().manual_seed(seed)
    model = OneLayerAutoencoder(2, config.hidden, init_range=config.init_range,
                                generator=generator).double()
    initial = {name: value.detach().clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    curves = {"step": [], **{name: [] for name in CURVES}}

    for step in common.progress(range(config.num_steps + 1), desc=f"seed {seed}", quiet=quiet):
        loss = penalty(model, points)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the penalty became {loss.item()} at step {step} of seed {seed}")

        # Record the state before the update; the last iteration only records.
        if step % config.curve_every == 0 or step == config.num_steps:
            curves["step"].append(step)
            curves["penalty"].append(loss.item())
            for name, value in weight_measures(model).items():
                curves[name].append(value)
        if step == config.num_steps:
            break

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
    return model, curves, initial


def plot_curves(config: AutoencoderStudyConfig, curves: dict, path: Path) -> None:
    """Plot every tracked curve against step on a log scale, one line per seed."""
    figure, axes = common.new_figure(len(CURVES))
    for ax, name in zip(axes, CURVES):
        for seed in config.seeds:
            seed_curves = curves[str(seed)]
            ax.plot(seed_curves["step"], seed_curves[name], label=f"seed {seed}", linewidth=1)
        # Exact zeros have no place on a log axis, so they show as gaps in a line.
        ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
    axes[0].legend(fontsize="small")
    common.save_figure(figure, path)


def plot_fields(config: AutoencoderStudyConfig, model: OneLayerAutoencoder,
                initial: dict, path: Path) -> None:
    """Draw the score field of one seed before and after training."""
    line = torch.linspace(-config.grid_half_width, config.grid_half_width,
                          config.field_grid_size, dtype=torch.float64)
    gx, gy = torch.meshgrid(line, line, indexing="xy")
    grid = torch.stack((gx.flatten(), gy.flatten()), dim=-1)
    trained = {name: value.detach().clone() for name, value in model.state_dict().items()}

    figure, axes = common.new_figure(2)
    for ax, (title, state) in zip(axes, (("before training", initial),
                                         ("after training", trained))):
        model.load_state_dict(state)
        with torch.no_grad():
            field = model(grid)
        ax.quiver(grid[:, 0], grid[:, 1], field[:, 0], field[:, 1])
        ax.set_aspect("equal")
        ax.set_title(f"seed {config.seeds[0]}, {title}")
    model.load_state_dict(trained)
    common.save_figure(figure, path)


def train_all(config: AutoencoderStudyConfig, *, quiet: bool = False) -> tuple[dict, tuple]:
    """Train every seed and return (metrics, (first model, its initial state))."""
    points = training_grid(config)
    final = {}
    curves = {}
    first = None
    for seed in config.seeds:
        model, seed_curves, initial = train_one_seed(config, seed, points, quiet=quiet)
        with torch.no_grad():
            final_penalty = penalty(model, points).item()
        final[str(seed)] = {"penalty": final_penalty,
                            "initial_penalty": seed_curves["penalty"][0],
                            **weight_measures(model),
                            "unit_scales": unit_scales(model),
                            "swish_beta": model.phi.beta.tolist()}
        curves[str(seed)] = seed_curves
        logger.info("seed %d: penalty %.3g -> %.3g, asymmetric part %.3g, ||R - W|| %.3g",
                    seed, seed_curves["penalty"][0], final_penalty,
                    final[str(seed)]["asymmetric_part"], final[str(seed)]["weight_distance"])
        if first is None:
            first = (model, initial)
    return {"final": final, "curves": curves}, first


# --- command line --------------------------------------------------------------------------


OPTIONS = {"hidden": "hidden", "grid_size": "grid_size", "steps": "num_steps",
           "lr": "learning_rate", "seeds": "seeds"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the study's options."""
    common.add_common_arguments(parser, default_out="runs/study-autoencoder")
    parser.add_argument("--hidden", type=int, help="hidden units (default: 2)")
    parser.add_argument("--grid-size", type=int,
                        help="training points per side of the grid over [-10, 10]^2 "
                        "(default: 40; quick: 8)")
    parser.add_argument("--steps", type=int,
                        help="Adam steps per seed (default: 10000; quick: 150)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-4; quick: 1e-2)")
    parser.add_argument("--seeds", type=common.parse_int_list,
                        help="comma-separated seeds, one model each (default: 0,1,2,3,4; "
                        "quick: 0,1)")


def run(args: argparse.Namespace) -> int:
    """Run the study and write config.json, metrics.json and two figures."""
    config = common.config_from_args(PRESETS, args, OPTIONS)
    out = common.prepare_output_dir(args.out, overwrite=args.overwrite)
    common.write_config(out, "autoencoder", config)

    results, (model, initial) = train_all(config, quiet=args.quiet)
    common.write_metrics(out, results)
    plot_curves(config, results["curves"], out / "curves.png")
    plot_fields(config, model, initial, out / "score_field.png")
    return 0
