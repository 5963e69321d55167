"""`qcsbm eval`: likelihood, score-field asymmetry and sample quality of a trained run.

    qcsbm eval nll --workdir DIR [--num N] [--divergence exact|hutchinson] [--num-probes K]
    qcsbm eval asym --workdir DIR [--num N] [--num-levels L] [--num-probes K]
    qcsbm eval quality --workdir DIR [--samples FILE_OR_DIR] [--ref NAME | --ref-stats FILE]
                       [--inception-weights PATH]

Every evaluation appends one entry to the run's metrics.json with the sample count, the
checkpoint step and the settings. The file is a JSON list, and earlier entries stay as they
are. `nll`
reports bits per dimension of uniformly dequantized test images with the offset log2(L) -
log2(scale) for the data's L levels and the model's input scale (see `qcsbm.evaluation`).
`asym` also writes its per-level values as JSON and a PNG plot under DIR/eval/.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

EVAL_DIR_NAME = "eval"
REFERENCE_SPLITS = ("train", "test")


def add_parser(subparsers) -> None:
    """Register the subcommand as `eval`."""
    parser = subparsers.add_parser(
        "eval", help="evaluate a trained run: bits/dim, asymmetry, sample quality",
        description="Evaluate a `qcsbm train` run and append the results to its metrics.json.")
    metrics = parser.add_subparsers(dest="metric", metavar="METRIC", required=True)

    nll = metrics.add_parser(
        "nll", help="bits per dimension on the test split (probability-flow ODE)",
        description="Bits per dimension of uniformly dequantized test images under the "
        "probability-flow ODE, with the offset log2(levels) - log2(input scale).")
    _add_common(nll)
    _add_data(nll)
    nll.add_argument("--num", type=int, metavar="N",
                     help="number of test images (default: all of them)")
    nll.add_argument("--batch-size", type=int, default=64, help="images per ODE solve "
                     "(default: 64)")
    nll.add_argument("--divergence", choices=("exact", "hutchinson"), default="hutchinson",
                     help="divergence of the drift: exact trace or Hutchinson's estimate "
                     "(default: %(default)s)")
    nll.add_argument("--num-probes", type=int, default=1,
                     help="Hutchinson probes per image (default: 1)")
    nll.add_argument("--rtol", type=float, default=1e-5, help="ODE relative tolerance")
    nll.add_argument("--atol", type=float, default=1e-5, help="ODE absolute tolerance")
    nll.add_argument("--method", default="dopri5", help="adaptive torchdiffeq method")
    nll.set_defaults(evaluate=_run_nll)

    asym = metrics.add_parser(
        "asym", help="Asym and NAsym across noise levels (Hutchinson probes)",
        description="Asym and NAsym of the score's Jacobian on perturbed test images at a "
        "grid of noise levels; written as JSON and a PNG plot under DIR/eval/.")
    _add_common(asym)
    _add_data(asym)
    asym.add_argument("--num", type=int, default=64, help="test images (default: 64)")
    asym.add_argument("--num-levels", type=int, default=10,
                      help="noise levels, evenly spaced in t from t_min to 1 (default: 10)")
    asym.add_argument("--num-probes", type=int, default=1,
                      help="Hutchinson probes per point (default: 1)")
    asym.add_argument("--batch-size", type=int, default=64, help="points per batch")
    asym.set_defaults(evaluate=_run_asym)

    quality = metrics.add_parser(
        "quality", help="FID, IS, KID and PRDC of samples (Inception-v3 features)",
        description="FID, Inception Score, KID and precision/recall/density/coverage of a "
        "sample file or shard folder against reference statistics, from one feature pass.")
    quality.add_argument("--workdir", metavar="DIR", required=True,
                         help="run folder of `qcsbm train`")
    quality.add_argument("--samples", metavar="FILE_OR_DIR",
                         help="sample file or shard folder of `qcsbm sample` (default: the "
                         "newest .npz in DIR/samples)")
    reference = quality.add_mutually_exclusive_group()
    reference.add_argument("--ref", choices=REFERENCE_SPLITS, default="train",
                           help="split of the run's data set for the reference statistics, "
                           "computed once and cached (default: train)")
    reference.add_argument("--ref-stats", metavar="FILE",
                           help="reference statistics file (.npz) written by "
                           "qcsbm.metrics.reference_stats")
    quality.add_argument("--inception-weights", metavar="PATH",
                         help="torch-fidelity's Inception-v3 weights file (default: torch's "
                         "hub cache)")
    quality.add_argument("--cache-dir", metavar="DIR",
                         help="folder of cached reference statistics (default: "
                         "~/.cache/qcsbm/reference)")
    quality.add_argument("--nearest-k", type=int, default=3,
                         help="k of the PRDC nearest-neighbour balls (default: 3)")
    quality.add_argument("--data-path", metavar="PATH",
                         help="root of the data files for --ref (default: the run's "
                         "data.path); for npz and folder data sets, the split's own files")
    quality.add_argument("--device", help="device of the feature pass (default: cpu)")
    quality.add_argument("--quiet", action="store_true", help="hide progress bars")
    quality.set_defaults(evaluate=_run_quality)
    parser.set_defaults(run=run)


def _add_common(parser) -> None:
    parser.add_argument("--workdir", metavar="DIR", required=True,
                        help="run folder of `qcsbm train`")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the noise, dequantization and probes (default: 0)")
    parser.add_argument("--use-model-weights", action="store_true",
                        help="use the raw weights instead of the EMA weights")
    parser.add_argument("--checkpoint-step", type=int, metavar="STEP",
                        help="use the checkpoint of this step (default: the newest)")
    parser.add_argument("--device", help="device, e.g. cpu or cuda:0 (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="hide progress bars")


def _add_data(parser) -> None:
    parser.add_argument("--split", choices=REFERENCE_SPLITS, default="test",
                        help="split of the run's data set (default: test)")
    parser.add_argument("--data-path", metavar="PATH",
                        help="root of the data files (default: the run's data.path); for npz "
                        "and folder data sets, the files of the split itself")


def run(args) -> int:
    """Run the chosen evaluation."""
    from qcsbm.devices import check_device

    if args.device is not None:
        check_device(args.device)
    return args.evaluate(args)


# --- nll and asym ---------------------------------------------------------------------------

def _positive(name: str, value) -> None:
    from qcsbm.errors import UsageError

    if value is not None and value < 1:
        raise UsageError(f"invalid {name} {value!r}; expected an integer >= 1")


def _load(args):
    """Return (LoadedRun, evaluation images) after checking the common options."""
    from qcsbm.evaluation import load_eval_images
    from qcsbm.models import load_run

    from qcsbm.evaluation import read_metrics

    loaded = load_run(args.workdir, use_ema=not args.use_model_weights,
                    step=args.checkpoint_step, device=args.device or "cpu")
    read_metrics(args.workdir)  # a damaged metrics.json fails before the evaluation runs
    split = args.split if hasattr(args, "split") else "test"
    return loaded, load_eval_images(loaded.config, split, args.data_path)


def _run_nll(args) -> int:
    from qcsbm.evaluation import append_metrics, nll_of_run, run_summary
    from qcsbm.sampling import check_solver_options

    for name in ("--num", "--batch-size", "--num-probes"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    check_solver_options(args.method, args.rtol, args.atol, None)

    loaded, dataset = _load(args)
    result = nll_of_run(loaded, dataset, num=args.num, batch_size=args.batch_size,
                        divergence=args.divergence, num_probes=args.num_probes, seed=args.seed,
                        rtol=args.rtol, atol=args.atol, method=args.method,
                        device=args.device or "cpu", progress=not args.quiet)
    _check_finite(result, ("bits_per_dim",), loaded)
    entry = {**result, **run_summary(loaded), "split": args.split}
    path = append_metrics(args.workdir, entry)
    print(f"qcsbm eval nll: {result['bits_per_dim']:.4f} bits/dim on {result['num_samples']} "
          f"images (mean NFE {result['nfe_mean']:.1f}); appended to {path}", file=sys.stderr)
    return 0


def _check_finite(result: dict, keys, loaded) -> None:
    """Raise NonFiniteError, before anything is written, if a result is NaN or inf."""
    import math

    from qcsbm.errors import NonFiniteError

    for key in keys:
        values = result[key] if isinstance(result[key], list) else [result[key]]
        if not all(math.isfinite(value) for value in values):
            raise NonFiniteError(f"the {key} of checkpoint {loaded.checkpoint_path} is NaN or "
                                 "inf; check the model's weights (for example with "
                                 "--use-model-weights)")


def _run_asym(args) -> int:
    from qcsbm.checkpoints import write_text_atomic
    from qcsbm.evaluation import append_metrics, asymmetry_of_run, plot_asymmetry, run_summary

    for name in ("--num", "--num-levels", "--num-probes", "--batch-size"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))

    loaded, dataset = _load(args)
    result = asymmetry_of_run(loaded, dataset, num=args.num, num_levels=args.num_levels,
                              num_probes=args.num_probes, seed=args.seed,
                              batch_size=args.batch_size, device=args.device or "cpu")
    _check_finite(result, ("asym", "nasym"), loaded)
    entry = {**result, **run_summary(loaded), "split": args.split}

    out_dir = Path(args.workdir) / EVAL_DIR_NAME
    stem = f"asym_step{loaded.step}_{loaded.weights}"
    json_path = out_dir / f"{stem}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json_path, json.dumps(entry, indent=2) + "\n")
    png_path = plot_asymmetry(result, out_dir / f"{stem}.png",
                              title=f"{loaded.config.training.kind} step {loaded.step}")
    append_metrics(args.workdir, {**entry, "json": str(json_path), "plot": str(png_path)})
    print(f"qcsbm eval asym: wrote {json_path} and {png_path}", file=sys.stderr)
    return 0


# --- quality --------------------------------------------------------------------------------

def _run_quality(args) -> int:
    from qcsbm.evaluation import quality_of_run

    entry = quality_of_run(args.workdir, samples=args.samples, ref=args.ref,
                           ref_stats=args.ref_stats, inception_weights=args.inception_weights,
                           cache_dir=args.cache_dir, nearest_k=args.nearest_k,
                           data_path=args.data_path, device=args.device or "cpu",
                           progress=not args.quiet)
    print(f"qcsbm eval quality: FID {entry['fid']:.3f}, IS {entry['is_mean']:.3f}, KID "
          f"{entry['kid_mean']:.5f} on {entry['num_samples']} samples; appended to "
          f"{entry['metrics_file']}", file=sys.stderr)
    return 0
