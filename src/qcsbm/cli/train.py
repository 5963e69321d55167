"""`qcsbm train`: train an image score model (USBM, CSBM or QCSBM) from a preset or a file.

Exit codes:
    0   training finished (n_steps reached), or --list-presets
    2   invalid input (options, configuration, data, checkpoint, run folder); nothing written
    3   a non-finite loss, penalty or gradient stopped training; the last checkpoint is kept
    75  SIGTERM or SIGINT stopped training after a checkpoint; continue with --resume
        (75 is EX_TEMPFAIL of sysexits.h, "try again later", which job schedulers requeue)
    130 a second SIGINT or SIGTERM stopped at once, without a checkpoint
"""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_NONFINITE = 3
EXIT_STOPPED = 75

_EXAMPLE = ("example: qcsbm train --config digits-qcsbm --workdir runs/digits-qcsbm "
            "--set training.n_steps=3000")


def add_parser(subparsers) -> None:
    """Register the subcommand."""
    parser = subparsers.add_parser(
        "train", help="train an image score model (USBM, CSBM or QCSBM)",
        description="Train an NCSN++ score model on images. The configuration comes from a "
        "preset (see --list-presets) or a JSON file, changed with --set.",
        epilog=_EXAMPLE + ". Exit codes: 0 finished, 2 invalid input, 3 non-finite loss, "
        "75 stopped by a signal after a checkpoint (resume with --resume).")
    parser.add_argument("--config", metavar="PRESET_OR_FILE",
                        help="preset name or JSON configuration file; optional with --resume, "
                        "which reads the run's config.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="change one configuration value, e.g. training.n_steps=1000; "
                        "repeatable")
    parser.add_argument("--workdir", metavar="DIR",
                        help="run folder for config.json, checkpoints/ and metrics.jsonl")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --workdir from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an earlier run in --workdir and start over")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="start from the model and EMA weights of a qcsbm or "
                        "score_sde_pytorch checkpoint (fine-tuning); sets training.init_from")
    parser.add_argument("--init-optimizer", action="store_true",
                        help="also load the optimizer state of --init-from (default: a fresh "
                        "optimizer)")
    parser.add_argument("--two-stage-backward", action="store_true",
                        help="backpropagate the Hutchinson penalty in two stages, as the "
                        "paper's code does (needs training.estimator=hutchinson)")
    parser.add_argument("--device", help="device to train on, e.g. cpu or cuda:0 "
                        "(default: CUDA when available)")
    parser.add_argument("--quiet", action="store_true", help="hide the progress bar")
    parser.add_argument("--list-presets", action="store_true",
                        help="print the presets, one per line, and exit")
    parser.set_defaults(run=run)


def _remove_if_no_checkpoint(workdir, new_folder: bool) -> None:
    """Remove a run folder that this command created when it failed before any checkpoint."""
    import shutil

    folder = Path(workdir)
    if new_folder and folder.is_dir() and not any(folder.glob("checkpoints/ckpt_*.pt")):
        shutil.rmtree(folder, ignore_errors=True)


def run(args) -> int:
    """Run the subcommand."""
    from qcsbm.errors import NonFiniteError, UsageError
    from qcsbm.presets import list_presets, load_config

    if args.list_presets:
        presets = list_presets()
        width = max(len(name) for name, _ in presets)
        for name, description in presets:
            print(f"{name:<{width}}  {description}")
        return 0

    if args.workdir is None:
        raise UsageError("missing --workdir DIR, the run folder; " + _EXAMPLE)
    if args.resume and args.init_from is not None:
        raise UsageError("--init-from applies to new runs only; a resumed run restores its "
                         "own weights")

    # Build and validate the configuration before anything is written.
    from qcsbm.config import apply_overrides
    from qcsbm.trainer import resume_config, train

    if args.resume:
        requested = load_config(args.config) if args.config is not None else None
        cfg = resume_config(args.workdir, args.overrides, requested)
    else:
        if args.config is None:
            raise UsageError("missing --config PRESET_OR_FILE; list the presets with "
                             "`qcsbm train --list-presets`")
        cfg = apply_overrides(load_config(args.config), args.overrides)

    new_folder = not args.resume and not Path(args.workdir).exists()
    try:
        result = train(cfg, args.workdir, resume=args.resume, overwrite=args.overwrite,
                       init_from=args.init_from, init_optimizer=args.init_optimizer,
                       two_stage_backward=args.two_stage_backward, progress=not args.quiet,
                       device=args.device)
    except NonFiniteError as error:
        _remove_if_no_checkpoint(args.workdir, new_folder)
        print(f"qcsbm train: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_NONFINITE
    except Exception:
        _remove_if_no_checkpoint(args.workdir, new_folder)
        raise

    if result.status == "stopped":
        print(f"qcsbm train: stopped by {result.stop_signal} at step {result.step}; checkpoint "
              f"{result.checkpoint_path}; continue with `qcsbm train --resume --workdir "
              f"{result.workdir}`", file=sys.stderr)
        return EXIT_STOPPED
    print(f"qcsbm train: finished {result.step} steps ({result.seconds_per_step:.3f} s/step); "
          f"checkpoint {result.checkpoint_path}", file=sys.stderr)
    return 0
