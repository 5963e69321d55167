"""The 2-D study: train USBM, CSBM and QCSBM on toy data and compare their score fields.

Reproduces the two-dimensional experiments of Chao et al., "On Investigating the Conservative
Property of Score-Based Generative Models" (ICML 2023), Section 3.2, and adds exact oracle
scores, error bars over seeds and a sweep over the balancing factor lambda_qc.

Setup (the authors' 2-D code, chen-hao-chao/qcsbm 2d_examples): a VE SDE with
sigma in [0.1, 3], the 2-D network of `qcsbm.nets.toy2d`, Adam with lr 7.5e-4, batch 5000,
4000 steps, the exact penalty with lambda_qc = 0.1. That code weights the DSM term as
||sigma s + z||^2, without the factor 1/2 that `qcsbm.losses` uses (as score_sde_pytorch
does), so this study takes --lambda-qc in the authors' units and passes lambda_qc / 2 to the
objective: the ratio of the two terms, and so the optimum, is then the same.

Metrics per trained model (its EMA weights), on fresh data points:
    nll          -log p(x) in nats via the probability-flow ODE from t_min (exact divergence);
                 p is the data density smoothed by the SDE's smallest noise level
    nfe          function evaluations of that ODE solve
    asym, nasym  exact Jacobian asymmetry and its normalized form, averaged over the points
                 and over `num_noise_levels` noise levels evenly spaced in t
    score_error  1/2 ||s - s*||^2 against the exact score s* of the perturbed data,
                 averaged over the same points and levels
    precision,   k-nearest-neighbour precision and recall (k = 3) of PC samples against
    recall       as many fresh data points
    sample_nfe   function evaluations of the probability-flow ODE sampler for the same count
    train_seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import time

import torch

from qcsbm.data.toy2d import TOY_DATASETS, get_toy_dataset
from qcsbm.config import FLOAT32_MAX
from qcsbm.devices import check_device
from qcsbm.errors import UsageError, check_choice, check_positive
from qcsbm.likelihood import log_likelihood
from qcsbm.losses import Objective
from qcsbm.metrics.prdc import prdc
from qcsbm.metrics.score_field import asymmetry_by_level, noise_level_times, score_error_by_level
from qcsbm.nets.toy2d import ToyScoreNet
from qcsbm.sampling import ode_sample, pc_sample
from qcsbm.scores import EnergyScore, UnconstrainedScore
from qcsbm.sde import VESDE
from qcsbm.studies import common, toy2d_report
from qcsbm.training import OptimSettings, fit

logger = logging.getLogger(__name__)

MODEL_KINDS = ("usbm", "csbm", "qcsbm")
DATASET_CHOICES = tuple(TOY_DATASETS) + ("all",)
METRIC_KEYS = ("nll", "nfe", "asym", "nasym", "score_error", "precision", "recall",
               "sample_nfe", "train_seconds")


@dataclasses.dataclass(frozen=True)
class Toy2DConfig:
    """Settings of the 2-D study. Field comments give units and meaning."""

    datasets: tuple = ("checkerboard",)
    models: tuple = MODEL_KINDS
    seeds: tuple = (0,)
    num_steps: int = 1200             # optimisation steps per model
    batch_size: int = 1000            # fresh data points per step
    # QCSBM balancing factors, in the authors' units. The authors' 0.1 belongs to 4000 steps
    # of 5000 points and barely moves NAsym in this shorter default. At seed 0, lambda 1 cut
    # NAsym 2-4x and lambda 10 cut it 13-45x on the three data sets, for at most 0.03 nats.
    lambda_qc: tuple = (10.0,)
    estimator: str = "exact"          # QC penalty estimator: exact (cheap in 2-D) or Hutchinson
    num_probes: int = 1               # probes K for the Hutchinson estimators
    lr: float = 7.5e-4
    grad_clip: float = 1.0
    ema_rate: float = 0.99            # EMA of the weights that are evaluated; 0 = no EMA
    sigma_min: float = 0.1
    sigma_max: float = 3.0
    num_eval_points: int = 1000       # points for nll, asym, nasym and score_error
    num_noise_levels: int = 10
    num_samples: int = 5000           # samples (and data points) for precision and recall
    nearest_k: int = 3
    pc_steps: int = 300               # predictor steps of the PC sampler
    snr: float = 0.16                 # Langevin corrector signal-to-noise ratio
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5
    density_grid: int = 48            # the density figure's grid points per axis
    device: str = "cpu"

    def validate(self) -> None:
        """Raise UsageError for any value outside its allowed range."""
        for name in self.datasets:
            check_choice("--dataset", name, tuple(TOY_DATASETS))
        if not self.models:
            raise UsageError("invalid --models ''; expected a comma-separated subset of "
                             f"{','.join(MODEL_KINDS)}")
        for kind in self.models:
            check_choice("--models entry", kind, MODEL_KINDS)
        for name in ("num_steps", "batch_size", "num_eval_points", "num_noise_levels",
                     "pc_steps", "density_grid", "num_probes"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise UsageError(f"invalid {_option(name)} {value!r}; expected an integer >= 1")
        for value in self.lambda_qc:
            if not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"invalid --lambda-qc {value!r}; expected numbers >= 0")
        for seed in self.seeds:
            if not 0 <= seed < 2**63:
                raise UsageError(f"invalid --seeds entry {seed!r}; expected integers in "
                                 "[0, 2^63)")
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise UsageError(f"invalid --sigma-min {self.sigma_min!r} and --sigma-max "
                             f"{self.sigma_max!r}; expected 0 < sigma_min < sigma_max")
        if self.num_samples <= self.nearest_k:
            raise UsageError(f"invalid --num-samples {self.num_samples!r}; expected more than "
                             f"k = {self.nearest_k} samples")
        check_positive("--lr", self.lr)
        if self.lr > FLOAT32_MAX:
            raise UsageError(f"invalid --lr {self.lr!r}; expected a number <= 3.4e38, as the "
                             "network trains in float32")
        check_choice("--estimator", self.estimator, ("exact", "hutchinson", "nonnegative"))
        if not 0 <= self.ema_rate < 1:
            raise UsageError(f"invalid --ema-rate {self.ema_rate!r}; expected 0 <= rate < 1")
        check_device(self.device)


def _option(field: str) -> str:
    """Return the command-line option that sets a config field."""
    for option, name in OPTIONS.items():
        if name == field:
            return "--" + option.replace("_", "-")
    return "--" + field.replace("_", "-")


PRESETS = {
    # A smoke test that exercises every step in seconds; its numbers mean little.
    "quick": Toy2DConfig(num_steps=100, batch_size=256, num_eval_points=200,
                         num_noise_levels=3, num_samples=400, pc_steps=30, density_grid=10,
                         ode_rtol=1e-3, ode_atol=1e-3),
    "default": Toy2DConfig(),
    # The authors' settings: 4000 steps, batch 5000, lambda_qc 0.1, K = 1, Adam 7.5e-4.
    "paper": Toy2DConfig(num_steps=4000, batch_size=5000, lambda_qc=(0.1,), ema_rate=0.0),
}

# Command-line option (attribute of args) -> config field.
OPTIONS = {
    "dataset": "datasets", "models": "models", "seeds": "seeds", "steps": "num_steps",
    "batch_size": "batch_size", "lambda_qc": "lambda_qc", "estimator": "estimator",
    "num_probes": "num_probes", "lr": "lr", "sigma_min": "sigma_min",
    "sigma_max": "sigma_max", "num_samples": "num_samples", "device": "device",
}


# --- building and training ----------------------------------------------------------------


def build_model(kind: str, sde: VESDE):
    """Return the score model of one kind on the 2-D network."""
    if kind == "csbm":
        return EnergyScore(ToyScoreNet(energy_head=True), sde, form="residual")
    return UnconstrainedScore(ToyScoreNet(), sde, output="residual")


def objective_for(kind: str, lambda_qc: float, config: Toy2DConfig) -> Objective:
    """Return the training objective; lambda_qc is in the authors' units (see module doc)."""
    if kind != "qcsbm":
        return Objective()
    return Objective(lambda_qc=lambda_qc / 2, estimator=config.estimator,
                     num_probes=config.num_probes)


def train_model(kind, lambda_qc, dataset, sde, config, seed, quiet):
    """Train one model from seed `seed` and return (EMA score model, seconds)."""
    torch.manual_seed(seed)
    device = torch.device(config.device)
    model = build_model(kind, sde).to(device)
    data_generator = torch.Generator().manual_seed(10_000 + seed)
    loss_generator = torch.Generator(device=device).manual_seed(20_000 + seed)

    def sample_batch(step):
        return dataset.sample(config.batch_size, data_generator).to(device)

    settings = OptimSettings(lr=config.lr, grad_clip=config.grad_clip, ema_rate=config.ema_rate)
    result = fit(model, sde, sample_batch, objective_for(kind, lambda_qc, config), settings,
                 num_steps=config.num_steps, generator=loss_generator, progress=not quiet,
                 description=f"{dataset.name} {kind} seed {seed}")
    return result.ema.module, result.train_seconds


# --- evaluation ----------------------------------------------------------------------------


def evaluate_model(score_model, dataset, sde, config, seed, quiet):
    """Return the metrics of one trained model and its per-level curves and samples."""
    device = torch.device(config.device)
    generator = torch.Generator().manual_seed(30_000 + seed)
    x_eval = dataset.sample(config.num_eval_points, generator).to(device)

    # Likelihood and its NFE through the probability-flow ODE.
    likelihood = log_likelihood(score_model, sde, x_eval, divergence="exact",
                                rtol=config.ode_rtol, atol=config.ode_atol)

    # Asymmetry and score error over noise levels, on the same perturbed points.
    times = noise_level_times(sde, config.num_noise_levels, dtype=x_eval.dtype).to(device)
    levels = asymmetry_by_level(score_model, sde, x_eval, times, method="exact",
                                generator=torch.Generator().manual_seed(40_000 + seed))

    def true_score(x, t):
        return dataset.score(x, sde.sigma(t)).to(x.dtype)

    errors = score_error_by_level(score_model, true_score, sde, x_eval, times,
                                  generator=torch.Generator().manual_seed(40_000 + seed))

    # Samples: PC for precision/recall, the probability-flow ODE for its NFE.
    sample_generator = torch.Generator(device=device).manual_seed(50_000 + seed)
    shape = (config.num_samples, 2)
    samples = pc_sample(score_model, sde, shape, num_steps=config.pc_steps,
                        corrector="langevin", snr=config.snr, generator=sample_generator,
                        device=device, progress=not quiet).samples
    ode = ode_sample(score_model, sde, shape, rtol=config.ode_rtol, atol=config.ode_atol,
                     generator=sample_generator, device=device)
    reference = dataset.sample(config.num_samples, generator).to(device)
    quality = prdc(reference, samples, k=config.nearest_k)

    metrics = {
        "nll": float(-likelihood.logp.mean()),
        "nfe": likelihood.nfe,
        "asym": statistics.fmean(levels.asym),
        "nasym": statistics.fmean(levels.nasym),
        "score_error": statistics.fmean(errors),
        "precision": quality["precision"],
        "recall": quality["recall"],
        "sample_nfe": ode.nfe,
    }
    curves = {"std": levels.std, "asym": levels.asym, "nasym": levels.nasym,
              "score_error": errors}
    return metrics, curves, samples.cpu()


# --- the study -----------------------------------------------------------------------------


def model_runs(config: Toy2DConfig):
    """Yield (kind, lambda_qc) for every model the study trains, in the order given."""
    for kind in config.models:
        if kind == "qcsbm":
            for value in config.lambda_qc:
                yield kind, value
        else:
            yield kind, 0.0


def run_study(config: Toy2DConfig, out, *, quiet: bool = False) -> dict:
    """Train and evaluate every (data set, seed, model, lambda); write metrics, table, figures.

    metrics.json is rewritten after every model with `"complete": false`, so a stopped run
    keeps the results it has. The table and the figures are written at the end.
    """
    sde = VESDE(config.sigma_min, config.sigma_max)
    records, curves, samples = [], {}, {}
    for name in config.datasets:
        dataset = get_toy_dataset(name)
        for seed in config.seeds:
            for kind, lambda_qc in model_runs(config):
                record, level_curves, model, points = _train_and_evaluate(
                    kind, lambda_qc, dataset, sde, config, seed, quiet)
                records.append(record)
                key = (name, kind, lambda_qc)
                curves.setdefault(key, []).append(level_curves)
                samples.setdefault(key, (model, points))
                common.write_metrics(out, _payload(config, records, curves, complete=False))

    payload = _payload(config, records, curves, complete=True)
    common.write_metrics(out, payload)
    (out / "table.md").write_text(toy2d_report.markdown_table(payload["summary"], METRIC_KEYS))
    toy2d_report.write_figures(out, config, sde, payload["summary"], curves, samples,
                               quiet=quiet)
    return payload


def _train_and_evaluate(kind, lambda_qc, dataset, sde, config, seed, quiet):
    start = time.perf_counter()
    model, train_seconds = train_model(kind, lambda_qc, dataset, sde, config, seed, quiet)
    metrics, level_curves, points = evaluate_model(model, dataset, sde, config, seed, quiet)
    record = {"dataset": dataset.name, "model": kind, "lambda_qc": lambda_qc, "seed": seed,
              **metrics, "train_seconds": train_seconds}
    logger.info("%s %s lambda=%g seed %d: nasym %.3g, nll %.3f, %.0f s", dataset.name, kind,
                lambda_qc, seed, metrics["nasym"], metrics["nll"], time.perf_counter() - start)
    return record, level_curves, model, points


def _payload(config, records, curves, *, complete):
    return {"study": "toy2d", "complete": complete, "settings": config, "results": records,
            "summary": summarize(records),
            "curves": [{"dataset": key[0], "model": key[1], "lambda_qc": key[2],
                        "seeds": value} for key, value in curves.items()]}


def summarize(records: list) -> list:
    """Return one record per (dataset, model, lambda_qc) with mean and std across seeds."""
    groups = {}
    for record in records:
        groups.setdefault((record["dataset"], record["model"], record["lambda_qc"]),
                          []).append(record)
    summary = []
    for (dataset, model, lambda_qc), group in groups.items():
        entry = {"dataset": dataset, "model": model, "lambda_qc": lambda_qc,
                 "seeds": [r["seed"] for r in group]}
        for key in METRIC_KEYS:
            values = [float(r[key]) for r in group]
            entry[key] = {"mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        summary.append(entry)
    return summary


# --- command line --------------------------------------------------------------------------


def _dataset_list(text: str) -> tuple:
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"invalid --dataset {text!r}; expected comma-separated names from "
            f"{', '.join(DATASET_CHOICES)} with no empty item")
    if names == ("all",):
        return tuple(TOY_DATASETS)
    for name in names:
        if name not in TOY_DATASETS:
            raise argparse.ArgumentTypeError(
                f"invalid data set {name!r}; expected one of {', '.join(DATASET_CHOICES)}")
    return names


def _model_list(text: str) -> tuple:
    kinds = tuple(part.strip() for part in text.split(","))
    if not all(kinds):
        raise argparse.ArgumentTypeError(
            f"invalid --models {text!r}; expected a comma-separated subset of "
            f"{','.join(MODEL_KINDS)} with no empty item")
    for kind in kinds:
        if kind not in MODEL_KINDS:
            raise argparse.ArgumentTypeError(
                f"invalid model kind {kind!r}; expected a comma-separated subset of "
                f"{','.join(MODEL_KINDS)}")
    if not kinds:
        raise argparse.ArgumentTypeError("invalid --models ''; it is empty")
    return kinds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the study's options."""
    common.add_common_arguments(parser, default_out="toy2d-results",
                                presets=tuple(PRESETS))
    parser.add_argument("--dataset", type=_dataset_list, metavar="NAME[,NAME]",
                        help=f"data sets: {', '.join(DATASET_CHOICES)} (default: checkerboard)")
    parser.add_argument("--models", type=_model_list, metavar="KIND[,KIND]",
                        help="model kinds to train: usbm,csbm,qcsbm (default: all three)")
    parser.add_argument("--seeds", type=common.parse_int_list,
                        help="comma-separated training seeds (default: 0)")
    parser.add_argument("--steps", type=int, help="optimisation steps per model")
    parser.add_argument("--batch-size", type=int, help="data points per step")
    parser.add_argument("--lambda-qc", type=common.parse_float_list, metavar="L[,L]",
                        help="QCSBM balancing factor(s) in the authors' units; a list trains "
                        "one QCSBM per value and adds the trade-off figure (default: 10)")
    parser.add_argument("--estimator", help="QC penalty estimator: exact, hutchinson or "
                        "nonnegative (default: exact)")
    parser.add_argument("--num-probes", type=int, help="Hutchinson probes per sample")
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--sigma-min", type=float, help="smallest noise std (default: 0.1)")
    parser.add_argument("--sigma-max", type=float, help="largest noise std (default: 3)")
    parser.add_argument("--num-samples", type=int,
                        help="samples for precision and recall (default: 5000)")
    parser.add_argument("--device", help="torch device, for example cpu or cuda (default: cpu)")


def run(args: argparse.Namespace) -> int:
    """Run the study from parsed options."""
    config = common.config_from_args(PRESETS, args, OPTIONS)
    out = common.prepare_output_dir(args.out, overwrite=args.overwrite)
    common.write_config(out, "toy2d", config)
    payload = run_study(config, out, quiet=args.quiet)
    print(toy2d_report.markdown_table(payload["summary"], METRIC_KEYS))
    print(f"results written to {out}")
    return 0
